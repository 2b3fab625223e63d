"""The end-to-end pipeline on a micro config (seconds-scale budgets, a 2-layer backbone, 3 training tasks):
report.json with the exact schema, report.md and PNGs; a rerun skips every stage; `--from evaluate` redoes only
evaluate; evaluate's numbers equal metrics.compute_metrics on the written predictions."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.tiny import backbone_dir
from tagi_ds.cli import main as cli_main
from tagi_ds.config import load_config
from tagi_ds.errors import ArtifactMismatchError, ConfigError
from tagi_ds.eval.evaluate import read_predictions
from tagi_ds.metrics import compute_metrics
from tagi_ds.eval.report import SPLITS, read_report

METHODS = ["no_ft", "no_instruction", "tk_instruct", "teacher", "hint", "tagi"]
STAGES = ["backbone", "teacher", "cache-logits", "pretrain", "finetune", "baselines", "evaluate"]


def build_backbone(out: Path) -> Path:
    """A sentencepiece tokenizer on the suite's wording + a seeded random 2-layer LLaMA (hidden 32)."""
    return backbone_dir(out, hidden=32, ffn=64, vocab=400, suite_size=(10, 2))


MICRO = """\
name: micro
seed: 0
device: cpu
threads: 1
data:
  source: synthetic
  max_tasks: 3
  max_eval_instances_per_task: 1
  max_source_length: 160
  max_input_length: 24
  max_target_length: 12
  pretrain_text: offline
  pretrain_offline_docs: 20
  pretrain_segment_lengths: [16, 8, 8]
  synthetic: {instances_per_task: 12, held_back_per_task: 2}
backbone: {arch: llama, target_modules: [q, v]}
lora: {r: 2, alpha: 4.0}
hypernet: {hidden: 16, trunk_layers: 1, embed_dim: 8, kernel: reference}
teacher: {steps: 2, batch_size: 4, tasks_per_batch: 8, warmup_steps: 1, checkpoint_every: 0}
cache: {top_k: 8, temperature: 2.0, batch_size: 16}
pretrain: {steps: 2, micro_batch_size: 4, warmup_steps: 1, checkpoint_every: 0, log_every: 1}
finetune: {steps: 2, tasks_per_batch: 2, instances_per_task: 2, warmup_steps: 1, checkpoint_every: 0, log_every: 1,
           temperature: 2.0, lambda_ins: 0.5}
distributed: {use_deepspeed: false}
eval: {max_new_tokens: 3, batch_size: 32}
baselines: {steps: 2, tasks_per_batch: 2, instances_per_task: 2}
stage_budgets_s: {teacher: 10, pretrain: 10, finetune: 10, baselines: 10}
"""


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    bb = build_backbone(root / "bb")
    yaml = root / "micro.yaml"
    yaml.write_text(MICRO)
    overrides = [f"runs_dir={root / 'runs'}", f"backbone.name_or_path={bb}"]
    argv = ["pipeline", "--config", str(yaml), "--no-progress", *overrides]
    assert cli_main(argv) == 0
    return root / "runs" / "micro", argv, yaml, overrides


def _statuses(run_dir: Path) -> dict[str, str]:
    rec = json.loads((run_dir / "pipeline.json").read_text())["stages"]
    return {r["stage"] + (f":{r['sub']}" if r["sub"] else ""): r["status"] for r in rec}


def test_first_run_writes_the_report_with_the_exact_schema(micro):
    run_dir, _, _, _ = micro
    report = json.loads((run_dir / "report.json").read_text())
    assert set(report) == set(METHODS)
    for m, entry in report.items():
        assert set(entry) == set(SPLITS) | {"relative_flops"}
        for s in SPLITS:
            if entry[s] is not None:
                assert set(entry[s]) == {"rougeL", "exact_match"}
                assert 0.0 <= entry[s]["rougeL"] <= 100.0
    assert report["teacher"]["unseen"] is None and report["teacher"]["seen"] is not None
    assert report["tk_instruct"]["relative_flops"] == pytest.approx(1.0)
    assert report["tagi"]["relative_flops"] < 1.0 and report["no_instruction"]["relative_flops"] < 1.0
    read_report(run_dir)  # the published shape
    md = (run_dir / "report.md").read_text()
    assert "| tagi |" in md and "echo input" in md and "unseen_rougeL.png" in md
    for png in ("unseen_rougeL.png", "training_curves.png"):
        assert (run_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run_dir / "config.yaml").is_file()
    assert set(_statuses(run_dir).values()) == {"ran"}
    assert set(_statuses(run_dir)) == {"backbone", "teacher", "cache-logits", "pretrain", "finetune:hint",
                                       "finetune:tagi", "baselines:no_instruction", "baselines:tk_instruct",
                                       "evaluate"}


