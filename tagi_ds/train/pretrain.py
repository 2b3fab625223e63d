"""Stage 1 `tagi-ds pretrain`: the hypernetwork learns on plain text, split as HINT does (CE only).

Each document is cut once (seeded) into (a, b, c): a is the "instruction" the hypernetwork sees (encoded once, like
every instruction, before training), b the backbone's input, c the target. Each document is its own task, so a
micro batch of `pretrain.micro_batch_size` documents is that many tasks with one instance each.

    torchrun --nproc_per_node 2 -m tagi_ds.cli pretrain --config configs/tiny.yaml pretrain.steps=200
Outputs: <run_dir>/pretrain/{checkpoints/, export/, metrics.jsonl, summary.json, stage.json, config.yaml},
TensorBoard under <run_dir>/tb/pretrain.
"""
from __future__ import annotations

import random
from typing import Callable, Optional

import torch

from ..data.collate import pad_id, pad_rows
from ..data.pretrain_text import OFFLINE_CORPORA, hint_split, load_documents
from ..data.sampler import TaskGroupedSampler
from ..errors import ConfigError, DataError
from ..modeling.label_logits import IGNORE
from ..run.identity import PRETRAIN_DATA_KEYS, check_stage_record, config_identity
from ..run.paths import RunPaths
from ..run.stage_lock import stage_locked
from .distributed import rank, world_size
from .hypernet_loop import StageSpec, StudentSetup, TrainBatch, setup_student, train_stage
from .losses import ce_loss

STAGE = "pretrain"


def identity(cfg, sub: Optional[str] = None) -> dict:
    """Stage 1 reads no task data, teacher, cache or finetune setting: only the text and the student's shape."""
    ident = config_identity(cfg, ("seed", "backbone", "lora", "hypernet", "pretrain", "data"))
    ident["data"] = {k: ident["data"][k] for k in PRETRAIN_DATA_KEYS + ("seed",)}
    return ident


class PretrainBatches:
    """Documents cut once into HINT's (a, b, c); segment a is each document's instruction row."""

    def __init__(self, data_cfg, tokenizer, arch: str, *, micro_batch_size: int, seed: int):
        d = data_cfg
        if len(d.pretrain_segment_lengths) != 3:
            raise ConfigError(f"data.pretrain_segment_lengths: expected 3 lengths (a, b, c), got "
                              f"{d.pretrain_segment_lengths}")
        docs = (load_documents(d.pretrain_text) if d.pretrain_text
                else OFFLINE_CORPORA[d.pretrain_offline_corpus](d.pretrain_offline_docs, seed=d.seed))
        rng = random.Random(f"pretrain_split:{d.seed}")
        self.examples = []
        for doc in docs:
            ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
            if len(ids) >= 3:
                self.examples.append(hint_split(ids, d.pretrain_segment_lengths, rng))
        if not self.examples:
            raise DataError(f"{d.pretrain_text or 'offline corpus'}: no document has 3 or more tokens")
        self.bos = [tokenizer.bos_token_id] if arch == "llama" and tokenizer.bos_token_id is not None else []
        self.eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        if not self.eos:
            raise DataError("pretraining needs a tokenizer with an eos token (targets end with it)")
        self.arch, self.pad = arch, pad_id(tokenizer)
        self.documents = len(docs)
        # The instruction row is segment a with the tokenizer's own framing (T5: + eos; LLaMA: bos +).
        self.instruction_rows = [self.bos + a + (self.eos if arch == "t5" else []) for a, _, _ in self.examples]
        self.sampler = TaskGroupedSampler([1] * len(self.examples), micro_batch_size, 1, rank=rank(),
                                          world_size=world_size(), seed=seed)

    def make_batch(self, keys: list[tuple[int, int]]) -> TrainBatch:
        index = [t for t, _ in keys]
        ex = [self.examples[i] for i in index]
        instr = [self.instruction_rows[i] for i in index]
        if self.arch == "t5":
            inputs = [b + self.eos for _, b, _ in ex]
            input_ids, labels = pad_rows(inputs, self.pad), pad_rows([c + self.eos for _, _, c in ex], IGNORE)
            mask_rows = inputs
        else:
            seqs = [self.bos + b + c + self.eos for _, b, c in ex]
            input_ids = pad_rows(seqs, self.pad)
            labels = pad_rows([[IGNORE] * (len(self.bos) + len(b)) + c + self.eos for _, b, c in ex], IGNORE)
            mask_rows = seqs
        return TrainBatch(task_index=torch.tensor(index, dtype=torch.long),
                          task_ids=torch.arange(len(index), dtype=torch.long), input_ids=input_ids,
                          attention_mask=pad_rows([[1] * len(r) for r in mask_rows], 0), labels=labels,
                          instr_ids=pad_rows(instr, self.pad), instr_mask=pad_rows([[1] * len(r) for r in instr], 0),
                          task_names=[f"doc{i}" for i in index], instance_ids=[f"doc{i}" for i in index])


def build_stage(cfg, setup: StudentSetup, record: Optional[dict]) -> StageSpec:
    """Stage 1's description around a set-up student: the documents' batches and the CE loss."""
    paths = RunPaths.of(cfg)
    batches = PretrainBatches(cfg.data, setup.tokenizer, setup.arch, micro_batch_size=cfg.pretrain.micro_batch_size,
                              seed=cfg.seed)
    return StageSpec(STAGE, paths.pretrain, paths.tb(STAGE), cfg.pretrain, record, batches, ce_loss,
                     summary={"documents": batches.documents, "examples": len(batches.examples)})


@stage_locked("pretrain")  # one writer per stage folder (run/stage_lock.py)
def run(cfg, sub: Optional[str] = None, *, progress: bool = True, log: Callable[[str], None] = print,
        on_checkpoint: Optional[Callable[[int], None]] = None):
    """Train stage 1 and write its export; returns the export folder (rank 0) or None (other ranks)."""
    if not cfg.pretrain.enabled:
        return None
    record = check_stage_record(RunPaths.of(cfg).pretrain, STAGE, identity(cfg))
    setup = setup_student(cfg, micro_batch=cfg.pretrain.micro_batch_size, loop=cfg.pretrain)
    return train_stage(setup, build_stage(cfg, setup, record), on_checkpoint=on_checkpoint, show_progress=progress)


def main(args) -> int:
    out = run(args.cfg)
    if out is not None:
        print(f"pretrain: hypernetwork export in {out}")
    return 0
