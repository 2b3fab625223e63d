"""`tagi-ds plan`: the --json schema, the table, the CLI as a user runs it, and the flags that say what will not fit
and which config knob helps."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tagi_ds.config import load_config
from tagi_ds.errors import ConfigError
from tagi_ds.plan.report import STAGES, format_plan, make_plan, stages_run

from conftest import REPO

STAGE_KEYS = {"gpu_gib": float, "host_gib_per_rank": float, "disk_gib": float, "fits": bool, "fits_gpu": bool,
              "fits_host": bool, "knobs": list, "zero3_gather_gib_per_step": float, "time_h": float,
              "cpu_device_gib": float, "phases": dict, "layout": str, "processes": int}


@pytest.fixture(scope="module")
def llama_plan() -> dict:
    return make_plan(load_config(REPO / "configs" / "llama-sni.yaml"), nodes=2, gpus_per_node=8)


def test_json_schema_every_stage_the_config_runs(llama_plan):
    p = llama_plan
    assert list(p["stages"]) == ["teacher", "cache-logits", "pretrain", "finetune", "baselines", "evaluate"]
    for name, s in p["stages"].items():
        for key, typ in STAGE_KEYS.items():
            assert isinstance(s[key], typ), (name, key, s[key])
        assert s["first_step_forwards"] is None or isinstance(s["first_step_forwards"], int)
        assert s["fits"] == (s["fits_gpu"] and s["fits_host"])
        assert s["fits_gpu"] == (s["gpu_gib"] <= 80) and s["fits_host"] == (s["host_gib_per_rank"] <= 1024 / 8)
        for parts in s["phases"].values():
            assert all(q["where"] in ("gpu", "host") and q["bytes"] >= 0 for q in parts)
    assert p["limits"]["host_gib_per_rank"] == 128 and p["world_size"] == 16
    assert p["run"]["disk_gib"] == pytest.approx(sum(s["disk_gib"] for s in p["stages"].values()), abs=0.01)
    assert set(p["run"]["not_fitting"]) == {k for k, s in p["stages"].items() if not s["fits"]}
    json.dumps(p)  # plain JSON all the way down


def test_scale_configs_fit_and_zero_by_fit(llama_plan):
    """LLaMA SNI on 2 x 8: every stage fits (issues #16, #17); finetune is flat in the tasks (nothing O(tasks) on the
    host), two forwards per micro batch before step 1, and ZeRO-2 is what the plan recommends (the config's)."""
    assert llama_plan["run"]["not_fitting"] == []
    ft = llama_plan["stages"]["finetune"]
    assert ft["first_step_forwards"] == 2 * 2  # (instruction pass + training forward) x grad_accum
    assert ft["host_gib_per_rank"] < 32
    z = ft["zero"]
    assert z["config_stage"] == 2 and z["recommended_stage"] == 2 and z["ok"]
    assert z["gather_gib_per_step_zero3"] > 2 * 2 * 6.7 * 0.9  # ZeRO-3: two gathers of a 13.5 GB backbone per micro
    assert z["gather_gib_per_step_zero2"] < 1.0  # ZeRO-2: the hypernetwork's gradients and parameters only
    assert "ZeRO by fit, finetune" in format_plan(llama_plan)


def test_zero3_config_is_told_to_use_zero2_and_a_tight_gpu_to_keep_zero3():
    cfg = load_config(REPO / "configs" / "llama-sni.yaml", ["distributed.ds_config=ds_configs/zero3.json"])
    z = make_plan(cfg, 2, 8, stage="finetune")["stages"]["finetune"]["zero"]
    assert z["config_stage"] == 3 and z["recommended_stage"] == 2 and not z["ok"]
    assert "distributed.ds_config=ds_configs/zero2.json" in z["knob"]
    tight = make_plan(load_config(REPO / "configs" / "llama-sni.yaml"), 2, 8, stage="finetune", gpu_mem_gib=16)
    zt = tight["stages"]["finetune"]["zero"]
    assert zt["recommended_stage"] == 3 and zt["gpu_gib_zero3"] < 16 < zt["gpu_gib_zero2"] and not zt["ok"]


def test_flags_fire_on_a_config_that_cannot_fit():
    """A micro batch far too wide for the GPU and a teacher cache larger than the host share (32 GiB of 64 GiB per
    node for 8 ranks): both flagged, with the knob that shrinks each."""
    cfg = load_config(REPO / "configs" / "llama-sni.yaml", ["finetune.instances_per_task=256",
                                                            "finetune.teacher_cache_gib=32"])
    ft = make_plan(cfg, 2, 8, stage="finetune", host_mem_gib=64)["stages"]["finetune"]
    assert not ft["fits_gpu"] and not ft["fits_host"] and not ft["fits"]
    assert any(k.startswith("GPU: finetune.instances_per_task") for k in ft["knobs"])
    assert any(k.startswith("host: finetune.teacher_cache_gib") for k in ft["knobs"])


def test_smaller_limits_flag_more_and_bigger_limits_none():
    cfg = load_config(REPO / "configs" / "t5-xl-sni.yaml", ["eval.methods=[tagi]"])
    small = make_plan(cfg, 1, 8, gpu_mem_gib=4, host_mem_gib=16)
    assert all(not s["fits"] for s in small["stages"].values())
    assert all(s["knobs"] for s in small["stages"].values())
    big = make_plan(cfg, 1, 8, gpu_mem_gib=10_000, host_mem_gib=100_000)
    assert all(s["fits"] and not s["knobs"] for s in big["stages"].values())


def test_evaluate_teachers_in_byte_groups_and_baselines_flags():
    """evaluate holds one group of teachers (eval.teacher_group_bytes), whatever the number of units; the baselines
    without activation checkpointing at a wide batch do not fit, and the knob says so."""
    p = make_plan(load_config(REPO / "configs" / "t5-xl-sni.yaml"), 2, 8)
    ev = p["stages"]["evaluate"]
    assert ev["fits"] and p["stages"]["baselines"]["fits"]

    def group(plan: dict) -> int:
        return next(q["bytes"] for q in plan["stages"]["evaluate"]["phases"]["teacher"] if "group of" in q["name"])
    small = make_plan(load_config(REPO / "configs" / "t5-xl-sni.yaml", ["eval.teacher_group_bytes=300000000"]), 2, 8)
    one = 18_874_368 * 4  # a T5-XL teacher (q, v at r=32), fp32
    assert group(p) == 16 * one and group(small) == 3 * one  # 16 tasks per unit; 300 MB / 75.5 MB = 3
    bl = make_plan(load_config(REPO / "configs" / "t5-xl-sni.yaml", ["backbone.gradient_checkpointing=false",
                                                                     "baselines.instances_per_task=32"]),
                   2, 8, stage="baselines")["stages"]["baselines"]
    assert not bl["fits_gpu"] and any("backbone.gradient_checkpointing" in k for k in bl["knobs"])


def test_stage_selection_and_bad_input():
    cfg = load_config(REPO / "configs" / "tiny.yaml")
    assert stages_run(cfg) == ["teacher", "cache-logits", "pretrain", "finetune", "baselines", "evaluate"]
    only = load_config(REPO / "configs" / "tiny.yaml", ["eval.methods=[no_ft]", "pretrain.enabled=false"])
    assert stages_run(only) == ["evaluate"]
    p = make_plan(load_config(REPO / "configs" / "t5-xl-p3.yaml"), 1, 8, stage="cache-logits")
    assert list(p["stages"]) == ["cache-logits"]
    with pytest.raises(ConfigError, match="--stage"):
        make_plan(cfg, 1, 8, stage="train")
    with pytest.raises(ConfigError, match="--nodes"):
        make_plan(cfg, 0, 8)
    assert set(STAGES) == {"teacher", "cache-logits", "pretrain", "finetune", "baselines", "evaluate"}


def test_cli_json_and_table_through_the_real_entry_point():
    base = [sys.executable, "-m", "tagi_ds.cli", "plan", "--config", "configs/t5-xl-p3.yaml", "--nodes", "2",
            "--gpus-per-node", "8"]
    out = subprocess.run(base + ["--json", "--gpu-mem", "40", "--host-mem", "512", "--stage", "finetune"], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    p = json.loads(out.stdout)
    assert p["limits"] == {"gpu_gib": 40, "host_gib_per_node": 512, "host_gib_per_rank": 64,
                           "throughput_tflops_per_gpu": 100.0, "mem_bandwidth_gbs_per_gpu": 1500.0}
    assert list(p["stages"]) == ["finetune"] and p["data"]["assumptions"]  # no P3 data here: said so
    table = subprocess.run(base + ["--throughput", "300"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert table.returncode == 0, table.stderr[-2000:]
    assert "GPU GiB" in table.stdout and "evaluate" in table.stdout and "300 TFLOP/s" in table.stdout
    bad = subprocess.run(base + ["--stage", "nope"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


def test_decoding_time_has_the_launch_bound_floor_measured_on_a_gpu(llama_plan):
    """Greedy decoding is launch-bound (bench/eval_throughput.py on an H200: ~1.2 ms per decoder layer a step at
    any batch), so evaluate's time does not vanish with memory bandwidth; the old estimate (weights / bandwidth)
    put SNI evaluation of LLaMA-7B at a tenth of what the device measured."""
    from tagi_ds.plan.report import DECODE_LAYER_STEP_S

    cfg = load_config(REPO / "configs" / "llama-sni.yaml")
    fast = make_plan(cfg, nodes=2, gpus_per_node=8, stage="evaluate", mem_bandwidth_gbs=1e9, throughput_tflops=1e9)
    ev = fast["stages"]["evaluate"]
    e = cfg.eval
    instances = sum(s["instances"] for k, s in fast["data"]["splits"].items() if k != "train")
    floor_s = instances / e.batch_size * e.max_new_tokens * 32 * DECODE_LAYER_STEP_S / 16  # 32 layers, 16 GPUs
    assert ev["time_s"] >= 0.95 * floor_s * len(e.methods) > 0
    assert ev["time_s"] == pytest.approx(llama_plan["stages"]["evaluate"]["time_s"], rel=0.2)  # launch-bound
