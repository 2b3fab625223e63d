"""target_specs from the config alone, arch detection, loading a frozen backbone."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from tagi_ds.errors import ConfigError
from tagi_ds.modeling.backbone import KINDS, detect_arch, load_backbone, module_types, target_specs
from tagi_ds.modeling.tiny import build_from_config, tiny_llama_config, tiny_t5_config


def _check_against_model(cfg, specs):
    """Every spec names an nn.Linear of exactly the shape the config predicts."""
    model = build_from_config(cfg, seed=0)
    for s in specs:
        mod = model.get_submodule(s.name)
        assert isinstance(mod, nn.Linear), s.name
        assert (mod.in_features, mod.out_features) == (s.d_in, s.d_out), s


def test_t5_specs_all_kinds():
    cfg = tiny_t5_config(d_model=32, num_heads=4, d_ff=48, num_layers=2, num_decoder_layers=3)
    specs = target_specs(cfg, list(KINDS))
    assert module_types(specs) == [
        "enc_self.q", "enc_self.k", "enc_self.v", "enc_self.o", "enc_ffn.ffn_in", "enc_ffn.ffn_out",
        "dec_self.q", "dec_self.k", "dec_self.v", "dec_self.o", "dec_cross.q", "dec_cross.k", "dec_cross.v",
        "dec_cross.o", "dec_ffn.ffn_in", "dec_ffn.ffn_out"]
    by_type = {mt: [s for s in specs if s.module_type == mt] for mt in module_types(specs)}
    assert [s.layer for s in by_type["enc_self.q"]] == [0, 1]
    assert [s.layer for s in by_type["dec_cross.v"]] == [0, 1, 2]  # decoder depth from num_decoder_layers
    assert by_type["dec_cross.k"][2].name == "decoder.block.2.layer.1.EncDecAttention.k"
    assert by_type["dec_ffn.ffn_out"][0].name == "decoder.block.0.layer.2.DenseReluDense.wo"
    assert (by_type["enc_ffn.ffn_in"][0].d_in, by_type["enc_ffn.ffn_in"][0].d_out) == (32, 48)
    assert (by_type["enc_ffn.ffn_out"][0].d_in, by_type["enc_ffn.ffn_out"][0].d_out) == (48, 32)
    _check_against_model(cfg, specs)


def test_t5_gated_ffn_has_two_ffn_in_per_block():
    cfg = tiny_t5_config(d_model=32, num_heads=4, d_ff=48, feed_forward_proj="gated-gelu")
    specs = [s for s in target_specs(cfg, ["ffn_in"]) if s.module_type == "enc_ffn.ffn_in"]
    assert [(s.name.rsplit(".", 1)[1], s.layer) for s in specs] == [("wi_0", 0), ("wi_1", 1), ("wi_0", 2), ("wi_1", 3)]
    _check_against_model(cfg, target_specs(cfg, list(KINDS)))


def test_t5_d_kv_not_d_model_over_heads():
    from transformers import T5Config
    cfg = T5Config(vocab_size=64, d_model=32, d_kv=16, num_heads=4, d_ff=40, num_layers=1)  # inner 64 ≠ d_model
    specs = {s.module_type: s for s in target_specs(cfg, ["q", "o"])}
    assert (specs["enc_self.q"].d_in, specs["enc_self.q"].d_out) == (32, 64)
    assert (specs["dec_cross.o"].d_in, specs["dec_cross.o"].d_out) == (64, 32)
    _check_against_model(cfg, list(specs.values()))


def test_llama_specs_gqa():
    cfg = tiny_llama_config(hidden_size=64, num_heads=8, num_kv_heads=2, intermediate_size=96, num_layers=2)
    specs = target_specs(cfg, list(KINDS))
    assert module_types(specs) == ["self.q", "self.k", "self.v", "self.o", "ffn.ffn_in", "ffn.ffn_out"]
    dims = {s.module_type: (s.d_in, s.d_out) for s in specs}
    assert dims == {"self.q": (64, 64), "self.k": (64, 16), "self.v": (64, 16), "self.o": (64, 64),
                    "ffn.ffn_in": (64, 96), "ffn.ffn_out": (96, 64)}
    ffn_in = [(s.name, s.layer) for s in specs if s.kind == "ffn_in"]
    assert ffn_in == [("model.layers.0.mlp.gate_proj", 0), ("model.layers.0.mlp.up_proj", 1),
                      ("model.layers.1.mlp.gate_proj", 2), ("model.layers.1.mlp.up_proj", 3)]
    _check_against_model(cfg, specs)


def test_specs_only_requested_kinds_and_unknown_kind():
    cfg = tiny_llama_config()
    assert {s.kind for s in target_specs(cfg, ["q", "v"])} == {"q", "v"}
    with pytest.raises(ConfigError, match=r"unknown kind.*'query'.*ffn_in"):
        target_specs(cfg, ["q", "query"])
    with pytest.raises(ConfigError):
        target_specs(cfg, [])


def test_detect_arch():
    from transformers import MistralConfig, Qwen2Config
    assert detect_arch(tiny_t5_config()) == "t5"
    assert detect_arch(tiny_llama_config()) == "llama"
    assert detect_arch(MistralConfig()) == "llama"
    assert detect_arch(Qwen2Config()) == "llama"
    from transformers import BertConfig
    with pytest.raises(ConfigError, match="bert"):
        detect_arch(BertConfig())


def test_load_backbone_frozen(tmp_path):
    model = build_from_config(tiny_llama_config(vocab_size=64, hidden_size=32, intermediate_size=48), seed=3)
    model.train()
    model.save_pretrained(tmp_path)
    loaded, arch = load_backbone(str(tmp_path))
    assert arch == "llama" and not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    assert torch.equal(loaded.model.layers[0].self_attn.q_proj.weight, model.model.layers[0].self_attn.q_proj.weight)
    with pytest.raises(ConfigError, match="dtype"):
        load_backbone(str(tmp_path), dtype="float64")


@pytest.mark.parametrize("arch", ["t5", "llama"])
def test_the_frozen_backbone_never_drops_out_even_in_train_mode(tmp_path, arch):
    """Issue 18 (minor): HF activation checkpointing needs train() mode, which switched T5's dropout (0.1) on exactly
    when checkpointing was on. A backbone saved with dropout loads with none: train() forwards repeat eval()'s."""
    if arch == "t5":
        config = tiny_t5_config(vocab_size=64, d_model=32, d_ff=48)
        config.dropout_rate = 0.3
    else:
        config = tiny_llama_config(vocab_size=64, hidden_size=32, intermediate_size=48)
        config.attention_dropout = 0.3
    build_from_config(config, seed=3).save_pretrained(tmp_path)
    loaded, _ = load_backbone(str(tmp_path), attn_implementation="eager")
    ids = torch.randint(3, 60, (2, 9), generator=torch.Generator().manual_seed(0))
    kw = {"decoder_input_ids": ids[:, :4]} if arch == "t5" else {}
    with torch.no_grad():
        ref = loaded(input_ids=ids, **kw).logits
        loaded.train()  # what gradient checkpointing does to the frozen model
        again = [loaded(input_ids=ids, **kw).logits for _ in range(2)]
    assert torch.equal(again[0], ref) and torch.equal(again[1], ref)
