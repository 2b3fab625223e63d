"""Issue 19 case 15: SIGTERM / SIGUSR1 (`#SBATCH --signal=USR1@120`) stop a long stage at its next safe point with
its work kept, exit 75, and the same command continues. Here: `evaluate` through the real CLI, stopped by a real
SIGTERM after its first unit of tasks; the rerun continues after that unit and writes the predictions and scores of
an uninterrupted evaluation (the pipeline's). Teacher: tests/train/test_rank_aware_stages.py; finetune (and every
stage on the training engine): tests/train/test_scale_memory.py; cache-logits stops between shards.
"""
from __future__ import annotations

import json
import os
import shutil
import signal

from tests.reliability.rel_helpers import cli_run, tree_sha


def _predictions(run):
    return tree_sha(run / "eval" / "predictions")


def _scores(run) -> dict:
    """metrics.json without its timings (seconds and rates differ between any two runs)."""
    m = json.loads((run / "eval" / "metrics.json").read_text())
    return {k: v for k, v in m.items() if k not in ("seconds", "timing")}


def test_sigterm_stops_evaluate_after_a_unit_and_the_rerun_continues(prun, capsys, monkeypatch, request):
    from tagi_ds.eval import evaluate

    rp, runs, run = prun  # its pipeline evaluated with eval.tasks_per_batch=1: 2 units in a split of 2 tasks
    uninterrupted = (_predictions(run), _scores(run))
    shutil.rmtree(run / "eval")
    args = ["evaluate", *rp.args(runs_dir=runs), "--no-progress"]
    real, calls, unhandled = evaluate.answer_tasks, [], []
    handler = lambda signum, frame: unhandled.append(signum)  # noqa: E731  (a stage that ignores SIGTERM: no kill)
    old = signal.signal(signal.SIGTERM, handler)
    request.addfinalizer(lambda: signal.signal(signal.SIGTERM, old))

    def answer_then_sigterm(*a, **kw):  # the scheduler's signal, delivered while the first unit is being answered
        calls.append(1)
        rows = real(*a, **kw)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return rows

    monkeypatch.setattr(evaluate, "answer_tasks", answer_then_sigterm)
    rc, out, err = cli_run(capsys, args)
    assert rc == 75 and "Traceback" not in err and not unhandled, err
    assert len(calls) == 1, "the stage answered more units after SIGTERM"
    partial = next((run / "eval" / "shards").rglob("*.partial.json"))
    line = [ln for ln in err.splitlines() if ln.startswith("tagi-ds evaluate: stopped: evaluate: SIGTERM")]
    assert line and "1 of 2 unit(s)" in line[0] and str(partial) in line[0] and "rerun the same command" in line[0]
    assert not (run / "eval" / "predictions").exists() and not (run / "eval" / "stage.json").exists()
    assert signal.getsignal(signal.SIGTERM) is handler  # the stage's handler is gone with it

    monkeypatch.setattr(evaluate, "answer_tasks", real)
    rc, out, err = cli_run(capsys, args)
    assert rc == 0, err
    assert f"continuing after 1 of 2 unit(s) saved in {partial}" in out, out
    assert not partial.exists()
    assert (_predictions(run), _scores(run)) == uninterrupted
