"""Bytes autograd saves for one micro batch through the frozen backbone: an analytic upper bound.

Per layer, for T tokens of micro batch B, query length s_q, key length s_k, hidden h, attention width a, key/value
width a_kv, FFN width f (elements, times the compute dtype's bytes unless stated):
  attention sublayer  2Th (norm in, norm out) + 2Ta (Q, context) + 2·B·s_k·a_kv (K, V)
                      + B·heads·s_q·s_k x `attention_pair_bytes` (what the attention kernel keeps per query-key pair)
                      + the norm in front: fp32 copy, input, normalized, output: T·h·(4 + 3·dtype) bytes
  FFN sublayer        2Th + k·Tf: k = 4 for SwiGLU (SiLU input, both product operands, down input), 7 for T5
                      v1.1's GEGLU (its tanh-GELU is composed of elementwise ops that save 4 tensors), 2 plain
  dropout (T5 in train() mode: the teachers under HF checkpointing, the multitask baselines) keeps a mask per
  dropped element: a bool on CUDA (fused native_dropout), a noise tensor in the input's dtype on CPU (torch's
  unfused path), for every sublayer output (T·h), the FFN's inner activation (T·f) and the attention probabilities
T5 decoder layers add a cross-attention sublayer with s_k = encoder length (+ the instruction with fusion).
With every weight trainable (`lora=None`) every linear's input is kept: an upper bound. The stages run a FROZEN
backbone (`lora=Lora(kinds, r)`): a frozen linear keeps nothing, so a layer keeps its norms' fp32 copies, the
input of the LoRA'd linears, what the attention kernel needs (Q, K, V, output, logsumexp, T5's bias mask), the
FFN's activation inputs (T5 GEGLU 6 x T·f, SwiGLU 3 x T·f) and the LoRA's x @ A^T. With non-reentrant
checkpointing per layer, each layer keeps only its input (T·h) and one layer's activations live
during the recompute. Checked against `torch.autograd.graph.saved_tensors_hooks` on tiny T5 / LLaMA on CPU
(tests/plan/test_activations.py): measured within [0.8, 1.0] x predicted.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .shapes import Shape


def norm_bytes(t: int, sh: Shape, elem: int, frozen: bool = False) -> int:
    """RMSNorm upcasts to fp32. Trainable weight: it keeps an fp32 copy, the input, the normalized value and its
    output (the next linear's input): T·h·(4 + 3·elem). Frozen weight: the fp32 copy and the rsqrt, and T5's
    `hidden * rsqrt` also its input in the compute dtype (LLaMA multiplies the fp32 copy)."""
    if not frozen:
        return t * sh.hidden * (4 + 3 * elem)
    return t * sh.hidden * (4 + (elem if sh.arch == "t5" else 0)) + 4 * t


def dropout_mask_bytes(elem: int, cuda: bool) -> int:
    """Bytes a dropout keeps per element for backward: CUDA's fused kernel a bool mask, CPU the noise tensor."""
    return 1 if cuda else elem


def attention_pair_bytes(arch: str, impl: str, elem: int, dropout: bool, cuda: bool) -> int:
    """Bytes one attention call keeps per (head, query, key) for backward (transformers 5 / torch 2.x):
    - eager: LLaMA softmax(fp32).to(dtype): fp32 output + a cast copy (none in fp32); T5's eager softmax runs in
      the scores' dtype; dropout adds its mask and the dropped copy the probs @ V matmul keeps.
    - sdpa, T5: the relative position bias + padding is a float mask (B, heads, s_q, s_k) in the compute dtype,
      built per layer (`create_position_bias_mask`) and kept by the fused kernel (measured on CPU; on CUDA the
      memory-efficient kernel takes such masks: assumed, no GPU here). With dropout CPU falls back to the math path:
      fp32 probabilities, the dropout noise and the dropped copy (12 B, measured).
    - sdpa, LLaMA (no float bias): flash / memory-efficient kernels, CPU flash: nothing of size s_q x s_k."""
    if impl == "eager":
        if dropout:
            return (4 if arch == "llama" else elem) + dropout_mask_bytes(elem, cuda) + elem
        return (4 + elem if elem < 4 else 4) if arch == "llama" else elem
    if arch == "t5":
        return 12 if dropout and not cuda else elem
    return 0


@dataclass
class Lora:
    """Which linears carry a (per-row) LoRA on a frozen backbone, and its rank; None = every weight trains."""

    kinds: frozenset
    r: int


def attention_bytes(b: int, s_q: int, s_k: int, sh: Shape, pair_bytes: int, elem: int, mask: int = 0,
                    lora: Optional[Lora] = None, impl: str = "sdpa") -> int:
    """Saved bytes of one attention sublayer with its norm (see the module docstring); `mask` = dropout mask bytes
    per element (0: no dropout)."""
    t = b * s_q
    kv = sh.kv_width if sh.arch == "t5" or lora is None else sh.attn_width  # LLaMA: repeat_kv before the kernel
    n = (2 * t * sh.attn_width + 2 * b * s_k * kv) * elem  # Q, context (kernel output), K, V
    n += b * sh.heads * s_q * s_k * pair_bytes + t * sh.hidden * mask
    if lora is None:  # every linear's input saved
        if sh.arch == "t5" and impl != "eager" and pair_bytes in (elem, 12):
            # a trainable position bias needs the mask's gradient: the math path (measured on CPU), which keeps
            # fp32 probabilities and fp32 copies of Q, K, V instead of the mask
            n += (b * sh.heads * s_q * s_k if pair_bytes == elem else 0) * (4 - elem)
            n += (t * sh.attn_width + 2 * b * s_k * kv) * (4 - elem)
        return norm_bytes(t, sh, elem) + n
    n += 4 * b * sh.heads * s_q if impl != "eager" else 0  # the kernel's logsumexp
    if lora.kinds & {"q", "k", "v"}:
        n += t * sh.hidden * elem  # the normed input, kept by the LoRA matmul (shared by q, k, v)
    if "o" in lora.kinds:
        n += t * sh.attn_width * elem
    tokens = {"q": t, "o": t, "k": b * s_k, "v": b * s_k}
    n += sum(tokens[k] * lora.r * elem for k in lora.kinds & set(tokens))  # x @ A^T (rows, T, r)
    return norm_bytes(t, sh, elem, frozen=True) + n


def ffn_bytes(b: int, s: int, sh: Shape, elem: int, mask: int = 0, lora: Optional[Lora] = None) -> int:
    t = b * s
    drop = mask * (t * sh.ffn + t * sh.hidden)
    if lora is None:
        return norm_bytes(t, sh, elem) + sh.ffn_saved * t * sh.ffn * elem + drop
    n = norm_bytes(t, sh, elem, frozen=True) + (sh.ffn_saved - 1) * t * sh.ffn * elem + drop  # frozen out proj
    if "ffn_in" in lora.kinds:
        n += t * sh.hidden * elem + 2 * t * lora.r * elem
    if "ffn_out" in lora.kinds:
        n += t * sh.ffn * elem + t * lora.r * elem
    return n


def activation_bytes(sh: Shape, batch: int, s_instr: int, s_in: int, s_tgt: int, fusion: bool, impl: str,
                     elem: int, dropout: bool = False, cuda: bool = True,
                     lora: Optional[Lora] = None, t5_split_cross: bool = False) -> dict[str, int]:
    """Activation bytes of one micro batch: the layers without / with checkpointing, and one layer's.

    T5: encoder over the input (s_in); decoder over the target (s_tgt) with cross-attention over the encoder
    states, concatenated with the instruction states when `fusion`. LLaMA: one causal stack over input + target,
    attending to an instruction KV prefix (s_instr) when `fusion`. Each stack ends in one more norm.
    `impl`: "eager" or "sdpa"; `dropout`: the backbone runs in train() mode (T5's dropout_rate > 0); `lora`: a
    frozen backbone with LoRA on these kinds (every stage), None = every weight trainable (an upper bound).
    `t5_split_cross`: T5 fusion through the instruction K/V held per task (`fusion.split_cross_attention`): the
    rows' keys/values cover the input only, and the softmax over [instruction ; input] is computed by hand (not a
    fused kernel): fp32 probabilities + their cast to the compute dtype + the regrouped instruction part kept per
    (head, query, key). The instruction K/V themselves are per task (structures.t5_instruction_kv_bytes).
    """
    drop = dropout and sh.dropout > 0
    pair = attention_pair_bytes(sh.arch, impl, elem, drop, cuda)
    mask = dropout_mask_bytes(elem, cuda) if drop else 0
    frozen = lora is not None
    layers: list[int] = []  # saved bytes per layer
    inputs: list[int] = []  # bytes of each layer's input (what checkpointing keeps)
    extra = 0  # stack-level tensors: final norms, the cross-attention source shared by all decoder layers
    if sh.arch == "t5":
        enc = (attention_bytes(batch, s_in, s_in, sh, pair, elem, mask, lora, impl)
               + ffn_bytes(batch, s_in, sh, elem, mask, lora))
        layers += [enc] * sh.enc_layers
        inputs += [batch * s_in * sh.hidden * elem] * sh.enc_layers
        split = t5_split_cross and fusion and s_instr > 0
        s_cross = s_in + (s_instr if fusion and not split else 0)
        if split:
            probs = 4 + (elem if elem < 4 else 0)  # softmax's fp32 output, the cast the matmuls keep
            cross = (attention_bytes(batch, s_tgt, s_in, sh, 0, elem, mask, lora, "eager")
                     + batch * sh.heads * s_tgt * ((s_in + s_instr) * probs + s_instr * elem))
        else:
            cross = attention_bytes(batch, s_tgt, s_cross, sh, pair, elem, mask, lora, impl)
        dec = (attention_bytes(batch, s_tgt, s_tgt, sh, pair, elem, mask, lora, impl) + cross
               + ffn_bytes(batch, s_tgt, sh, elem, mask, lora))
        layers += [dec] * sh.dec_layers
        inputs += [batch * s_tgt * sh.hidden * elem] * sh.dec_layers
        extra += norm_bytes(batch * s_in, sh, elem, frozen) + norm_bytes(batch * s_tgt, sh, elem, frozen)
        extra += batch * s_cross * sh.hidden * elem
        extra += 2 * mask * batch * (s_in + s_tgt) * sh.hidden  # embedding and final dropout of each stack
    else:
        s = s_in + s_tgt
        s_k = s + (s_instr if fusion else 0)
        dec = (attention_bytes(batch, s, s_k, sh, pair, elem, mask, lora, impl)
               + ffn_bytes(batch, s, sh, elem, mask, lora))
        layers += [dec] * sh.dec_layers
        inputs += [batch * s * sh.hidden * elem] * sh.dec_layers
        extra += norm_bytes(batch * s, sh, elem, frozen)
        if frozen and impl != "eager":
            extra += batch * s * s_k * elem  # the 4-D padding / causal mask given to the kernel (one, shared)
    return {"layers_no_ckpt": sum(layers) + extra, "layers_ckpt": sum(inputs) + max(layers) + extra,
            "one_layer": max(layers)}


def forward_transient_bytes(sh: Shape, batch: int, s_q: int, s_k: int, impl: str, elem: int, cuda: bool) -> int:
    """Peak of a no-grad forward through one layer (nothing is saved, tensors die as the layer runs): the layer
    input and output, Q/K/V, the FFN's inner activations and the attention's (B, heads, s_q, s_k) temporaries:
    eager scores + fp32 softmax + the cast back; T5 sdpa the float bias mask; LLaMA sdpa the 4-D mask."""
    t = batch * s_q
    n = 2 * t * sh.hidden * elem + (t * sh.attn_width + 2 * batch * s_k * sh.kv_width) * elem
    n += 3 * t * sh.ffn * elem
    pairs = batch * sh.heads * s_q * s_k
    if impl == "eager":
        n += pairs * (elem + 4 + elem)
    elif sh.arch == "t5":  # the float bias mask; no-grad sdpa runs a fused kernel (CPU flash included: measured)
        n += pairs * elem
    else:  # the 4-D padding / causal mask (B, 1, s_q, s_k) the kernel is given (a padded batch: measured)
        n += batch * s_q * s_k * elem
    return n
