"""Tiny T5 / LLaMA configs and seeded random models: the offline backbones of tests and the tiny recipe."""
from __future__ import annotations

import torch
from torch import nn

from .backbone import detect_arch, freeze


def tiny_t5_config(vocab_size: int = 512, d_model: int = 64, num_layers: int = 2, num_heads: int = 4,
                   d_ff: int = 128, num_decoder_layers: int | None = None, feed_forward_proj: str = "relu",
                   pad_token_id: int = 0, eos_token_id: int = 1, decoder_start_token_id: int = 0,
                   relative_attention_num_buckets: int = 8, relative_attention_max_distance: int = 32,
                   dropout_rate: float = 0.0):
    """A T5Config of the given size; `feed_forward_proj="gated-gelu"` gives a T5 v1.1-style gated FFN."""
    from transformers import T5Config

    return T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=d_model // num_heads, d_ff=d_ff,
                    num_layers=num_layers, num_decoder_layers=num_decoder_layers, num_heads=num_heads,
                    feed_forward_proj=feed_forward_proj, pad_token_id=pad_token_id, eos_token_id=eos_token_id,
                    decoder_start_token_id=decoder_start_token_id, dropout_rate=dropout_rate,
                    relative_attention_num_buckets=relative_attention_num_buckets,
                    relative_attention_max_distance=relative_attention_max_distance)


def tiny_llama_config(vocab_size: int = 512, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                      intermediate_size: int = 128, num_kv_heads: int | None = None, max_position_embeddings: int = 512,
                      pad_token_id: int = 0, bos_token_id: int = 1, eos_token_id: int = 2,
                      tie_word_embeddings: bool = True, rope_theta: float = 10000.0):
    """A LlamaConfig (RoPE, RMSNorm, SwiGLU) of the given size; `num_kv_heads < num_heads` gives GQA."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                       num_hidden_layers=num_layers, num_attention_heads=num_heads,
                       num_key_value_heads=num_kv_heads or num_heads, max_position_embeddings=max_position_embeddings,
                       pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                       tie_word_embeddings=tie_word_embeddings,
                       rope_parameters={"rope_type": "default", "rope_theta": rope_theta})


def build_from_config(config, seed: int = 0, frozen: bool = False) -> nn.Module:
    """A model with random weights drawn under `seed` (same seed → same weights); `frozen=True` also freezes it."""
    from transformers import LlamaForCausalLM, T5ForConditionalGeneration

    cls = T5ForConditionalGeneration if detect_arch(config) == "t5" else LlamaForCausalLM
    rng_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = cls(config)
    finally:
        torch.random.set_rng_state(rng_state)  # a helper must not move the caller's global RNG
    model.eval()
    return freeze(model) if frozen else model
