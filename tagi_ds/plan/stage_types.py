"""What a stage's plan is made of: named parts (bytes on the GPU, in host memory or on disk) grouped in phases,
plus counts (forwards before the first optimizer step, ZeRO traffic) and the FLOPs that the time estimate uses.

A phase is a moment of the stage (load, a micro batch's instruction pass, a training step, one evaluated method);
the peak of a place (GPU or host) is the largest phase total there. On a CPU-only machine the "GPU" parts live in
host memory too, so `cpu_device_peak` (what `bench/scale_sim.py` compares with a process's peak RSS) is the largest
phase total of both.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from .data_summary import DataFacts
from .shapes import ModelFacts, Shape

Where = Literal["gpu", "host", "disk"]


@dataclass
class Part:
    name: str
    bytes: int
    where: Where
    knob: str = ""  # the config key that shrinks it ("" = none in the config today)
    code: str = ""  # the function in structures.py / the code it models
    cpu_alias: bool = False  # on a CPU device this is the same memory as a host part of its phase (.to is a no-op)

    def to_dict(self) -> dict:
        return {"name": self.name, "bytes": int(self.bytes), "where": self.where, "knob": self.knob, "code": self.code,
                **({"cpu_alias": True} if self.cpu_alias else {})}


@dataclass
class Phase:
    name: str
    parts: list[Part]

    def total(self, where: str) -> int:
        return sum(p.bytes for p in self.parts if p.where == where)

    def cpu_total(self) -> int:
        """GPU and host parts together, as one process on a CPU device holds them (aliases counted once)."""
        return sum(p.bytes for p in self.parts if p.where != "disk" and not p.cpu_alias)


@dataclass
class StagePlan:
    stage: str
    runs: bool  # the config runs this stage
    layout: str  # how it runs: "ZeRO-3 over W ranks", "array: one GPU per unit", "one GPU"
    processes: int  # processes at once (ranks, or array elements)
    phases: list[Phase] = field(default_factory=list)
    disk: list[Part] = field(default_factory=list)
    first_step_forwards: Optional[int] = None  # backbone forwards before the first optimizer step (per process)
    gather_bytes_per_step: int = 0  # ZeRO bytes each rank receives per optimizer step (3: gathers; 1/2: gradients)
    flops: float = 0.0  # whole stage, all processes
    decode_steps: int = 0  # greedy decoding steps (memory-bound: weights read once per step)
    decode_weight_bytes: int = 0
    decode_layers: int = 0  # decoder layers a decoding step runs through (its launch-bound floor, report.py)
    steps: int = 0
    notes: list[str] = field(default_factory=list)

    def peak(self, where: str) -> tuple[int, str]:
        """(bytes, phase name) of the largest phase total at `where`."""
        best = max(self.phases, key=lambda ph: ph.total(where), default=None)
        return (best.total(where), best.name) if best is not None else (0, "")

    @property
    def cpu_device_peak(self) -> int:
        return max((ph.cpu_total() for ph in self.phases), default=0)

    @property
    def disk_bytes(self) -> int:
        return sum(p.bytes for p in self.disk)


@dataclass
class Ctx:
    """Everything a stage's formulas read: the config, model and data facts, and the machine layout."""

    cfg: object
    mf: ModelFacts
    df: DataFacts
    nodes: int
    gpus_per_node: int
    prefetch: int  # stage3_prefetch_bucket_size (elements)

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def cuda(self) -> bool:
        return self.cfg.device != "cpu"

    @property
    def attn(self) -> str:
        """backbone.attn_implementation as the activation formula reads it: "eager", or "sdpa" (transformers 5's
        default for T5 and LLaMA; flash_attention_2 keeps no s x s tensor either)."""
        return "eager" if self.cfg.backbone.attn_implementation == "eager" else "sdpa"

    def distinct_instances(self) -> tuple[int, float]:
        """(instances held by the loaded splits, chars per instance): the seen split shares the training
        instances, except in the synthetic suite (held-back instances of their own)."""
        sp = self.df.splits
        keys = [k for k in sp if k != "seen" or self.df.source == "synthetic"]
        n = sum(sp[k].instances for k in keys)
        chars = sum(sp[k].instances * sp[k].chars_per_instance for k in keys) / max(1, n)
        return n, chars


