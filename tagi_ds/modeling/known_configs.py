"""Architecture numbers of the paper-scale backbones, so planning works offline (no hub, no weights).

`resolve_config(name_or_path)` turns a recipe's `backbone.name_or_path` into a `transformers` config object:
a local folder is read with `AutoConfig.from_pretrained`; a known hub id comes from the table below (copied from
each model's public `config.json`: only the fields that change shapes or the forward); anything else is a
`ConfigError` that lists the known ids. Nothing here downloads.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ConfigError

# Plain dicts, one per hub id; `model_type` selects the transformers config class.
_T5_V11_COMMON: dict[str, Any] = {
    "model_type": "t5",
    "d_kv": 64,
    "feed_forward_proj": "gated-gelu",  # T5 v1.1: GEGLU FFN (wi_0, wi_1, wo)
    "vocab_size": 32128,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "layer_norm_epsilon": 1e-6,
    "dropout_rate": 0.1,
    "tie_word_embeddings": False,  # v1.1 does not scale decoder outputs (transformers 5 reads this flag for that)
    "decoder_start_token_id": 0,
    "pad_token_id": 0,
    "eos_token_id": 1,
}

KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    "google/t5-xl-lm-adapt": {
        **_T5_V11_COMMON,
        "d_model": 2048, "d_ff": 5120, "num_heads": 32, "num_layers": 24, "num_decoder_layers": 24,
    },
    "google/t5-large-lm-adapt": {
        **_T5_V11_COMMON,
        "d_model": 1024, "d_ff": 2816, "num_heads": 16, "num_layers": 24, "num_decoder_layers": 24,
    },
    "meta-llama/Llama-2-7b-hf": {
        "model_type": "llama",
        "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "hidden_act": "silu", "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2,
    },
    "meta-llama/Meta-Llama-3-8B": {
        "model_type": "llama",
        "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "hidden_act": "silu", "tie_word_embeddings": False,
        "bos_token_id": 128000, "eos_token_id": 128001,
    },
}

# Parameter counts published for the checkpoints (for sanity checks of the table; T5 v1.1 checkpoints keep a
# separate lm_head, which transformers 5 ties to the shared embedding, so a built T5 counts vocab × d_model fewer).
PUBLISHED_PARAMS: dict[str, float] = {
    "google/t5-xl-lm-adapt": 2.85e9,
    "google/t5-large-lm-adapt": 7.83e8,
    "meta-llama/Llama-2-7b-hf": 6.74e9,
    "meta-llama/Meta-Llama-3-8B": 8.03e9,
}


def config_from_dict(values: dict[str, Any]) -> Any:
    """A transformers config object from a plain dict with `model_type`."""
    from transformers import AutoConfig

    values = dict(values)
    model_type = values.pop("model_type")
    return AutoConfig.for_model(model_type, **values)


def resolve_config(name_or_path: str) -> Any:
    """Local path → `AutoConfig.from_pretrained(path)`; known hub id → the table; else a ConfigError."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ConfigError(f"backbone.name_or_path: '{name_or_path}' is a path without a config.json")
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(str(path))
    if name_or_path in KNOWN_CONFIGS:
        return config_from_dict(KNOWN_CONFIGS[name_or_path])
    known = ", ".join(sorted(KNOWN_CONFIGS))
    raise ConfigError(
        f"backbone.name_or_path: '{name_or_path}' is neither a local folder with config.json nor a known "
        f"architecture for offline planning; known ids: {known}")
