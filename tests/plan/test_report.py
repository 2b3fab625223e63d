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


def test_finetune_host_flag_names_the_knob(llama_plan):
    """LLaMA SNI: every rank holds every task's KV prefix (issue #15): hundreds of GiB, flagged, knob named."""
    ft = llama_plan["stages"]["finetune"]
    assert not ft["fits_host"] and ft["host_gib_per_rank"] > 600  # 756 tasks x 1024 x 32 layers x K,V: 2 x 378 GiB
    assert ft["host_peak_phase"] == "instruction precompute"
    assert any("data.max_source_length" in k and k.startswith("host:") for k in ft["knobs"])
    assert ft["first_step_forwards"] == 48 + 2  # ceil(756 / 16) chunks + grad_accum micro batches
    assert ft["zero3_gather_gib_per_step"] > 2 * 2 * 6.7 * 0.9  # two gathers of a 13.5 GB backbone per micro batch
    table = format_plan(llama_plan)
    assert "does NOT fit" in table and "finetune: host" in table and "data.max_source_length" in table


def test_smaller_limits_flag_more_and_bigger_limits_none():
    cfg = load_config(REPO / "configs" / "t5-xl-sni.yaml", ["eval.methods=[tagi]"])
    small = make_plan(cfg, 1, 8, gpu_mem_gib=4, host_mem_gib=16)
    assert all(not s["fits"] for s in small["stages"].values())
    assert all(s["knobs"] for s in small["stages"].values())
    big = make_plan(cfg, 1, 8, gpu_mem_gib=10_000, host_mem_gib=100_000)
    assert all(s["fits"] and not s["knobs"] for s in big["stages"].values())


def test_baselines_and_teacher_stack_flags_name_their_knobs():
    p = make_plan(load_config(REPO / "configs" / "t5-xl-sni.yaml"), 2, 8)
    bl, ev = p["stages"]["baselines"], p["stages"]["evaluate"]
    assert not bl["fits_gpu"] and any("eval.baseline_batch_size" in k for k in bl["knobs"])
    assert not ev["fits_gpu"] and ev["gpu_peak_phase"] == "teacher"
    assert any("teacher.group_by" in k for k in ev["knobs"])
    by_category = make_plan(load_config(REPO / "configs" / "t5-xl-sni.yaml", ["teacher.group_by=category"]), 2, 8)

    def stack(plan: dict) -> int:
        return next(q["bytes"] for q in plan["stages"]["evaluate"]["phases"]["teacher"] if "seen teachers" in q["name"])
    assert stack(by_category) * 756 == stack(p) * 60  # 60 category units instead of 756 task units
    assert by_category["stages"]["evaluate"]["gpu_gib"] < ev["gpu_gib"]


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
