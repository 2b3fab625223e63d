"""`tagi-ds plan`: meta-device parameter counts, the ZeRO-3 memory split, and the activation formula against the
bytes autograd really saves on tiny models."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tagi_ds.config import load_config
from tagi_ds.errors import ConfigError
from tagi_ds.modeling.known_configs import KNOWN_CONFIGS, PUBLISHED_PARAMS, resolve_config
from tagi_ds.train.plan import activation_bytes, backbone_shape, make_plan

REPO = Path(__file__).resolve().parents[2]
SCALE = {"t5-xl-sni": "google/t5-xl-lm-adapt", "llama-sni": "meta-llama/Llama-2-7b-hf",
         "t5-xl-p3": "google/t5-xl-lm-adapt"}


@pytest.fixture(scope="module")
def plans() -> dict:
    out = {}
    for name in SCALE:
        cfg = load_config(REPO / "configs" / f"{name}.yaml")
        out[name] = (cfg, make_plan(cfg, nodes=2, gpus_per_node=4))
    return out


@pytest.mark.parametrize("name", list(SCALE))
def test_backbone_params_match_published(plans, name):
    _cfg, p = plans[name]
    assert p["backbone"] == SCALE[name]
    assert p["backbone_params"] == pytest.approx(PUBLISHED_PARAMS[SCALE[name]], rel=0.05)


def test_t5_xl_and_llama_counts_are_exact():
    """T5-XL 2,849,757,184 (untied lm_head, as the checkpoint) and LLaMA-2-7B 6,738,415,616."""
    from tagi_ds.modeling.backbone import detect_arch
    from tagi_ds.train.plan import build_meta_backbone, count_params

    for hub_id, expected in (("google/t5-xl-lm-adapt", 2_849_757_184), ("meta-llama/Llama-2-7b-hf", 6_738_415_616)):
        mcfg = resolve_config(hub_id)
        model = build_meta_backbone(mcfg, detect_arch(mcfg))
        assert next(model.parameters()).device.type == "meta"
        assert count_params(model) == expected


def _hypernet_reference(specs_by_type: list[dict], input_dim: int, r: int, hidden: int, trunk: int, embed: int) -> int:
    """Parameter count of the hypernetwork written out by hand (pooler, embeddings, trunk, one head per type)."""
    max_layers = max(t["count"] for t in specs_by_type)
    n = input_dim * hidden + hidden  # pooler
    n += max_layers * embed + len(specs_by_type) * embed  # layer and type embeddings
    width = hidden + 2 * embed
    for _ in range(trunk):
        n += width * hidden + hidden
        width = hidden
    n += 2 * width  # final LayerNorm
    for t in specs_by_type:
        out = r * (t["d_in"] + t["d_out"])
        n += out * width + out
    return n


@pytest.mark.parametrize("name", list(SCALE))
def test_targets_and_hypernet(plans, name):
    cfg, p = plans[name]
    r = cfg.hypernet.r or cfg.lora.r
    kinds = {t["kind"] for t in p["targets"]}
    assert kinds == {"q", "v"}
    if name.startswith("t5"):  # q, v in encoder self, decoder self and decoder cross attention, 24 layers each
        assert p["target_modules"] == 6 * 24 and all(t["d_in"] == t["d_out"] == 2048 for t in p["targets"])
        input_dim = 2048
    else:
        assert p["target_modules"] == 2 * 32 and all(t["d_in"] == t["d_out"] == 4096 for t in p["targets"])
        input_dim = 4096
    assert p["lora_params_per_task"] == sum(t["count"] * r * (t["d_in"] + t["d_out"]) for t in p["targets"])
    ref = _hypernet_reference(p["targets"], input_dim, r, cfg.hypernet.hidden, cfg.hypernet.trunk_layers,
                              cfg.hypernet.embed_dim)
    assert p["hypernet_params"] == ref


@pytest.mark.parametrize("name", list(SCALE))
def test_memory_split(plans, name):
    cfg, p = plans[name]
    b, world = p["bytes_per_gpu"], p["world_size"]
    assert world == 8
    # frozen backbone: a bf16 shard, no gradients, no optimizer states
    assert b["backbone_params_shard"] == math.ceil(p["backbone_params"] * 2 / world)
    assert b["backbone_grads"] == b["backbone_optimizer"] == 0
    # trainable hypernet: DeepSpeed's ZeRO-3 formula (no offload): 4 x largest layer + 18 B/param / world
    assert b["hypernet_zero3_states"] == 4 * p["hypernet_largest_layer_params"] + int(18 * p["hypernet_params"] / world)
    parts = ["backbone_params_shard", "hypernet_zero3_states", "zero3_gathered_working_set", "instruction_states",
             "generated_adapters", "logits"]
    common = sum(b[k] for k in parts)
    assert b["total_ckpt"] == common + b["activations_ckpt"]
    assert b["total_no_ckpt"] == common + b["activations_no_ckpt"]
    assert 0 < b["activations_ckpt"] < b["activations_no_ckpt"] / 5
    # plausible at this scale: the checkpointed plan fits an 80 GB GPU, and is more than the parameter shard
    assert b["backbone_params_shard"] < b["total_ckpt"] < 80e9


def test_more_gpus_shrink_the_shards_not_the_activations():
    cfg = load_config(REPO / "configs" / "t5-xl-sni.yaml")
    one = make_plan(cfg, 1, 8)["bytes_per_gpu"]
    four = make_plan(cfg, 4, 8)["bytes_per_gpu"]
    assert four["backbone_params_shard"] == pytest.approx(one["backbone_params_shard"] / 4, rel=1e-6)
    assert four["hypernet_zero3_states"] < one["hypernet_zero3_states"]
    assert four["activations_ckpt"] == one["activations_ckpt"]


def test_pretrain_stage_uses_segment_lengths():
    cfg = load_config(REPO / "configs" / "t5-xl-sni.yaml")
    p = make_plan(cfg, 1, 8, stage="pretrain")
    assert p["micro_batch"]["sequences"] == cfg.pretrain.micro_batch_size
    assert [p["micro_batch"][k] for k in ("instruction_tokens", "input_tokens", "target_tokens")] == \
        list(cfg.data.pretrain_segment_lengths)
    with pytest.raises(ConfigError, match="stage"):
        make_plan(cfg, 1, 8, stage="teacher")


def test_cli_plan_json_and_table(capsys):
    from tagi_ds.cli import main

    assert main(["plan", "--config", "configs/llama-sni.yaml", "--nodes", "2", "--gpus-per-node", "8", "--json"]) == 0
    p = json.loads(capsys.readouterr().out)
    assert p["world_size"] == 16 and p["arch"] == "llama"
    assert main(["plan", "--config", "configs/t5-xl-p3.yaml", "--nodes", "1", "--gpus-per-node", "8"]) == 0
    table = capsys.readouterr().out
    assert "TOTAL with checkpointing" in table and "enc_self.q" in table and "2.850B params" in table


def test_resolve_config(tmp_path):
    for hub_id in KNOWN_CONFIGS:
        assert resolve_config(hub_id).model_type in ("t5", "llama")
    resolve_config("meta-llama/Llama-2-7b-hf").save_pretrained(tmp_path)
    assert resolve_config(str(tmp_path)).hidden_size == 4096  # local folder: read from its config.json
    with pytest.raises(ConfigError, match="known ids: google/t5-large-lm-adapt"):
        resolve_config("some-org/unknown-model")
    with pytest.raises(ConfigError, match="without a config.json"):
        resolve_config(str(tmp_path / ".."))


# --------------------------------------------------------------- activation formula vs autograd's saved tensors
def _saved_activation_bytes(model: torch.nn.Module, fn) -> int:
    """Bytes of distinct storages autograd saves during fn(), parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activation_formula_bounds_real_t5(dtype):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    c = T5Config(d_model=64, d_ff=128, d_kv=16, num_heads=4, num_layers=2, vocab_size=100,
                 feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    m = T5ForConditionalGeneration(c).eval().to(dtype)  # every weight trainable: the formula's worst case
    B, s_in, s_t = 4, 64, 32
    emb = m.shared(torch.randint(0, 100, (B, s_in))).detach().requires_grad_(True)
    dem = m.shared(torch.randint(0, 100, (B, s_t))).detach()

    def run():
        enc = m.encoder(inputs_embeds=emb).last_hidden_state
        return m.decoder(inputs_embeds=dem, encoder_hidden_states=enc).last_hidden_state

    measured = _saved_activation_bytes(m, run)
    elem = 4 if dtype == torch.float32 else 2
    predicted = activation_bytes(backbone_shape(c, "t5"), B, 0, s_in, s_t, False, True, elem)["layers_no_ckpt"]
    assert 0.8 * predicted <= measured <= predicted  # an upper bound, and a tight one


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_activation_formula_bounds_real_llama(dtype, impl):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    c = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=100)
    m = LlamaForCausalLM(c).eval().to(dtype)
    m.config._attn_implementation = impl
    B, s_in, s_t = 4, 64, 32
    x = m.model.embed_tokens(torch.randint(0, 100, (B, s_in + s_t))).detach().requires_grad_(True)
    measured = _saved_activation_bytes(m, lambda: m.model(inputs_embeds=x).last_hidden_state)
    elem = 4 if dtype == torch.float32 else 2
    predicted = activation_bytes(backbone_shape(c, "llama"), B, 0, s_in, s_t, False, impl == "eager",
                                 elem)["layers_no_ckpt"]
    assert 0.8 * predicted <= measured <= predicted
