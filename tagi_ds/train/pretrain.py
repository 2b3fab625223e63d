"""Stage 1 `tagi-ds pretrain`: the hypernetwork learns on plain text, split as HINT does (CE only).

Each document is cut (seeded by its position) into (a, b, c): a is the "instruction" the hypernetwork sees, b the
backbone's input, c the target. Each document is its own task, so a micro batch of `pretrain.micro_batch_size`
documents is that many tasks with one instance each. The text streams (data/document_blocks.py): memory holds one
micro batch of documents, never the corpus, and nothing is read or encoded before the first step.

    torchrun --nproc_per_node 2 -m tagi_ds.cli pretrain --config configs/tiny.yaml pretrain.steps=200
Outputs: <run_dir>/pretrain/{checkpoints/, export/, metrics.jsonl, summary.json, stage.json, config.yaml},
TensorBoard under <run_dir>/tb/pretrain.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Callable, Optional

import torch

from ..data.collate import pad_id, pad_rows
from ..data.document_blocks import DocumentBlocks, ListCorpus
from ..data.pretrain_text import OFFLINE_CORPORA, TextCorpus, hint_split
from ..errors import ConfigError, DataError
from ..modeling.label_logits import IGNORE
from ..run.identity import PRETRAIN_DATA_KEYS, check_stage_record, config_identity
from ..run.paths import RunPaths
from .engine_stage import StageSpec, train_stage
from .hypernet_loop import StudentSetup, TrainBatch, bucket_instructions, hypernet_stage, setup_student
from .losses import ce_loss

STAGE = "pretrain"


def identity(cfg, sub: Optional[str] = None) -> dict:
    """Stage 1 reads no task data, teacher, cache or finetune setting: only the text and the student's shape."""
    ident = config_identity(cfg, ("seed", "backbone", "lora", "hypernet", "pretrain", "data"))
    ident["data"] = {k: ident["data"][k] for k in PRETRAIN_DATA_KEYS + ("seed",)}
    return ident


OFFLINE_TEXT = "offline"  # data.pretrain_text value that picks the generated corpus (the tiny demo's, by choice)


def corpus_of(data_cfg):
    """The stage-1 corpus: `data.pretrain_text` streamed (a file, shard folder or C4 index), or, only when the config
    says so explicitly (`pretrain_text: offline`), the offline generated corpus of the tiny demo. Unset or missing
    is an error: a scale run never falls back to ~2,000 template stories in silence."""
    d = data_cfg
    if d.pretrain_text is None:
        raise ConfigError("data.pretrain_text: not set. Stage 1 trains on plain text: convert C4 with "
                          "`python tools/convert_c4.py SRC OUT` and set data.pretrain_text=OUT (or a .txt / .jsonl "
                          f"file); `data.pretrain_text: {OFFLINE_TEXT}` picks the tiny demo's generated corpus")
    if d.pretrain_text == OFFLINE_TEXT:
        docs = OFFLINE_CORPORA[d.pretrain_offline_corpus](d.pretrain_offline_docs, seed=d.seed)
        return ListCorpus(docs, f"offline corpus '{d.pretrain_offline_corpus}' ({d.pretrain_offline_docs} documents)")
    if not Path(d.pretrain_text).exists():
        raise ConfigError(f"data.pretrain_text: {d.pretrain_text} does not exist (expected a text / jsonl file or "
                          "a folder written by tools/convert_c4.py)")
    return TextCorpus(d.pretrain_text)


def preflight(cfg) -> None:
    """What the pipeline checks before any stage runs (hours before stage 1 would otherwise find out)."""
    if cfg.pretrain.enabled:
        corpus_of(cfg.data)