def test_evaluate_numbers_equal_compute_metrics_on_the_written_predictions(micro):
    run_dir, _, _, _ = micro
    report = read_report(run_dir)
    for m in METHODS:
        pooled_p, pooled_r = [], []
        for split in ("seen", "unseen_paraphrase", "unseen_composition"):
            path = run_dir / "eval" / "predictions" / m / f"{split}.jsonl"
            if report[m][split] is None:
                assert not path.exists()
                continue
            preds, refs = read_predictions(path)
            assert compute_metrics(preds, refs) == report[m][split]
            if split.startswith("unseen"):
                pooled_p += preds
                pooled_r += refs
        if report[m]["unseen"] is not None:
            assert compute_metrics(pooled_p, pooled_r) == report[m]["unseen"]
    # per-task numbers in metrics.json agree with the predictions too
    details = json.loads((run_dir / "eval" / "metrics.json").read_text())["methods"]["tagi"]["unseen_paraphrase"]
    preds, refs = read_predictions(run_dir / "eval" / "predictions" / "tagi" / "unseen_paraphrase.jsonl")
    tasks = [json.loads(x)["task"] for x in
             (run_dir / "eval" / "predictions" / "tagi" / "unseen_paraphrase.jsonl").read_text().splitlines()]
    first = tasks[0]
    idx = [i for i, t in enumerate(tasks) if t == first]
    assert details["per_task"][first] == compute_metrics([preds[i] for i in idx], [refs[i] for i in idx])


def test_rerun_skips_every_stage(micro, capsys):
    run_dir, argv, _, _ = micro
    capsys.readouterr()
    t0 = time.perf_counter()
    assert cli_main(argv) == 0
    took = time.perf_counter() - t0
    out = capsys.readouterr().out
    assert set(_statuses(run_dir).values()) == {"skipped"}
    assert out.count(": skipped (done") == 9
    assert took < 15, f"a rerun with every stage done took {took:.1f} s"


def test_from_evaluate_redoes_only_evaluate(micro):
    run_dir, argv, _, _ = micro
    teacher_file = next((run_dir / "teachers").glob("*/adapter_model.safetensors"))
    export = run_dir / "finetune" / "tagi" / "export" / "trainable.safetensors"
    before = (teacher_file.stat().st_mtime_ns, export.stat().st_mtime_ns)
    report_before = (run_dir / "report.json").stat().st_mtime_ns
    assert cli_main(argv + ["--from", "evaluate"]) == 0
    st = _statuses(run_dir)
    assert st.pop("evaluate") == "ran" and set(st.values()) == {"skipped"}
    assert (teacher_file.stat().st_mtime_ns, export.stat().st_mtime_ns) == before
    assert (run_dir / "report.json").stat().st_mtime_ns != report_before
    read_report(run_dir)


def test_changed_baseline_config_is_refused_not_mixed(micro):
    from tagi_ds.train import baselines

    _, _, yaml, overrides = micro
    cfg = load_config(yaml, overrides + ["baselines.lr=0.5"])
    with pytest.raises(ArtifactMismatchError, match=r"baselines \(tk_instruct\) outputs of another configuration"):
        baselines.run(cfg, "tk_instruct")


