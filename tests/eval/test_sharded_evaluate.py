"""Sharded, resumable evaluation on a finished micro run (teachers, tk_instruct baseline, TAGI export):
- 2 gloo ranks under torchrun give exactly the 1-process predictions and report, each rank answering its half;
- kill -9 of one shard mid-way, then a rerun: only that shard's missing files are answered (mtimes), the report
  equals the uninterrupted one;
- a shard file of another configuration or execution plan is never reused; --list shows shards and their status.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

from tests.eval.eval_helpers import metrics_numbers, predictions, snapshot
from tests.proc_helpers import REPO, free_port, worker_env

from tagi_ds.cli import main as cli_main
from tagi_ds.eval import evaluate
from tagi_ds.eval.shards import Shard


def _shard_files(run_dir, count: int) -> dict[str, dict]:
    return {str(p.relative_to(run_dir / "eval" / "shards")): json.loads(p.read_text())
            for p in sorted((run_dir / "eval" / "shards").rglob(f"*-of-{count:05d}.json"))}


def test_two_gloo_ranks_give_the_one_process_predictions_each_rank_half(micro):
    run_dir = micro.copy("two")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "tagi_ds.cli", "evaluate", *micro.args(name="two"), "--no-progress"]
    r = subprocess.run(cmd, cwd=REPO, env=worker_env(), capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-4000:]
    assert predictions(run_dir) == predictions(micro.run_dir)
    assert (run_dir / "report.json").read_text() == (micro.run_dir / "report.json").read_text()
    assert metrics_numbers(run_dir) == metrics_numbers(micro.run_dir)
    shards = _shard_files(run_dir, 2)
    # every (method, split) the run answers was cut in two, shard i answered by rank i of 2
    assert {k.rsplit("/", 1)[0] for k in shards} == {f"{m}/{s}" for m in ("no_ft", "tk_instruct", "tagi")
                                                     for s in ("seen", "unseen_paraphrase", "unseen_composition")
                                                     } | {"teacher/seen"}
    per_rank = {0: 0, 1: 0}
    for name, obj in shards.items():
        who = obj["written_by"]
        assert who["world_size"] == 2 and who["rank"] == int(name.rsplit("/", 1)[1].split("-")[0])
        per_rank[who["rank"]] += len(obj["rows"])
    for key in {k.rsplit("/", 1)[0] for k in shards}:
        n0, n1 = (len(shards[f"{key}/{i:05d}-of-00002.json"]["rows"]) for i in (0, 1))
        assert n0 > 0 and n1 > 0 and abs(n0 - n1) <= 2, (key, n0, n1)  # within one unit (1 task x 2 instances)
    total = sum(per_rank.values())
    assert abs(per_rank[0] - total / 2) <= 0.1 * total, per_rank


def test_sigkill_one_shard_then_rerun_redoes_only_its_missing_files(micro, tmp_path):
    run_dir = micro.copy("killed")
    assert evaluate.run(micro.cfg(name="killed"), progress=False, log=lambda _m: None, shard=Shard(0, 2)) is None
    assert not (run_dir / "report.json").exists()  # shard 1 missing: this element does not write the report
    pid_file = tmp_path / "pid"
    cmd = [sys.executable, "-m", "tests.eval.eval_helpers", "--stall-after", "3", "--pid-file", str(pid_file), "--",
           *micro.args("shard=1/2", name="killed"), "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=worker_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.time() + 300
        while not pid_file.exists():
            assert proc.poll() is None, f"worker exited early: {proc.stderr.read()[-3000:]}"
            assert time.time() < deadline, "the shard never published its third file"
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    shards = run_dir / "eval" / "shards"
    before = snapshot(shards)
    done1 = [k for k in before if k.endswith("00001-of-00002.json")]
    assert len(done1) == 3 and len([k for k in before if k.endswith("00000-of-00002.json")]) == 10
    assert not list(shards.rglob(".*tmp*"))  # nothing half-written is left under a final name

    logs: list[str] = []
    evaluate.run(micro.cfg(name="killed"), progress=False, log=logs.append, shard=Shard(1, 2))
    after = snapshot(shards)
    assert {k: after[k] for k in before} == before  # shard 0 and shard 1's three published files untouched
    redone = sorted(set(after) - set(before))
    assert len(redone) == 7 and all(k.endswith("00001-of-00002.json") for k in redone)
    assert any("shard file(s) already complete, reused" in line for line in logs)
    assert json.loads((run_dir / "report.json").read_text()) == json.loads((micro.run_dir / "report.json").read_text())
    assert predictions(run_dir) == predictions(micro.run_dir)
    assert metrics_numbers(run_dir) == metrics_numbers(micro.run_dir)


def test_a_shard_of_another_plan_or_configuration_is_not_reused(micro):
    run_dir = micro.copy("plans")
    cfg = micro.cfg(name="plans")
    evaluate.run(cfg, progress=False, log=lambda _m: None, methods=["no_ft"])
    first = snapshot(run_dir / "eval" / "shards")
    logs: list[str] = []
    evaluate.run(cfg, progress=False, log=logs.append, methods=["no_ft"])  # same plan: every file reused
    assert snapshot(run_dir / "eval" / "shards") == first
    assert any("3 shard file(s) already complete, reused" in line for line in logs)
    # another execution plan (units of 2 tasks): the same files are answered again, same predictions
    preds = predictions(run_dir)
    evaluate.run(micro.cfg("eval.tasks_per_batch=2", name="plans"), progress=False, log=lambda _m: None,
                 methods=["no_ft"])
    again = snapshot(run_dir / "eval" / "shards")
    assert set(again) == set(first) and all(again[k] != first[k] for k in first)
    assert predictions(run_dir) == preds
    # a retrained artifact (the baseline's weights rewritten) changes the key: its shards are answered again
    w = run_dir / "baselines" / "tk_instruct" / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes())
    evaluate.run(micro.cfg("eval.tasks_per_batch=2", name="plans"), progress=False, log=lambda _m: None,
                 methods=["tk_instruct"])
    tk = {k: v for k, v in snapshot(run_dir / "eval" / "shards").items() if k.startswith("tk_instruct")}
    evaluate.run(micro.cfg("eval.tasks_per_batch=2", name="plans"), progress=False, log=lambda _m: None,
                 methods=["tk_instruct"])
    assert {k: v for k, v in snapshot(run_dir / "eval" / "shards").items() if k.startswith("tk_instruct")} == tk
    w.write_bytes(w.read_bytes())
    evaluate.run(micro.cfg("eval.tasks_per_batch=2", name="plans"), progress=False, log=lambda _m: None,
                 methods=["tk_instruct"])
    assert all(v != tk[k] for k, v in snapshot(run_dir / "eval" / "shards").items() if k.startswith("tk_instruct"))


def test_list_shows_each_shard_and_its_status(micro, capsys):
    capsys.readouterr()
    assert cli_main(["evaluate", *micro.args(), "--list", "--shards", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = [line.split("\t") for line in out if not line.startswith("#") and "\t" in line]
    assert {(r[0], r[1], r[2]) for r in rows} >= {("tagi", "seen", "0/2"), ("tagi", "seen", "1/2"),
                                                  ("teacher", "seen", "1/2")}
    assert all(r[5] == "todo" for r in rows)  # the pipeline's evaluation was one shard, not two
    assert sum(int(r[4]) for r in rows if r[0] == "tagi" and r[1] == "seen") == 4
    assert "torchrun --nproc_per_node=2 -m tagi_ds.cli evaluate --config" in "\n".join(out)
    assert cli_main(["evaluate", *micro.args(), "--list"]) == 0
    one = [line.split("\t") for line in capsys.readouterr().out.splitlines() if "\t0/1\t" in line]
    assert one and all(r[5] == "done" for r in one)
    assert cli_main(["evaluate", *micro.args(), "shard=2/2"]) == 2
    assert "shard=2/2: expected 0 <= i < n" in capsys.readouterr().err