class PretrainBatches:
    """Global micro batch g = the documents in corpus slots [g * size, (g + 1) * size), streamed (DocumentBlocks),
    each cut into HINT's (a, b, c) with its own seeded generator: segment a is the document's instruction."""

    def __init__(self, data_cfg, tokenizer, arch: str, *, micro_batch_size: int, seed: int, after_prefix: bool):
        d = data_cfg
        if len(d.pretrain_segment_lengths) != 3:
            raise ConfigError(f"data.pretrain_segment_lengths: expected 3 lengths (a, b, c), got "
                              f"{d.pretrain_segment_lengths}")
        self.blocks = DocumentBlocks(corpus_of(d), micro_batch_size)
        self.tokenizer, self.arch, self.lengths, self.seed = tokenizer, arch, d.pretrain_segment_lengths, d.seed
        self.bos = [tokenizer.bos_token_id] if arch == "llama" and tokenizer.bos_token_id is not None else []
        # A LLaMA student with fusion reads its input after the instruction's prefix, which already starts with bos:
        # the input then carries none (one bos in [bos a ; b c], as collate.encode_student_input does for tasks).
        self.input_bos = [] if after_prefix else self.bos
        self.eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        if not self.eos:
            raise DataError("pretraining needs a tokenizer with an eos token (targets end with it)")
        self.pad = pad_id(tokenizer)

    def _split(self, slot: int, text: str) -> Optional[tuple[list[int], list[int], list[int]]]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) < 3:
            return None
        return hint_split(ids, self.lengths, random.Random(f"pretrain_split:{self.seed}:{slot}"))

    def batch(self, position: int) -> TrainBatch:
        docs = [(slot, self._split(slot, text)) for slot, text in self.blocks.block(position)]
        ex = [(slot, abc) for slot, abc in docs if abc is not None]
        weight = 1
        if not ex:  # a block of empty / too short documents: one row that every rank still runs, with no loss
            slot, text = next((s, t) for s, t in self.blocks.block(0) + self.blocks.block(1) if self._split(s, t))
            ex, weight = [(slot, self._split(slot, text))], 0
        # The instruction row is segment a with the tokenizer's own framing (T5: + eos; LLaMA: bos +).
        instr = [self.bos + a + (self.eos if self.arch == "t5" else []) for _, (a, _, _) in ex]
        if self.arch == "t5":
            inputs = [b + self.eos for _, (_, b, _) in ex]
            targets = [c + self.eos if weight else [IGNORE] * len(c + self.eos) for _, (_, _, c) in ex]
            input_ids, labels, mask_rows = pad_rows(inputs, self.pad), pad_rows(targets, IGNORE), inputs
        else:
            seqs = [self.input_bos + b + c + self.eos for _, (_, b, c) in ex]
            labels = [[IGNORE] * (len(self.input_bos) + len(b)) + (c + self.eos if weight else [IGNORE] * len(c + self.eos))
                      for _, (_, b, c) in ex]
            input_ids, labels, mask_rows = pad_rows(seqs, self.pad), pad_rows(labels, IGNORE), seqs
        instr_ids, instr_mask = bucket_instructions(pad_rows(instr, self.pad), pad_rows([[1] * len(r) for r in instr], 0),
                                                    self.pad)
        names = [f"doc{slot}" for slot, _ in ex]
        return TrainBatch(task_index=torch.arange(len(ex), dtype=torch.long),
                          task_ids=torch.arange(len(ex), dtype=torch.long), input_ids=input_ids,
                          attention_mask=pad_rows([[1] * len(r) for r in mask_rows], 0), labels=labels,
                          instr_ids=instr_ids, instr_mask=instr_mask, task_names=names, instance_ids=names)


def build_stage(cfg, setup: StudentSetup, record: Optional[dict]) -> StageSpec:
    """Stage 1's description around a set-up student: the documents' batches and the CE loss."""
    paths = RunPaths.of(cfg)
    batches = PretrainBatches(cfg.data, setup.tokenizer, setup.arch, micro_batch_size=cfg.pretrain.micro_batch_size,
                              seed=cfg.seed, after_prefix=cfg.hypernet.fusion)
    return hypernet_stage(setup, name=STAGE, out_dir=paths.pretrain, tb_dir=paths.tb(STAGE), loop=cfg.pretrain,
                          record=record, batches=batches, loss=ce_loss,
                          summary={"corpus": str(batches.blocks.corpus.path)})


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
