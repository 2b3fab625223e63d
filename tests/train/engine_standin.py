"""A tiny stand-in for the TAGI student, for engine tests only: a frozen tiny T5 / LLaMA (random weights, from a
transformers config) plus a small trainable hypernetwork that emits a per-example LoRA for q and v, added by forward
hooks (y = base(x) + s·B(Ax); weights are never swapped, which ZeRO-3 would not survive).

The model's forward returns (loss_sum, n_tokens) so the engine's `global_token_mean` can weight by tokens.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tagi_ds.kernels.reference import segmented_lora

VOCAB = 256
PAD, EOS, SEP = 0, 1, 2
N_TASKS = 4
GLOBAL_BATCH = 4  # examples per optimizer step over all ranks


def tiny_config(arch: str):
    if arch == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                           pad_token_id=PAD, bos_token_id=SEP, eos_token_id=EOS, tie_word_embeddings=False,
                           attention_dropout=0.0)
    if arch == "t5":
        from transformers import T5Config

        return T5Config(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2,
                        num_heads=4, dropout_rate=0.0, pad_token_id=PAD, eos_token_id=EOS,
                        decoder_start_token_id=PAD, tie_word_embeddings=False)
    raise ValueError(arch)


def model_class(arch: str):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    return AutoModelForCausalLM if arch == "llama" else AutoModelForSeq2SeqLM


def save_backbone(arch: str, out_dir: Path, seed: int = 0) -> Path:
    """Random tiny backbone saved with save_pretrained, so every run (ZeRO-2/3, one process) loads the same one."""
    torch.manual_seed(seed)
    model = model_class(arch).from_config(tiny_config(arch))
    model.save_pretrained(out_dir)
    return out_dir


def lora_targets(arch: str, backbone: nn.Module) -> list[str]:
    suffixes = (".q_proj", ".v_proj") if arch == "llama" else (".q", ".v")
    return [n for n, m in backbone.named_modules() if isinstance(m, nn.Linear) and n.endswith(suffixes)]


class TinyHyper(nn.Module):
    """task id → per-example (A (r, d_in), B (d_out, r)) for every target module."""

    def __init__(self, n_targets: int, d_in: int, d_out: int, r: int = 4, emb: int = 16, hidden: int = 32):
        super().__init__()
        self.r, self.d_in, self.d_out = r, d_in, d_out
        self.task_emb = nn.Embedding(N_TASKS, emb)
        self.trunk = nn.Sequential(nn.Linear(emb, hidden), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(hidden, r * d_in + d_out * r) for _ in range(n_targets))
        with torch.no_grad():
            for h in self.heads:
                h.weight.mul_(0.3)

    def forward(self, task_ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        h = self.trunk(self.task_emb(task_ids))  # (N, hidden)
        out = []
        for head in self.heads:  # called as modules so ZeRO-3 gathers their weights
            flat = head(h)  # (N, r*d_in + d_out*r)
            a = flat[:, : self.r * self.d_in].reshape(-1, self.r, self.d_in)  # (N, r, d_in)
            b = flat[:, self.r * self.d_in:].reshape(-1, self.d_out, self.r)  # (N, d_out, r)
            out.append((a, b))
        return out


class StandIn(nn.Module):
    def __init__(self, arch: str, backbone: nn.Module, hyper_seed: int = 0, alpha: float = 8.0):
        super().__init__()
        self.arch = arch
        self.backbone = backbone.requires_grad_(False)
        self.targets = lora_targets(arch, backbone)
        cfg = backbone.config
        d = cfg.hidden_size if arch == "llama" else cfg.d_model
        torch.manual_seed(hyper_seed)
        self.hyper = TinyHyper(len(self.targets), d, d)
        self.scale = alpha / self.hyper.r
        self._active: list | None = None
        modules = dict(backbone.named_modules())
        for i, name in enumerate(self.targets):
            modules[name].register_forward_hook(self._make_hook(i))

    def _make_hook(self, i: int):
        def hook(_mod: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
            if self._active is None:
                return out
            a, b = self._active[i]
            x = args[0]  # (N, T, d_in)
            rows = torch.arange(x.shape[0], device=x.device)
            return out + segmented_lora(x, a, b, rows, self.scale)  # (N, T, d_out)
        return hook

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        # Kept after the forward on purpose: activation checkpointing re-runs the hooks during backward, and they
        # must add the same LoRA terms then (clearing it here breaks recomputation). The next forward replaces it.
        self._active = self.hyper(batch["task_ids"])
        if self.arch == "llama":
            logits = self.backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            logits, labels = logits[:, :-1], batch["labels"][:, 1:]
        else:
            dec_in = self.backbone._shift_right(batch["labels"])
            logits = self.backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                   decoder_input_ids=dec_in).logits
            labels = batch["labels"]
        loss_sum = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                                   ignore_index=-100, reduction="sum")
        return loss_sum, (labels != -100).sum()


def _examples(step: int, seed: int) -> list[tuple[int, list[int], list[int]]]:
    """The global batch of `step`: 4 fixed batches cycled (so a tiny model can fit them and the loss falls)."""
    g = torch.Generator().manual_seed(seed * 1000 + step % 4)
    out = []
    for _ in range(GLOBAL_BATCH):
        task = int(torch.randint(0, N_TASKS, (1,), generator=g))
        n_in = int(torch.randint(4, 10, (1,), generator=g))
        n_t = int(torch.randint(2, 7, (1,), generator=g))  # varying target lengths: token weighting matters
        src = torch.randint(3, VOCAB, (n_in,), generator=g).tolist()
        tgt = [3 + (s - 3 + 7 * task) % (VOCAB - 3) for s in src[:n_t]]
        out.append((task, src, tgt))
    return out


def make_batch(arch: str, step: int, rank: int, world: int, seed: int = 0) -> dict:
    """This rank's contiguous slice of the global batch, right-padded."""
    ex = _examples(step, seed)
    per = GLOBAL_BATCH // world
    ex = ex[rank * per:(rank + 1) * per]
    if arch == "llama":
        seqs = [src + [SEP] + tgt + [EOS] for _, src, tgt in ex]
        labs = [[-100] * (len(src) + 1) + tgt + [EOS] for _, src, tgt in ex]
        n = max(map(len, seqs))
        ids = torch.tensor([s + [PAD] * (n - len(s)) for s in seqs])
        labels = torch.tensor([lab + [-100] * (n - len(lab)) for lab in labs])
        mask = torch.tensor([[1] * len(s) + [0] * (n - len(s)) for s in seqs])
    else:
        n = max(len(src) for _, src, _ in ex)
        m = max(len(tgt) + 1 for _, _, tgt in ex)
        ids = torch.tensor([src + [PAD] * (n - len(src)) for _, src, _ in ex])
        mask = torch.tensor([[1] * len(src) + [0] * (n - len(src)) for _, src, _ in ex])
        labels = torch.tensor([tgt + [EOS] + [-100] * (m - len(tgt) - 1) for _, _, tgt in ex])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "task_ids": torch.tensor([t for t, _, _ in ex])}
