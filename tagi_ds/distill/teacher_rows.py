"""What a logit-cache shard stores per label position, for each cache mode, and the one pure function that makes it.

Three modes (`CacheMode.name`), all taken from p = softmax(teacher_logits / T) over the full vocabulary:

  topk      the k most likely ids and their log p (the historical cache). Exact for what it keeps, but every KL
            built on it is biased: the mass outside the k ids is unknown (see sparse_kl.py).
  sampled   N i.i.d. draws from p (Anshumann et al., ACL 2025, "Sparse Logit Sampling", RS-KD with proposal q = p):
            the distinct drawn ids, how often each was drawn and their log p. Slot j estimates p by
            w_j = count_j / N (Hansen-Hurwitz), an unbiased estimate: E[w] = p.
  priority  priority sampling (Duffield, Lund, Thorup 2007) of k ids with weights p: each id gets a key
            p_i / u_i (u_i ~ U(0, 1]), the k largest keys are kept and tau = the (k+1)-th key is stored. Slot j
            estimates p by w_j = max(p_j, tau), again unbiased, and ids with p_j >= tau (the teacher's head) are
            estimated exactly: it is an exact top head plus a sampled tail whose split adapts to each position.

Every mode also stores log p at its ids, which makes the KL value (not only its gradient) estimable:
KL = sum_i p_i (log p_i - log q_i) is estimated by sum_j w_j (log p_j - log q_j) (sampled_kl.py).

Sampling is seeded per (seed, task, instance) (`instance_generator`), so a rebuilt shard holds the same draws on the
same device type (CPU and CUDA random streams differ).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Optional

import numpy as np
import torch

from ..errors import ArtifactMismatchError

ModeName = Literal["topk", "sampled", "priority"]
MODES: tuple[str, ...] = ("topk", "sampled", "priority")
LOGPROB_DTYPE = np.dtype(np.float16)
THRESHOLD_DTYPE = np.dtype(np.float32)  # log tau: a float16 tau would bias every tail weight by its rounding


def ids_dtype(vocab_size: int) -> np.dtype:
    """uint16 holds ids < 65536; bigger vocabularies (LLaMA-3: 128k) need int32."""
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.int32)


def counts_dtype(num_samples: int) -> np.dtype:
    return np.dtype(np.uint8) if num_samples <= 255 else np.dtype(np.uint16)


@dataclass(frozen=True)
class CacheMode:
    """A cache mode and its parameters: `width` slots per label position (k, or N draws)."""

    name: str
    width: int
    seed: Optional[int] = None  # sampled / priority: the seed every instance's generator derives from

    @staticmethod
    def make(name: str = "topk", *, k: Optional[int] = None, num_samples: Optional[int] = None,
             seed: Optional[int] = None, vocab_size: Optional[int] = None) -> "CacheMode":
        """Validated mode. topk: k; sampled: num_samples and seed; priority: k and seed."""
        if name not in MODES:
            raise ValueError(f"cache mode {name!r}: expected one of {MODES}")
        if name == "sampled":
            if k is not None:
                raise ValueError("cache mode 'sampled' takes num_samples (draws per position), not k")
            width = num_samples
        else:
            if num_samples is not None:
                raise ValueError(f"cache mode {name!r} takes k, not num_samples")
            width = k
        if width is None or int(width) < 1:
            raise ValueError(f"cache mode {name!r}: {'num_samples' if name == 'sampled' else 'k'}={width} must be >= 1")
        if name != "sampled" and vocab_size is not None and width > vocab_size:
            raise ValueError(f"cache mode {name!r}: k={width} must be in [1, vocab_size={vocab_size}]")
        if name == "sampled" and width > 65535:
            raise ValueError(f"cache mode 'sampled': num_samples={width} must be <= 65535")
        if name != "topk" and seed is None:
            raise ValueError(f"cache mode {name!r} draws at random: give it a seed")
        return CacheMode(name, int(width), None if name == "topk" else int(seed))

    @staticmethod
    def of_config(name: str, *, top_k: int, num_samples: int, seed: int, vocab_size: int) -> "CacheMode":
        """The mode a run config asks for, every parameter given and the irrelevant ones dropped (k capped at the
        vocabulary): what a cache stage and the finetune's expected manifest both call."""
        if name == "sampled":
            return CacheMode.make(name, num_samples=num_samples, seed=seed, vocab_size=vocab_size)
        return CacheMode.make(name, k=min(int(top_k), int(vocab_size)), seed=None if name == "topk" else seed,
                              vocab_size=vocab_size)

    def fields(self) -> dict[str, Any]:
        """The manifest fields of this mode (a reader compares them with what it expects)."""
        if self.name == "topk":
            return {"mode": "topk", "k": self.width}
        key = "num_samples" if self.name == "sampled" else "k"
        return {"mode": self.name, key: self.width, "sample_seed": self.seed}

    @staticmethod
    def from_manifest(manifest: Mapping[str, Any], where: str = "manifest") -> "CacheMode":
        name = manifest.get("mode", "topk")  # shards written before modes existed are top-k
        key = "num_samples" if name == "sampled" else "k"
        if name not in MODES or key not in manifest:
            raise ArtifactMismatchError(f"{where}: cache mode {name!r} with fields {sorted(manifest)}: expected a "
                                        f"mode in {MODES} and its '{key}'")
        return CacheMode(name, int(manifest[key]), manifest.get("sample_seed"))

    def layout(self, vocab_size: int) -> dict[str, tuple[np.dtype, int]]:
        """Per-row arrays of a shard: name -> (storage dtype, columns). Each is a file `<name>.bin`."""
        out = {"logprobs": (LOGPROB_DTYPE, self.width), "ids": (ids_dtype(vocab_size), self.width)}
        if self.name == "sampled":
            out["counts"] = (counts_dtype(self.width), self.width)
        if self.name == "priority":
            out["threshold"] = (THRESHOLD_DTYPE, 1)
        return out


