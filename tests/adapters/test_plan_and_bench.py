"""predict's input planning (no model), and bench/inference.py on a small config: counted FLOPs agree with the
analytic model, and TAGI costs ≤ 0.4× Tk-Instruct at 100 instances per task."""
from __future__ import annotations

import importlib.util
import json
import sys
from argparse import Namespace
from pathlib import Path

import pytest

from tagi_ds.adapters.predict import InputRow, plan_tasks, read_inputs
from tagi_ds.data.sni import load_sni_task
from tagi_ds.errors import DataError

from tests.adapters.adapters_helpers import write_task_file

REPO = Path(__file__).resolve().parents[2]


def test_instruction_column_groups_rows_by_text(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"id": 7, "input": "a", "instruction": "Copy."}, {"input": "b", "instruction": "Reverse.", "task": "rev"},
        {"input": "c", "instruction": "Copy."}]) + "\n\n")
    rows = read_inputs(path)
    assert [r.id for r in rows] == ["7", "1", "2"]
    plan = plan_tasks(rows, None, [])
    assert plan.sources == ["Copy.", "Reverse."] and plan.names == ["task0", "rev"] and plan.task_of_row == [0, 1, 0]
    with pytest.raises(DataError, match="has no \"instruction\""):
        plan_tasks([InputRow("x", "a")], None, [])


def test_several_task_files_need_a_task_column(tmp_path):
    t0 = load_sni_task(write_task_file(tmp_path / "copy.json", 0))
    t1 = load_sni_task(write_task_file(tmp_path / "last.json", 1))
    plan = plan_tasks(None, None, [t0, t1])  # the files' own instances
    assert plan.names == ["copy", "last"] and plan.task_of_row == [0] * 5 + [1] * 5
    with pytest.raises(DataError, match=r"input id 'x' has no \"task\".*\['copy', 'last'\]"):
        plan_tasks([InputRow("x", "a")], None, [t0, t1])
    with pytest.raises(DataError, match="--inputs is required"):
        plan_tasks(None, "Copy.", [])


def test_inference_bench_small(capsys):
    spec = importlib.util.spec_from_file_location("bench_inference", REPO / "bench" / "inference.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # dataclasses resolve annotations through sys.modules
    try:
        spec.loader.exec_module(bench)
    finally:
        sys.modules.pop(spec.name, None)
    args = bench.parse_args(["--small", "--input-len", "32", "--out-len", "2", "--batch", "1", "--reps", "1",
                             "--r", "8", "--hypernet-hidden", "64"])
    import torch

    for arch in ("t5", "llama"):
        res = bench.measure(arch, 256, args, torch.device("cpu"), torch.float32)
        assert abs(res["counted_vs_analytic_tk"] - 1.0) < 0.01  # flops.py counts what FlopCounterMode counts
        tagi = res["ratios"]["tagi"]
        assert abs(tagi[100]["flops_counted"] - tagi[100]["flops_analytic"]) < 0.01
        assert tagi[100]["flops_analytic"] <= 0.4 < tagi[1]["flops_analytic"]  # amortisation is what saves
        assert res["ratios"]["no_instr"][100]["flops_analytic"] < tagi[100]["flops_analytic"]
        print(bench.format_table(res, Namespace(**{**vars(args), "small": True}), torch.device("cpu"),
                                 torch.float32))
    assert "FLOPs counted" in capsys.readouterr().out
