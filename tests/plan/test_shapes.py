"""`tagi_ds.plan.shapes`: meta-device parameter counts of the scale backbones, LoRA targets and the hypernetwork
counted by hand, and the ZeRO-3 split of the finetune step (parts that add up, shards that shrink with ranks)."""
from __future__ import annotations

import math

import pytest

from tagi_ds.config import load_config
from tagi_ds.errors import ConfigError
from tagi_ds.modeling.known_configs import KNOWN_CONFIGS, PUBLISHED_PARAMS, resolve_config
from tagi_ds.plan.report import make_plan
from tagi_ds.plan.shapes import build_meta_backbone, count_params, model_facts

from conftest import REPO, SCALE


@pytest.fixture(scope="module")
def facts() -> dict:
    return {name: (load_config(REPO / "configs" / f"{name}.yaml"),) for name in SCALE}


@pytest.mark.parametrize("name", list(SCALE))
def test_backbone_params_match_published(facts, name):
    cfg = facts[name][0]
    mf = model_facts(cfg)
    assert mf.name == SCALE[name]
    assert mf.params == pytest.approx(PUBLISHED_PARAMS[SCALE[name]], rel=0.05)
    assert mf.compute_dtype == "bfloat16"
    assert mf.checkpoint_dtype == ("float32" if name.startswith("t5") else "float16")


def test_t5_xl_and_llama_counts_are_exact():
    """T5-XL 2,849,757,184 (untied lm_head, as the checkpoint) and LLaMA-2-7B 6,738,415,616."""
    from tagi_ds.modeling.backbone import detect_arch

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
def test_targets_and_hypernet(facts, name):
    cfg = facts[name][0]
    mf = model_facts(cfg)
    r = cfg.hypernet.r or cfg.lora.r
    assert {t["kind"] for t in mf.targets} == {"q", "v"}
    if name.startswith("t5"):  # q, v in encoder self, decoder self and decoder cross attention, 24 layers each
        assert mf.target_modules == 6 * 24 and all(t["d_in"] == t["d_out"] == 2048 for t in mf.targets)
        input_dim = 2048
    else:
        assert mf.target_modules == 2 * 32 and all(t["d_in"] == t["d_out"] == 4096 for t in mf.targets)
        input_dim = 4096
    assert mf.lora_params == sum(t["count"] * r * (t["d_in"] + t["d_out"]) for t in mf.targets)
    assert mf.teacher_lora_params == mf.lora_params  # both at lora.r in these configs
    assert mf.hypernet_params == _hypernet_reference(mf.targets, input_dim, r, cfg.hypernet.hidden,
                                                     cfg.hypernet.trunk_layers, cfg.hypernet.embed_dim)


def _parts(stage: dict, phase: str, where: str) -> dict[str, int]:
    return {p["name"]: p["bytes"] for p in stage["phases"][phase] if p["where"] == where}


@pytest.mark.parametrize("name", list(SCALE))
def test_zero_splits_of_the_finetune_step(facts, name):
    """The configs' own ZeRO-2 (backbone whole, the hypernetwork's optimizer states sharded) and ZeRO-3 through
    distributed.ds_config (backbone and hypernetwork sharded: DeepSpeed's own estimator)."""
    cfg = facts[name][0]
    p = make_plan(cfg, nodes=2, gpus_per_node=4, stage="finetune")
    st, m = p["stages"]["finetune"], p["model"]
    gpu = _parts(st, "micro batch: backward", "gpu")
    assert p["world_size"] == 8 and st["layout"].startswith("ZeRO-2 over 8 ranks")
    assert gpu["backbone weights, whole on every GPU (ZeRO below 3)"] == m["backbone_params"] * 2
    assert gpu["hypernet params + grads + optimizer (ZeRO-2)"] == \
        2 * 2 * m["hypernet_params"] + math.ceil(12 * m["hypernet_params"] / 8)
    totals = [sum(_parts(st, ph, "gpu").values()) for ph in st["phases"]]
    assert st["gpu_gib"] == pytest.approx(max(totals) / 2 ** 30, abs=1e-3)  # the largest phase is the peak
    assert 0 < st["gpu_gib"] < 80
    assert st["first_step_forwards"] == 2 * cfg.finetune.grad_accum  # instruction pass + forward per micro batch

    cfg3 = load_config(REPO / "configs" / f"{name}.yaml", ["distributed.ds_config=ds_configs/zero3.json"])
    p3 = make_plan(cfg3, nodes=2, gpus_per_node=4, stage="finetune")
    gpu3 = _parts(p3["stages"]["finetune"], "micro batch: backward", "gpu")
    assert gpu3["backbone (ZeRO-3 shard)"] == math.ceil(m["backbone_params"] * 2 / 8)  # bf16, no grads, no optimizer
    # DeepSpeed's ZeRO-3 formula without offload: 4 x largest layer + 18 B/param / world
    assert gpu3["hypernet params + grads + optimizer (ZeRO-3)"] == \
        4 * m["hypernet_largest_layer_params"] + int(18 * m["hypernet_params"] / 8)
    assert p3["stages"]["finetune"]["zero3_gather_gib_per_step"] > 10 * st["zero3_gather_gib_per_step"]


def test_more_gpus_shrink_the_shards_not_the_activations():
    cfg = load_config(REPO / "configs" / "t5-xl-sni.yaml", ["distributed.ds_config=ds_configs/zero3.json"])
    one = _parts(make_plan(cfg, 1, 8, "finetune")["stages"]["finetune"], "micro batch: backward", "gpu")
    four = _parts(make_plan(cfg, 4, 8, "finetune")["stages"]["finetune"], "micro batch: backward", "gpu")
    assert four["backbone (ZeRO-3 shard)"] == pytest.approx(one["backbone (ZeRO-3 shard)"] / 4, rel=1e-6)
    assert four["hypernet params + grads + optimizer (ZeRO-3)"] < one["hypernet params + grads + optimizer (ZeRO-3)"]
    kept = "activations kept (layer inputs: checkpointed)"
    assert four[kept] == one[kept] > 0


def test_resolve_config(tmp_path):
    for hub_id in KNOWN_CONFIGS:
        assert resolve_config(hub_id).model_type in ("t5", "llama")
    resolve_config("meta-llama/Llama-2-7b-hf").save_pretrained(tmp_path)
    assert resolve_config(str(tmp_path)).hidden_size == 4096  # local folder: read from its config.json
    with pytest.raises(ConfigError, match="known ids: google/t5-large-lm-adapt"):
        resolve_config("some-org/unknown-model")
    with pytest.raises(ConfigError, match="without a config.json"):
        resolve_config(str(tmp_path / ".."))