# ------------------------------------------------------------------------------------------------ FLOPs
def layer_linear_params(sh: Shape) -> tuple[int, int]:
    """(per encoder layer, per decoder layer) weights a token multiplies through (T5 decoder: + cross-attention)."""
    ffn = (3 if sh.ffn_saved in (4, 7) else 2) * sh.hidden * sh.ffn
    attn = 2 * sh.hidden * sh.attn_width + 2 * sh.hidden * sh.kv_width
    if sh.arch == "t5":
        return attn + ffn, 2 * attn + ffn
    return 0, attn + ffn


def forward_flops(mf: ModelFacts, rows: int, s_enc: int, s_dec: int, cross: int = 0, prefix: int = 0,
                  logits_positions: Optional[int] = None) -> float:
    """2 FLOPs per multiply-add: linear layers, attention scores and context, the LM head.
    T5: encoder over s_enc, decoder over s_dec attending to `cross` (default s_enc) keys; LLaMA: s_dec tokens over
    prefix + s_dec keys (s_enc unused). `logits_positions` (per row) defaults to s_dec."""
    sh = mf.shape
    enc_l, dec_l = layer_linear_params(sh)
    a = sh.attn_width
    lp = s_dec if logits_positions is None else logits_positions
    f = 2.0 * rows * lp * sh.hidden * sh.vocab
    if sh.arch == "t5":
        cross = cross or s_enc
        f += sh.enc_layers * rows * (2.0 * enc_l * s_enc + 4.0 * s_enc * s_enc * a)
        f += sh.dec_layers * rows * (2.0 * dec_l * s_dec + 4.0 * s_dec * (s_dec + cross) * a)
    else:
        f += sh.dec_layers * rows * (2.0 * dec_l * s_dec + 4.0 * s_dec * (s_dec + prefix) * a)
    return f


def train_flops(fwd: float, checkpointing: bool) -> float:
    """Forward + backward through a frozen backbone (gradients w.r.t. activations only: ~1x the forward; LoRA and
    the hypernetwork are small) + the recompute under activation checkpointing."""
    return fwd * (3.0 if checkpointing else 2.0)


def decode_flops(mf: ModelFacts, rows: int, src: int, new: int, prefix: int = 0) -> float:
    """Greedy decoding: the prompt's forward (T5: encoder; LLaMA: prefill, logits of the last position only) and
    `new` one-token steps attending to the cache."""
    if mf.arch == "t5":
        f = forward_flops(mf, rows, src, 0, logits_positions=0)
        f += new * forward_flops(mf, rows, 0, 1, cross=src + prefix)
        return f
    f = forward_flops(mf, rows, 0, src, prefix=prefix, logits_positions=1)
    f += new * forward_flops(mf, rows, 0, 1, prefix=prefix + src + new // 2)
    return f


def train_phases(label: str, persistent: list[Part], act: dict, ckpt: bool, logits: Part, knob: str,
                 both: list[Part] = (), backward_only: list[Part] = ()) -> list[Phase]:
    """One training micro batch as its two peaks. End of the forward: every kept activation + the logits and the
    loss's copies. Backward: autograd frees a node's saved tensors once its backward ran, so the logits' tensors are
    gone when the layers are reached; then one layer's activations (recomputed under checkpointing) and their
    gradients live together. `both`: parts alive in both (adapters, prefix copies); `persistent`: the model."""
    kept = act["layers_ckpt"] - act["one_layer"] if ckpt else act["layers_no_ckpt"]
    name = "activations kept (layer inputs: checkpointed)" if ckpt else "activations kept (no checkpointing)"
    kept_part = Part(name, kept, "gpu", knob, "activations.activation_bytes")
    layer = Part("backward: one layer recomputed + its gradients" if ckpt else "backward: one layer's gradients",
                 act["one_layer"] * (2 if ckpt else 1), "gpu", knob, "activations.activation_bytes one_layer")
    return [Phase(f"{label}: forward + loss", persistent + [kept_part, logits, *both]),
            Phase(f"{label}: backward", persistent + [kept_part, layer, *both, *backward_only])]