def instance_seed(seed: int, task: str, instance_id: str) -> int:
    """A 63-bit seed for one instance's draws, stable across processes and Python versions."""
    digest = hashlib.sha256(f"{int(seed)}\0{task}\0{instance_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def instance_generator(seed: int, task: str, instance_id: str, device: torch.device | str = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(instance_seed(seed, task, instance_id))
    return g


def _distinct_counts(draws: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """draws (L, N) ids -> (ids (L, N), counts (L, N)): the distinct ids of each row, most drawn first, padded with
    id 0 / count 0."""
    L, N = draws.shape
    srt, _ = draws.sort(dim=1)  # (L, N)
    new = torch.ones_like(srt, dtype=torch.bool)
    new[:, 1:] = srt[:, 1:] != srt[:, :-1]
    group = new.long().cumsum(1) - 1  # (L, N) slot of each draw
    counts = torch.zeros_like(srt).scatter_add_(1, group, torch.ones_like(srt))
    ids = torch.zeros_like(srt).scatter_(1, group, srt)  # equal draws write the same id
    order = counts.argsort(dim=1, descending=True, stable=True)
    return ids.gather(1, order), counts.gather(1, order)


def _rows(logits: torch.Tensor, mode: CacheMode, temperature: float,
          generator: Optional[torch.Generator]) -> dict[str, torch.Tensor]:
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)  # (L, V)
    L, V = logp.shape
    if mode.name == "topk":
        lp, ids = torch.topk(logp, mode.width, dim=-1, sorted=True)  # (L, k)
        return {"logprobs": lp, "ids": ids}
    if generator is None:
        raise ValueError(f"cache mode {mode.name!r}: a seeded generator is required (instance_generator)")
    if mode.name == "sampled":
        if L == 0:
            empty = torch.zeros(0, mode.width, dtype=torch.long, device=logp.device)
            return {"logprobs": logp.new_zeros(0, mode.width), "ids": empty, "counts": empty}
        draws = torch.multinomial(logp.exp(), mode.width, replacement=True, generator=generator)  # (L, N)
        ids, counts = _distinct_counts(draws)
        lp = logp.gather(1, ids).masked_fill(counts == 0, 0.0)
        return {"logprobs": lp, "ids": ids.masked_fill(counts == 0, 0), "counts": counts}
    # priority: log key = log p - log u, u in (0, 1]; keep the k largest, tau = the (k+1)-th
    u = 1.0 - torch.rand(L, V, generator=generator, device=logp.device, dtype=torch.float32)  # (L, V) in (0, 1]
    keys = logp - torch.log(u)
    k = mode.width
    top, idx = torch.topk(keys, min(k + 1, V), dim=-1, sorted=True)  # (L, k+1)
    ids = idx[:, :k]
    log_tau = top[:, k:k + 1] if k < V else logp.new_full((L, 1), float("-inf"))  # (L, 1)
    return {"logprobs": logp.gather(1, ids), "ids": ids, "threshold": log_tau}


@torch.no_grad()
def encode_rows(logits: torch.Tensor, mode: CacheMode, temperature: float,
                generator: Optional[torch.Generator] = None) -> dict[str, np.ndarray]:
    """Teacher logits (L, V) at one instance's label positions -> the arrays a shard stores for them, in their
    storage dtypes ({"logprobs", "ids"[, "counts"][, "threshold"]}, each (L, columns) as in `mode.layout`).

    `generator` (sampled / priority) must live on the logits' device; `instance_generator` makes the seeded one.
    """
    if logits.dim() != 2:
        raise ValueError(f"encode_rows: expected teacher logits (L, V), got {tuple(logits.shape)}")
    if mode.name != "sampled" and mode.width > logits.shape[1]:
        raise ValueError(f"encode_rows: k={mode.width} exceeds the vocabulary ({logits.shape[1]})")
    rows = _rows(logits.detach(), mode, float(temperature), generator)
    layout = mode.layout(logits.shape[1])
    return {name: np.ascontiguousarray(rows[name].cpu().numpy().astype(dtype)) for name, (dtype, _) in layout.items()}


def encode_instance(logits: torch.Tensor, mode: CacheMode, temperature: float, task: str,
                    instance_id: str) -> dict[str, np.ndarray]:
    """`encode_rows` with the instance's own seeded generator (on the logits' device): what the cache stage stores
    for one instance, the same on every rebuild (on the same device type)."""
    gen = None if mode.seed is None else instance_generator(mode.seed, task, str(instance_id), logits.device)
    return encode_rows(logits, mode, temperature, gen)


def decode_rows(arrays: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Stored arrays -> tensors: float32 for log-probs / threshold, int64 for ids / counts."""
    out = {}
    for name, arr in arrays.items():
        a = np.asarray(arr)
        out[name] = torch.from_numpy(a.astype(np.float32) if name in ("logprobs", "threshold") else a.astype(np.int64))
    return out
