"""Stage 1 `tagi-ds pretrain`: the hypernetwork learns on plain text, split as HINT does (CE only).

Each document is cut once (seeded) into (a, b, c): a is the "instruction" the hypernetwork sees (encoded once, like
every instruction, before training), b the backbone's input, c the target. Each document is its own task, so a
micro batch of `pretrain.micro_batch_size` documents is that many tasks with one instance each.

    torchrun --nproc_per_node 2 -m tagi_ds.cli pretrain --config configs/tiny.yaml pretrain.steps=200
Outputs: <run_dir>/pretrain/{checkpoints/, export/, metrics.jsonl, summary.json, config.yaml}, TensorBoard under
<run_dir>/tb/pretrain.
"""
from __future__ import annotations

import random
from typing import Callable, Optional

import torch

from ..data.collate import pad_rows
from ..data.pretrain_text import OFFLINE_CORPORA, hint_split, load_documents
from ..data.sampler import TaskGroupedSampler
from ..errors import ConfigError, DataError
from ..modeling.tagi import TagiStudent
from .distributed import rank, world_size
from .hypernet_trainer import IGNORE, HypernetTrainer, TrainBatch, ce_sum, label_positions, student_logits
from .run_paths import RunPaths

STAGE = "pretrain"


class PretrainTrainer(HypernetTrainer):
    stage = STAGE

    def __init__(self, cfg, **kw):
        paths = RunPaths.of(cfg)
        super().__init__(cfg, cfg.pretrain, paths.stage_dir(STAGE), paths.tb(STAGE), **kw)

    def micro_batch_size(self) -> int:
        return self.train_cfg.micro_batch_size

    def build_data(self):
        d = self.cfg.data
        if len(d.pretrain_segment_lengths) != 3:
            raise ConfigError(f"data.pretrain_segment_lengths: expected 3 lengths (a, b, c), got "
                              f"{d.pretrain_segment_lengths}")
        docs = (load_documents(d.pretrain_text) if d.pretrain_text
                else OFFLINE_CORPORA[d.pretrain_offline_corpus](d.pretrain_offline_docs, seed=d.seed))
        tok = self.tokenizer
        rng = random.Random(f"pretrain_split:{d.seed}")
        self.examples = []
        for doc in docs:
            ids = tok(doc, add_special_tokens=False)["input_ids"]
            if len(ids) >= 3:
                self.examples.append(hint_split(ids, d.pretrain_segment_lengths, rng))
        if not self.examples:
            raise DataError(f"{d.pretrain_text or 'offline corpus'}: no document has 3 or more tokens")
        bos = [tok.bos_token_id] if self.arch == "llama" and tok.bos_token_id is not None else []
        eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
        if not eos:
            raise DataError("pretraining needs a tokenizer with an eos token (targets end with it)")
        self._bos, self._eos = bos, eos
        # The instruction row is segment a with the tokenizer's own framing (T5: + eos; LLaMA: bos +).
        rows = [bos + a + (eos if self.arch == "t5" else []) for a, _, _ in self.examples]
        t = self.train_cfg
        sampler = TaskGroupedSampler([1] * len(self.examples), t.micro_batch_size, 1, rank=rank(),
                                     world_size=world_size(), seed=self.cfg.seed)
        self.summary["documents"] = len(docs)
        self.summary["examples"] = len(self.examples)
        return rows, sampler

    def make_batch(self, keys: list[tuple[int, int]]) -> TrainBatch:
        pad = self._pad_id()
        index = [t for t, _ in keys]
        ex = [self.examples[i] for i in index]
        instr = [self.instruction_rows[i] for i in index]
        if self.arch == "t5":
            inputs = [b + self._eos for _, b, _ in ex]
            input_ids, labels = pad_rows(inputs, pad), pad_rows([c + self._eos for _, _, c in ex], IGNORE)
            mask_rows = inputs
        else:
            seqs = [self._bos + b + c + self._eos for _, b, c in ex]
            input_ids = pad_rows(seqs, pad)
            labels = pad_rows([[IGNORE] * (len(self._bos) + len(b)) + c + self._eos for _, b, c in ex], IGNORE)
            mask_rows = seqs
        return TrainBatch(task_index=torch.tensor(index, dtype=torch.long),
                          task_ids=torch.arange(len(index), dtype=torch.long), input_ids=input_ids,
                          attention_mask=pad_rows([[1] * len(r) for r in mask_rows], 0), labels=labels,
                          instr_ids=pad_rows(instr, pad), instr_mask=pad_rows([[1] * len(r) for r in instr], 0),
                          task_names=[f"doc{i}" for i in index], instance_ids=[f"doc{i}" for i in index])

    def loss_terms(self, student: TagiStudent, batch: TrainBatch):
        enc = self.encoding_for(student, batch)
        logits, targets, mask = label_positions(student_logits(student, enc, batch), batch.labels, student.arch)
        ce, n = ce_sum(logits, targets, mask)
        return ce, n, {"ce": ce.detach()}


def run(cfg, on_checkpoint: Optional[Callable[[int], None]] = None, show_progress: bool = True):
    """Train stage 1 and write its export; returns the export folder (rank 0) or None (other ranks)."""
    if not cfg.pretrain.enabled:
        return None
    return PretrainTrainer(cfg, on_checkpoint=on_checkpoint, show_progress=show_progress).run()


def main(args) -> int:
    out = run(args.cfg)
    if out is not None:
        print(f"pretrain: hypernetwork export in {out}")
    return 0
