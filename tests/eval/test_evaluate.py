"""The evaluation harness's pure pieces: scoring per split / task / category against compute_metrics, pooled
splits, trivial floors, prediction files read back, finetune-variant overrides, the FLOPs ordering of methods.
(The whole harness on real trained methods: tests/test_pipeline.py.)"""
from __future__ import annotations

import pytest

from tagi_ds.config import load_config
from tagi_ds.data.tasks import Example, Instance, Task
from tagi_ds.errors import ConfigError, DataError
from tagi_ds.eval.evaluate import (demo_output_scores, echo_scores, pooled_splits, read_predictions, score_split,
                                   write_predictions)
from tagi_ds.run.methods import VARIANT_OVERRIDES, check_methods, variant_config
from tagi_ds.metrics import compute_metrics


def _task(name: str, cat: str, rows: list[tuple[str, str]], demo: str = "apple") -> Task:
    insts = tuple(Instance(f"{name}-{i}", x, (y,), y) for i, (x, y) in enumerate(rows))
    return Task(name, f"do {name}", (Example("a b", demo),), (), insts, (cat,))


@pytest.fixture
def splits():
    a = _task("ta", "Cat One", [("apple bread", "apple"), ("cloud dog", "dog")])
    b = _task("tb", "Cat One", [("egg fish", "two")], demo="two")
    c = _task("tc", "Other Cat", [("grape house ink", "ink house grape"), ("jam kite", "kite jam")])
    return {"seen": [a], "unseen_paraphrase": [b], "unseen_composition": [c]}


def test_score_split_matches_compute_metrics_overall_per_task_and_category(splits):
    tasks = splits["unseen_paraphrase"] + splits["unseen_composition"]
    preds = ["two", "ink grape", "jam kite"]
    got = score_split(tasks, preds)
    refs = [["two"], ["ink house grape"], ["kite jam"]]
    assert got["overall"] == compute_metrics(preds, refs)
    assert got["per_task"]["tb"] == compute_metrics(preds[:1], refs[:1]) == {"rougeL": 100.0, "exact_match": 100.0}
    assert got["per_task"]["tc"] == compute_metrics(preds[1:], refs[1:])
    assert set(got["per_category"]) == {"cat_one", "other_cat"}
    assert got["per_category"]["other_cat"] == got["per_task"]["tc"]
    with pytest.raises(DataError, match="2 predictions for 3 instances"):
        score_split(tasks, preds[:2])


def test_pooled_unseen_and_trivial_floors(splits):
    assert pooled_splits(splits) == {"unseen": ["unseen_paraphrase", "unseen_composition"]}
    assert pooled_splits({"seen": [], "unseen": []}) == {}  # SNI: "unseen" is a split of its own
    echo = echo_scores(splits)
    assert set(echo) == {"seen", "unseen_paraphrase", "unseen_composition", "unseen"}
    pooled_inputs = ["egg fish", "grape house ink", "jam kite"]
    assert echo["unseen"] == compute_metrics(pooled_inputs, [["two"], ["ink house grape"], ["kite jam"]])
    demo = demo_output_scores(splits)
    assert demo["unseen_paraphrase"] == {"rougeL": 100.0, "exact_match": 100.0}  # its demo output is the answer
    assert demo["seen"] == compute_metrics(["apple", "apple"], [["apple"], ["dog"]])


def test_predictions_file_round_trip(tmp_path, splits):
    tasks = splits["unseen_composition"]
    path = tmp_path / "p" / "x.jsonl"
    write_predictions(path, tasks, ["ink", "kite jam"])
    preds, refs = read_predictions(path)
    assert preds == ["ink", "kite jam"] and refs == [["ink house grape"], ["kite jam"]]


def test_variant_overrides_and_method_names():
    cfg = load_config(None, [])
    assert variant_config(cfg, "hint").finetune.lambda_kl == 0.0
    assert variant_config(cfg, "hint").finetune.lambda_ins == 0.0
    assert variant_config(cfg, "tagi_no_fusion").hypernet.fusion is False
    assert variant_config(cfg, "tagi_no_pretrain").finetune.init_from_pretrain is False
    assert cfg.hypernet.fusion is True and cfg.finetune.lambda_kl == 1.0  # the original is untouched
    assert variant_config(cfg, "tagi").finetune == cfg.finetune
    assert set(VARIANT_OVERRIDES) == {"tagi", "hint", "tagi_no_kl", "tagi_no_ins", "tagi_no_pretrain",
                                      "tagi_no_fusion"}
    with pytest.raises(ConfigError, match="finetune variant 'nope'"):
        variant_config(cfg, "nope")
    with pytest.raises(ConfigError, match=r"eval.methods: unknown method\(s\) \['tagi2'\]"):
        check_methods(["tagi", "tagi2"])
