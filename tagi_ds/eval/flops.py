"""Analytic inference cost (forward FLOPs = 2·MACs of the matrix products) per evaluated instance.

What is counted is what `torch.utils.flop_counter.FlopCounterMode` counts: every linear layer, the two attention
products (Q·Kᵀ and P·V, the full rectangle: a causal mask saves nothing in eager or SDPA kernels), and the LM head.
Norms, softmax, activations, embeddings and T5's relative bias are elementwise and left out (a few ‰ of the total).

Generation is greedy with a KV cache, as `generate(max_new_tokens=out)` runs it:
- T5: the encoder runs once over the source; decoder step i = 1..out feeds one token, self-attends over i keys, and
  cross-attends over the source (+ `extra_cross_len` fused instruction states). Cross K/V are projected at step 1 only
  (the fused instruction's: per row at step 1 on the concatenation path, once per task on TagiStudent's cached path).
- LLaMA: prefill of the prompt (lm_head on its last position only, `logits_to_keep=1`) yields token 1, then steps
  i = 1..out-1 feed one token each over prefix + prompt + i keys. A prefix of P cached keys (KV reuse, TAGI fusion)
  is attended to but never recomputed. GQA: K/V projections have num_key_value_heads·head_dim outputs.

Method costs (`per_instance_flops`) amortise what runs once per task (instruction encoding, hypernetwork, LoRA merge,
instruction K/V) over the task's n instances: the saving TAGI claims over Tk-Instruct's "instruction + input, every
instance". Module names are the HF ones (`q`, `wi_0`, `q_proj`, …), i.e. the names PEFT's target_modules use.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Literal, Mapping, Optional, Sequence

from tagi_ds.errors import ConfigError

Arch = Literal["t5", "llama"]
Method = Literal["tk_instruct", "no_instruction", "tagi", "tagi_no_fusion", "tk_instruct_kv_reuse"]

# Report method keys -> the cost model that describes how they run at inference.
METHOD_COST_KIND: dict[str, str] = {
    "no_ft": "tk_instruct",            # the untouched backbone, fed the full Tk-Instruct prompt
    "tk_instruct": "tk_instruct",
    "teacher": "tk_instruct",          # per-task LoRA (merged) on the full prompt
    "no_instruction": "no_instruction",
    "hint": "tagi",                    # instruction encoded once, decoder fuses its states (HINT)
    "tagi": "tagi",
    "tagi_no_kl": "tagi",
    "tagi_no_ins": "tagi",
    "tagi_no_pretrain": "tagi",
    "tagi_no_fusion": "tagi_no_fusion",
    "tk_instruct_kv_reuse": "tk_instruct_kv_reuse",
}


# ------------------------------------------------------------------------------------------------ config shapes
@dataclass(frozen=True)
class T5Shape:
    d_model: int
    d_kv: int
    num_heads: int
    num_layers: int           # encoder layers
    num_decoder_layers: int
    d_ff: int
    vocab_size: int
    gated: bool               # v1.1 / flan: wi_0, wi_1, wo; original T5: wi, wo

    @property
    def inner(self) -> int:
        return self.num_heads * self.d_kv


@dataclass(frozen=True)
class LlamaShape:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int


def _need(cfg: Mapping[str, Any], key: str, arch: str) -> Any:
    if key not in cfg or cfg[key] is None:
        raise ConfigError(f"{arch} FLOPs model: backbone config has no {key!r} (got keys {sorted(cfg)[:12]}…)")
    return cfg[key]


def t5_shape(cfg: Mapping[str, Any]) -> T5Shape:
    """From a HF T5Config dict (`config.to_dict()`)."""
    n_enc = int(_need(cfg, "num_layers", "t5"))
    ff_proj = str(cfg.get("feed_forward_proj", "relu"))
    return T5Shape(
        d_model=int(_need(cfg, "d_model", "t5")), d_kv=int(_need(cfg, "d_kv", "t5")),
        num_heads=int(_need(cfg, "num_heads", "t5")), num_layers=n_enc,
        num_decoder_layers=int(cfg.get("num_decoder_layers") or n_enc), d_ff=int(_need(cfg, "d_ff", "t5")),
        vocab_size=int(_need(cfg, "vocab_size", "t5")),
        gated=bool(cfg.get("is_gated_act", ff_proj.startswith("gated"))),
    )


def llama_shape(cfg: Mapping[str, Any]) -> LlamaShape:
    """From a HF LlamaConfig-like dict (also Mistral/Qwen2 field names)."""
    hidden = int(_need(cfg, "hidden_size", "llama"))
    heads = int(_need(cfg, "num_attention_heads", "llama"))
    return LlamaShape(
        hidden_size=hidden, num_layers=int(_need(cfg, "num_hidden_layers", "llama")), num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or hidden // heads),
        intermediate_size=int(_need(cfg, "intermediate_size", "llama")),
        vocab_size=int(_need(cfg, "vocab_size", "llama")),
    )


# ------------------------------------------------------------------------------------------------ accumulator
@dataclass
class _Acc:
    """Sums matmul FLOPs; an unmerged LoRA on a target module adds x·Aᵀ (r·d_in) and ·Bᵀ (d_out·r) per token."""

    lora_rank: int = 0
    lora_targets: frozenset = field(default_factory=frozenset)
    total: int = 0

    def linear(self, module: str, tokens: int, d_in: int, d_out: int) -> None:
        self.total += 2 * tokens * d_in * d_out
        if self.lora_rank and module in self.lora_targets:
            self.total += 2 * tokens * self.lora_rank * (d_in + d_out)

    def attention(self, heads: int, q_len: int, k_len: int, d_head: int) -> None:
        self.total += 2 * 2 * heads * q_len * k_len * d_head  # Q·Kᵀ and P·V


def _t5_ff(acc: _Acc, s: T5Shape, tokens: int) -> None:
    if s.gated:
        acc.linear("wi_0", tokens, s.d_model, s.d_ff)
        acc.linear("wi_1", tokens, s.d_model, s.d_ff)
    else:
        acc.linear("wi", tokens, s.d_model, s.d_ff)
    acc.linear("wo", tokens, s.d_ff, s.d_model)


def _t5_encoder(acc: _Acc, s: T5Shape, n: int) -> None:
    for _ in range(s.num_layers):
        for m in ("q", "k", "v"):
            acc.linear(m, n, s.d_model, s.inner)
        acc.attention(s.num_heads, n, n, s.d_kv)
        acc.linear("o", n, s.inner, s.d_model)
        _t5_ff(acc, s, n)


def _t5_decoder_pass(acc: _Acc, s: T5Shape, q_len: int, self_keys: int, cross_keys: int) -> None:
    """One decoder call on q_len new tokens; cross K/V projections are counted separately."""
    for _ in range(s.num_decoder_layers):
        for m in ("q", "k", "v"):
            acc.linear(m, q_len, s.d_model, s.inner)
        acc.attention(s.num_heads, q_len, self_keys, s.d_kv)
        acc.linear("o", q_len, s.inner, s.d_model)
        acc.linear("q", q_len, s.d_model, s.inner)          # cross-attention query
        acc.attention(s.num_heads, q_len, cross_keys, s.d_kv)
        acc.linear("o", q_len, s.inner, s.d_model)
        _t5_ff(acc, s, q_len)
    acc.linear("lm_head", q_len, s.d_model, s.vocab_size)


def _t5_cross_kv(acc: _Acc, s: T5Shape, n_states: int) -> None:
    for _ in range(s.num_decoder_layers):
        acc.linear("k", n_states, s.d_model, s.inner)
        acc.linear("v", n_states, s.d_model, s.inner)


def _acc(lora_rank: int, lora_targets: Iterable[str]) -> _Acc:
    return _Acc(lora_rank=int(lora_rank), lora_targets=frozenset(lora_targets))


def t5_encoder_flops(cfg: Mapping[str, Any], src_len: int, lora_rank: int = 0, lora_targets: Iterable[str] = ()) -> int:
    acc = _acc(lora_rank, lora_targets)
    _t5_encoder(acc, t5_shape(cfg), src_len)
    return acc.total


def t5_cross_kv_flops(cfg: Mapping[str, Any], n_states: int, lora_rank: int = 0,
                      lora_targets: Iterable[str] = ()) -> int:
    """K/V projections of n encoder states in every decoder cross-attention (the instruction's: once per task on
    TagiStudent's cached path), with an unmerged LoRA's products when k / v are targets."""
    acc = _acc(lora_rank, lora_targets)
    _t5_cross_kv(acc, t5_shape(cfg), n_states)
    return acc.total


def t5_forward_flops(cfg: Mapping[str, Any], src_len: int, tgt_len: int, lora_rank: int = 0,
                     lora_targets: Iterable[str] = ()) -> int:
    """One teacher-forced forward (training / rank classification): encoder on src, decoder on tgt, lm_head on tgt."""
    s, acc = t5_shape(cfg), _acc(lora_rank, lora_targets)
    _t5_encoder(acc, s, src_len)
    _t5_cross_kv(acc, s, src_len)
    _t5_decoder_pass(acc, s, tgt_len, tgt_len, src_len)
    return acc.total


def t5_flops(cfg: Mapping[str, Any], src_len: int, out_len: int, extra_cross_len: int = 0,
             extra_kv_projected: bool = True, lora_rank: int = 0, lora_targets: Iterable[str] = ()) -> int:
    """Greedy generation of out_len tokens with KV cache.

    extra_cross_len: fused instruction states the decoder also cross-attends to (TAGI/HINT fusion); their K/V
    projections are counted here when `extra_kv_projected`, else they are assumed cached once per task.
    """
    s, acc = t5_shape(cfg), _acc(lora_rank, lora_targets)
    _t5_encoder(acc, s, src_len)
    _t5_cross_kv(acc, s, src_len + (extra_cross_len if extra_kv_projected else 0))
    for i in range(1, out_len + 1):
        _t5_decoder_pass(acc, s, 1, i, src_len + extra_cross_len)
    return acc.total


def _llama_pass(acc: _Acc, s: LlamaShape, q_len: int, past: int, logits_len: int) -> None:
    """One decoder call on q_len new tokens after `past` cached ones; lm_head on the last logits_len positions."""
    q_out, kv_out = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
    for _ in range(s.num_layers):
        acc.linear("q_proj", q_len, s.hidden_size, q_out)
        acc.linear("k_proj", q_len, s.hidden_size, kv_out)
        acc.linear("v_proj", q_len, s.hidden_size, kv_out)
        acc.attention(s.num_heads, q_len, past + q_len, s.head_dim)  # GQA repeats K/V: every query head scores
        acc.linear("o_proj", q_len, q_out, s.hidden_size)
        acc.linear("gate_proj", q_len, s.hidden_size, s.intermediate_size)
        acc.linear("up_proj", q_len, s.hidden_size, s.intermediate_size)
        acc.linear("down_proj", q_len, s.intermediate_size, s.hidden_size)
    acc.linear("lm_head", logits_len, s.hidden_size, s.vocab_size)


def llama_forward_flops(cfg: Mapping[str, Any], seq_len: int, prefix_len: int = 0, logits_len: Optional[int] = None,
                        lora_rank: int = 0, lora_targets: Iterable[str] = ()) -> int:
    """One forward on seq_len tokens after a cached prefix; lm_head on logits_len positions (default: all)."""
    acc = _acc(lora_rank, lora_targets)
    _llama_pass(acc, llama_shape(cfg), seq_len, prefix_len, seq_len if logits_len is None else logits_len)
    return acc.total


def llama_flops(cfg: Mapping[str, Any], prompt_len: int, out_len: int, prefix_len: int = 0, lora_rank: int = 0,
                lora_targets: Iterable[str] = ()) -> int:
    """Greedy generation of out_len tokens: prefill of prompt_len after a cached prefix of prefix_len, then steps."""
    s, acc = llama_shape(cfg), _acc(lora_rank, lora_targets)
    if out_len <= 0:
        return 0
    _llama_pass(acc, s, prompt_len, prefix_len, 1)
    for i in range(1, out_len):
        _llama_pass(acc, s, 1, prefix_len + prompt_len + i - 1, 1)
    return acc.total


# ------------------------------------------------------------------------------------------------ LoRA shapes
def lora_module_shapes(arch: Arch, cfg: Mapping[str, Any], targets: Iterable[str]) -> list[tuple[str, int, int]]:
    """(module, d_in, d_out) for every adapted linear in the backbone (all layers, encoder and decoder)."""
    targets = set(targets)
    mods: list[tuple[str, int, int]]
    if arch == "t5":
        s = t5_shape(cfg)
        ff = [("wi_0", s.d_model, s.d_ff), ("wi_1", s.d_model, s.d_ff)] if s.gated else [("wi", s.d_model, s.d_ff)]
        ff.append(("wo", s.d_ff, s.d_model))
        attn = [("q", s.d_model, s.inner), ("k", s.d_model, s.inner), ("v", s.d_model, s.inner),
                ("o", s.inner, s.d_model)]
        per_enc = attn + ff
        per_dec = attn + attn + ff  # self- and cross-attention share the names q/k/v/o
        mods = per_enc * s.num_layers + per_dec * s.num_decoder_layers
    elif arch == "llama":
        s = llama_shape(cfg)
        q, kv = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
        h, f = s.hidden_size, s.intermediate_size
        mods = [("q_proj", h, q), ("k_proj", h, kv), ("v_proj", h, kv), ("o_proj", q, h), ("gate_proj", h, f),
                ("up_proj", h, f), ("down_proj", f, h)] * s.num_layers
    else:
        raise ConfigError(f"FLOPs model: arch must be 't5' or 'llama', got {arch!r}")
    unknown = targets - {m[0] for m in mods}
    if unknown:
        raise ConfigError(f"FLOPs model: LoRA target modules {sorted(unknown)} do not exist in a {arch} backbone")
    return [m for m in mods if m[0] in targets]


def lora_merge_flops(arch: Arch, cfg: Mapping[str, Any], rank: int, targets: Iterable[str]) -> int:
    """ΔW = s·B·A for every adapted module (d_out·r·d_in MACs each): paid once per task when merging."""
    return sum(2 * d_out * rank * d_in for _, d_in, d_out in lora_module_shapes(arch, cfg, targets))


# ------------------------------------------------------------------------------------------------ methods
def per_instance_flops(method: str, arch: Arch, cfg_dict: Mapping[str, Any], instr_len: int, input_len: int,
                       out_len: int, n_instances: int, hypernet_flops: float = 0.0, lora_rank: int = 0,
                       lora_targets: Sequence[str] = (), lora_mode: Literal["merged", "unmerged"] = "merged",
                       cache_instruction_kv: bool = True) -> float:
    """Inference FLOPs per instance of `method` (a report key or a cost kind), amortised over n_instances per task.

    tk_instruct: instruction + input, every instance. no_instruction: input only.
    tagi: once per task [instruction encoding (T5 encoder / LLaMA prefill, no lm_head) + hypernet + LoRA merge]
      / n, plus per instance the input-only generation with the merged adapter and fusion's extra attention over
      the instruction states (T5: instr_len more cross-attention keys; LLaMA: a prefix of instr_len cached keys).
      T5 instruction K/V for cross-attention are projected once per task when cache_instruction_kv (what
      TagiStudent runs: `TagiStudent.instruction_kv`, computed once per task and reused), else per instance (the
      concatenation path, `TagiStudent(cache_cross_kv=False)`). lora_mode="unmerged" pays the LoRA products per
      token instead of the merge (batched multi-task), the instruction K/V's included.
    tagi_no_fusion: tagi without the extra attention. tk_instruct_kv_reuse (LLaMA only): instruction prefill once
      per task, then each input attends to its cached keys.
    """
    kind = METHOD_COST_KIND.get(method)
    if kind is None:
        raise ConfigError(f"FLOPs model: unknown method {method!r}; expected one of {sorted(METHOD_COST_KIND)}")
    if arch not in ("t5", "llama"):
        raise ConfigError(f"FLOPs model: arch must be 't5' or 'llama', got {arch!r}")
    if n_instances < 1:
        raise ConfigError(f"FLOPs model: n_instances must be ≥ 1, got {n_instances}")
    if lora_mode not in ("merged", "unmerged"):
        raise ConfigError(f"FLOPs model: lora_mode must be 'merged' or 'unmerged', got {lora_mode!r}")
    gen = t5_flops if arch == "t5" else llama_flops

    if kind == "tk_instruct":
        return float(gen(cfg_dict, instr_len + input_len, out_len))
    if kind == "no_instruction":
        return float(gen(cfg_dict, input_len, out_len))
    if kind == "tk_instruct_kv_reuse":
        if arch == "t5":
            raise ConfigError("FLOPs model: tk_instruct_kv_reuse needs a causal backbone; a T5 encoder is "
                              "bidirectional, so the instruction's states depend on the input and cannot be reused")
        once = llama_forward_flops(cfg_dict, instr_len, logits_len=0)
        return once / n_instances + llama_flops(cfg_dict, input_len, out_len, prefix_len=instr_len)

    # tagi / tagi_no_fusion
    fusion = kind == "tagi"
    once = float(hypernet_flops)
    if lora_mode == "merged" and lora_rank:
        once += lora_merge_flops(arch, cfg_dict, lora_rank, lora_targets)
    per_rank, per_targets = (lora_rank, lora_targets) if lora_mode == "unmerged" else (0, ())
    if arch == "t5":
        once += t5_encoder_flops(cfg_dict, instr_len)
        if fusion and cache_instruction_kv:
            once += t5_cross_kv_flops(cfg_dict, instr_len, per_rank, per_targets)
        per = t5_flops(cfg_dict, input_len, out_len, extra_cross_len=instr_len if fusion else 0,
                       extra_kv_projected=not cache_instruction_kv, lora_rank=per_rank, lora_targets=per_targets)
    else:
        once += llama_forward_flops(cfg_dict, instr_len, logits_len=0)
        per = llama_flops(cfg_dict, input_len, out_len, prefix_len=instr_len if fusion else 0,
                          lora_rank=per_rank, lora_targets=per_targets)
    return once / n_instances + per


def hypernet_flops(specs: Iterable[Any], input_dim: int, r: int, hidden: int, trunk_layers: int,
                   embed_dim: int) -> int:
    """Forward FLOPs of one HyperNetwork call for one task (modeling/hypernet.py): the pooler, the trunk over every
    (module type, layer) pair, and each type's head writing A and B. specs: TargetSpec-like (module_type, layer,
    d_in, d_out), e.g. `backbone.target_specs(config, kinds)` (config only: no weights need to exist)."""
    shapes: dict[str, tuple[int, int, int]] = {}
    for sp in specs:
        n, _, _ = shapes.get(sp.module_type, (0, sp.d_in, sp.d_out))
        shapes[sp.module_type] = (max(n, sp.layer + 1), sp.d_in, sp.d_out)
    pairs = sum(n for n, _, _ in shapes.values())
    total, width = 2 * input_dim * hidden, hidden + 2 * embed_dim
    for _ in range(trunk_layers):
        total += 2 * pairs * width * hidden
        width = hidden
    return total + sum(2 * n * width * r * (d_in + d_out) for n, d_in, d_out in shapes.values())


def relative_flops(method: str, baseline: str = "tk_instruct", **kwargs: Any) -> float:
    """per_instance_flops(method) / per_instance_flops(baseline) with the same lengths and backbone."""
    return per_instance_flops(method, **kwargs) / per_instance_flops(baseline, **kwargs)
