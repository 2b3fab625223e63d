"""report.json / report.md / plots written atomically and read back with exactly the published keys."""
from __future__ import annotations

import json
import math

import pytest

from tagi_ds.errors import ArtifactMismatchError, ConfigError
from tagi_ds.eval.report import SPLITS, read_report, write_report

PNG = b"\x89PNG\r\n\x1a\n"


def _results():
    return {
        "tk_instruct": {"unseen": {"rougeL": 40.1, "exact_match": 20.5}, "seen": {"rougeL": 55.0, "exact_match": 30.0},
                        "relative_flops": 1.0, "time_s": 0.012},
        "tagi": {"unseen": {"rougeL": 42.25, "exact_match": 21.0}, "unseen_paraphrase": {"rougeL": 41.0},
                 "relative_flops": 0.41},
        "no_instruction": {"unseen": None},
    }


def test_write_and_read_back(tmp_path):
    curves = {"finetune/loss": [(0, 3.0), (10, 2.0), (20, 1.5)], "finetune/kl": [(0, 1.0), (20, 0.2)], "empty": []}
    extra = {"P3 accuracy": [{"dataset": "rte", "tagi": 61.234, "tk_instruct": 58.0}]}
    written = write_report(tmp_path, _results(), curves, extra_tables=extra,
                           echo={"unseen": {"rougeL": 12.5, "exact_match": 0.0}}, timings={"tagi": 0.004})
    data = read_report(tmp_path)
    assert json.loads((tmp_path / "report.json").read_text()) == data
    assert set(data) == {"tk_instruct", "tagi", "no_instruction"}
    for entry in data.values():
        assert set(entry) == {"unseen", "unseen_paraphrase", "unseen_composition", "seen", "relative_flops"}
    assert data["tagi"]["unseen"] == {"rougeL": 42.25, "exact_match": 21.0}
    assert data["tagi"]["unseen_paraphrase"] == {"rougeL": 41.0, "exact_match": None}
    assert data["tagi"]["seen"] is None and data["tagi"]["unseen_composition"] is None
    assert data["no_instruction"] == {s: None for s in SPLITS} | {"relative_flops": None}
    assert data["tk_instruct"]["relative_flops"] == 1.0

    md = (tmp_path / "report.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| ")}
    assert "42.25" in rows["tagi"] and "0.410" in rows["tagi"] and "0.0040" in rows["tagi"]
    assert "0.0120" in rows["tk_instruct"]           # time from results[m]["time_s"]
    assert "12.50" in rows["*echo input (reference)*"]
    assert rows["tk_instruct"].index("40.10") < rows["tk_instruct"].index("55.00")  # unseen column before seen
    header = next(line for line in md.splitlines() if line.startswith("| method |"))
    assert header.startswith("| method | unseen EM | unseen R-L |")  # EM leads, R-L beside it
    assert rows["tk_instruct"].index("20.50") < rows["tk_instruct"].index("40.10")
    assert "echo row" in md
    assert "## P3 accuracy" in md and "61.23" in md
    assert "![Unseen-task ROUGE-L per method](unseen_rougeL.png)" in md
    assert md.index("(unseen_em.png)") < md.index("(unseen_rougeL.png)")
    assert "(training_curves.png)" in md
    for key in ("em_plot", "bar_plot", "curves_plot"):
        assert written[key].read_bytes()[:8] == PNG
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left behind


def test_no_numbers_no_plots(tmp_path):
    written = write_report(tmp_path, {"no_ft": {}}, curves={})
    assert not {"em_plot", "bar_plot", "curves_plot"} & set(written)
    assert not (tmp_path / "unseen_rougeL.png").exists()
    assert ".png" not in (tmp_path / "report.md").read_text()
    assert read_report(tmp_path) == {"no_ft": {s: None for s in SPLITS} | {"relative_flops": None}}


def test_bad_results_rejected(tmp_path):
    with pytest.raises(ConfigError, match="unknown method 'tagi_v2'"):
        write_report(tmp_path, {"tagi_v2": {}})
    with pytest.raises(ConfigError, match="unknown key"):
        write_report(tmp_path, {"tagi": {"unseen_tasks": {}}})
    with pytest.raises(ConfigError, match="finite number"):
        write_report(tmp_path, {"tagi": {"unseen": {"rougeL": math.nan}}})
    with pytest.raises(ConfigError, match="unknown metric"):
        write_report(tmp_path, {"tagi": {"seen": {"rouge1": 3.0}}})
    assert not (tmp_path / "report.json").exists()


def test_read_report_rejects_other_shapes(tmp_path):
    (tmp_path / "report.json").write_text(json.dumps({"tagi": {"unseen": None}}))
    with pytest.raises(ArtifactMismatchError, match="report.json"):
        read_report(tmp_path)
