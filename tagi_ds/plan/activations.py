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
It counts every linear layer's input as saved, while autograd skips saving inputs of a frozen linear with no LoRA.
With non-reentrant checkpointing per layer, each layer keeps only its input (T·h) and one layer's activations live
during the recompute. Checked against `torch.autograd.graph.saved_tensors_hooks` on tiny T5 / LLaMA on CPU
(tests/plan/test_activations.py): measured within [0.8, 1.0] x predicted.
"""
from __future__ import annotations

from .shapes import Shape


def norm_bytes(t: int, sh: Shape, elem: int) -> int:
    """RMSNorm (T5 / LLaMA) upcasts to fp32: it saves an fp32 copy of its input, the input, the normalized
    value and its output (the next linear's input) in the compute dtype: T·h·(4 + 3·elem) bytes at most."""
    return t * sh.hidden * (4 + 3 * elem)


def dropout_mask_bytes(elem: int, cuda: bool) -> int:
    """Bytes a dropout keeps per element for backward: CUDA's fused kernel a bool mask, CPU the noise tensor."""
    return 1 if cuda else elem


def attention_pair_bytes(arch: str, impl: str, elem: int, dropout: bool, cuda: bool) -> int:
    """Bytes one attention call keeps per (head, query, key) for backward (transformers 5 / torch 2.x):
    - eager: LLaMA softmax(fp32).to(dtype): fp32 output + a cast copy (none in fp32); T5's eager softmax runs in
      the scores' dtype; dropout adds its mask and the dropped copy the probs @ V matmul keeps.
    - sdpa, T5: the relative position bias + padding is a float mask (B, heads, s_q, s_k) built per layer
      (`create_position_bias_mask`). On CUDA the memory-efficient kernel keeps that mask, not the probabilities
      (assumed: not measured here, no GPU); on CPU the math path runs in fp32 and keeps the probabilities (4 B),
      + the dropout noise and the dropped copy (4 B each) in train() mode (measured).
    - sdpa, LLaMA (no float bias): flash / memory-efficient kernels, CPU flash: nothing of size s_q x s_k."""
    if impl == "eager":
        n = (4 + elem if elem < 4 else 4) if arch == "llama" else elem
        if dropout:
            n = (4 if arch == "llama" else elem) + dropout_mask_bytes(elem, cuda) + elem
        return n
    if arch == "t5":
        return elem if cuda else 4 + (8 if dropout else 0)
    return 0


def attention_bytes(b: int, s_q: int, s_k: int, sh: Shape, pair_bytes: int, elem: int, mask: int = 0,
                    qkv_bytes: int = 0) -> int:
    """Saved bytes of one attention sublayer with its norm (see the module docstring); `mask` = dropout mask bytes
    per element (0: no dropout); `qkv_bytes` = bytes per element of the Q, K, V the kernel keeps (default: the
    compute dtype; CPU's math path keeps fp32 copies)."""
    t = b * s_q
    n = (t * sh.attn_width + 2 * b * s_k * sh.kv_width) * (qkv_bytes or elem) + t * sh.attn_width * elem
    n += b * sh.heads * s_q * s_k * pair_bytes
    n += t * sh.hidden * mask  # the sublayer output's dropout
    return norm_bytes(t, sh, elem) + n


def ffn_bytes(b: int, s: int, sh: Shape, elem: int, mask: int = 0) -> int:
    t = b * s
    return norm_bytes(t, sh, elem) + sh.ffn_saved * t * sh.ffn * elem + mask * (t * sh.ffn + t * sh.hidden)


def activation_bytes(sh: Shape, batch: int, s_instr: int, s_in: int, s_tgt: int, fusion: bool, impl: str,
                     elem: int, dropout: bool = False, cuda: bool = True) -> dict[str, int]:
    """Activation bytes of one micro batch: the layers without / with checkpointing.

    T5: encoder over the input (s_in); decoder over the target (s_tgt) with cross-attention over the encoder
    states, concatenated with the instruction states when `fusion`. LLaMA: one causal stack over input + target,
    attending to an instruction KV prefix (s_instr) when `fusion`. Each stack ends in one more norm.
    `impl`: "eager" or "sdpa"; `dropout`: the backbone runs in train() mode (T5's dropout_rate > 0).
    """
    drop = dropout and sh.dropout > 0
    pair = attention_pair_bytes(sh.arch, impl, elem, drop, cuda)
    mask = dropout_mask_bytes(elem, cuda) if drop else 0
    # CPU's math path (T5's float bias mask rules out the fused kernels) upcasts Q, K, V to fp32 and keeps those
    qkv = 4 if sh.arch == "t5" and impl == "sdpa" and not cuda else elem
    layers: list[int] = []  # saved bytes per layer
    inputs: list[int] = []  # bytes of each layer's input (what checkpointing keeps)
    extra = 0  # stack-level tensors: final norms, the cross-attention source shared by all decoder layers
    if sh.arch == "t5":
        enc = attention_bytes(batch, s_in, s_in, sh, pair, elem, mask, qkv) + ffn_bytes(batch, s_in, sh, elem, mask)
        layers += [enc] * sh.enc_layers
        inputs += [batch * s_in * sh.hidden * elem] * sh.enc_layers
        s_cross = s_in + (s_instr if fusion else 0)
        dec = (attention_bytes(batch, s_tgt, s_tgt, sh, pair, elem, mask, qkv)
               + attention_bytes(batch, s_tgt, s_cross, sh, pair, elem, mask, qkv)
               + ffn_bytes(batch, s_tgt, sh, elem, mask))
        layers += [dec] * sh.dec_layers
        inputs += [batch * s_tgt * sh.hidden * elem] * sh.dec_layers
        extra += norm_bytes(batch * s_in, sh, elem) + norm_bytes(batch * s_tgt, sh, elem)
        extra += batch * s_cross * sh.hidden * elem
        extra += 2 * mask * batch * (s_in + s_tgt) * sh.hidden  # embedding and final dropout of each stack
    else:
        s = s_in + s_tgt
        s_k = s + (s_instr if fusion else 0)
        dec = attention_bytes(batch, s, s_k, sh, pair, elem, mask) + ffn_bytes(batch, s, sh, elem, mask)
        layers += [dec] * sh.dec_layers
        inputs += [batch * s * sh.hidden * elem] * sh.dec_layers
        extra += norm_bytes(batch * s, sh, elem)
    return {"layers_no_ckpt": sum(layers) + extra, "layers_ckpt": sum(inputs) + max(layers) + extra,
            "one_layer": max(layers)}


def forward_transient_bytes(sh: Shape, batch: int, s_q: int, s_k: int, impl: str, elem: int, cuda: bool) -> int:
    """Peak of a no-grad forward through one layer (nothing is saved, tensors die as the layer runs): the layer
    input and output, Q/K/V, the FFN's inner activations and the attention's (B, heads, s_q, s_k) temporaries:
    eager scores + fp32 softmax + the cast back; T5 sdpa the float bias mask; LLaMA sdpa none."""
    t = batch * s_q
    n = 2 * t * sh.hidden * elem + (t * sh.attn_width + 2 * batch * s_k * sh.kv_width) * elem
    n += 3 * t * sh.ffn * elem
    pairs = batch * sh.heads * s_q * s_k
    if impl == "eager":
        n += pairs * (elem + 4 + elem)
    elif sh.arch == "t5":  # the float bias mask; no-grad sdpa runs a fused kernel (CPU flash included: measured)
        n += pairs * elem
    return n