def test_standalone_stages_reuse_the_pipeline_outputs(micro, capsys):
    """`tagi-ds baselines` / `tagi-ds evaluate` alone (no stage budgets applied by the pipeline) see the pipeline's
    own outputs as done: same identity."""
    run_dir, _, yaml, overrides = micro
    capsys.readouterr()
    assert cli_main(["baselines", "--config", str(yaml), *overrides]) == 0
    out = capsys.readouterr().out
    assert "baseline tk_instruct: skipped" in out and "baseline no_instruction: skipped" in out
    assert cli_main(["evaluate", "--config", str(yaml), *overrides]) == 0
    read_report(run_dir)


def test_a_standalone_evaluate_of_another_configuration_is_refused_and_the_pipeline_versions_it(micro, capsys):
    """evaluate has an identity like every stage: alone, another configuration's evaluation is refused before
    anything is written; the pipeline (which runs the new configuration on purpose) archives the old report."""
    run_dir, argv, yaml, overrides = micro
    before = {p: p.stat().st_mtime_ns for p in (run_dir / "eval").rglob("*") if p.is_file()}
    report = (run_dir / "report.json").read_bytes()
    assert cli_main(["evaluate", "--config", str(yaml), *overrides, "eval.methods=[no_ft]"]) == 2
    assert "eval.methods" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in (run_dir / "eval").rglob("*") if p.is_file()} == before
    assert cli_main(argv + ["eval.methods=[no_ft, tagi]"]) == 0
    assert set(json.loads((run_dir / "report.json").read_text())) == {"no_ft", "tagi"}
    archived = list((run_dir / "eval_archive").glob("*/report.json"))
    assert len(archived) == 1 and archived[0].read_bytes() == report
    assert cli_main(argv) == 0  # back to the first configuration: evaluated again (and the other one archived)
    assert json.loads((run_dir / "report.json").read_text()) == json.loads(report)


def test_unknown_stage_budget_and_from_stage_are_refused(micro):
    from tagi_ds.pipeline import run

    _, _, yaml, overrides = micro
    with pytest.raises(ConfigError, match="stage_budgets_s: unknown stage"):
        run(load_config(yaml, overrides + ["stage_budgets_s={teachers: 3}"]))
    with pytest.raises(ConfigError, match="--from 'nope'"):
        run(load_config(yaml, overrides), from_stage="nope")


def test_sigkill_at_a_random_point_then_rerun_gives_the_same_report(micro):
    """Kill -9 the whole pipeline (a real process) after a random number of finished stages, mid-way through the next
    one; rerunning the same command resumes and ends with the same report numbers as the uninterrupted run."""
    import os
    import random
    import signal
    import subprocess
    import sys

    run_dir, argv, yaml, overrides = micro
    expected = json.loads((run_dir / "report.json").read_text())
    kill_root = run_dir.parent.parent / "runs_killed"
    cmd = [sys.executable, "-m", "tagi_ds.cli", "pipeline", "--config", str(yaml), "--no-progress",
           *[o for o in overrides if not o.startswith("runs_dir=")], f"runs_dir={kill_root}"]
    markers = kill_root / "micro" / ".pipeline"
    rng = random.Random(int(os.environ.get("TAGI_KILL_SEED", "7")))
    stages_before_kill = rng.randint(1, 6)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if markers.is_dir() and len(list(markers.glob("*.json"))) >= stages_before_kill:
            time.sleep(rng.uniform(0.0, 0.5))  # somewhere inside the next stage
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"the pipeline ended before the kill point: {proc.stderr.read().decode()[-2000:]}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (kill_root / "micro" / "report.json").exists()

    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert json.loads((kill_root / "micro" / "report.json").read_text()) == expected


@pytest.mark.parametrize("override,expected", [([], "data/c4-en does not exist"), (["data.pretrain_text=null"],
                                                                                      "not set")])
def test_a_scale_config_without_its_pretraining_text_stops_before_any_stage(tmp_path, capsys, override, expected):
    """Issue 18: stage 1 at scale silently trained on ~2,000 generated stories. Now an unset or missing
    data.pretrain_text stops the pipeline before the teachers (hours earlier), naming the key; nothing is written."""
    runs = tmp_path / "runs"
    argv = ["pipeline", "--config", "configs/t5-xl-sni.yaml", "--no-progress", f"runs_dir={runs}", *override]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert "data.pretrain_text" in err and expected in err, err
    assert not runs.exists()
