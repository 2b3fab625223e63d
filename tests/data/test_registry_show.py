"""Run task registry (all three sources) and the `tagi-ds tasks` command."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tagi_ds.cli import main as cli_main
from tagi_ds.config import load_config
from tagi_ds.data.p3 import write_p3_fixture
from tagi_ds.data.registry import SPLITS_BY_SOURCE, load_run_tasks, load_run_tasks_from_config
from tagi_ds.errors import DataError

REPO = Path(__file__).resolve().parents[2]
SMALL_SUITE = dict(seed=0, instances_per_task=30, held_back_per_task=10)


def _n(tasks):
    return sum(len(t.instances) for t in tasks)


def test_synthetic_splits():
    splits = load_run_tasks("synthetic", synthetic_kwargs=SMALL_SUITE, max_eval_instances=8)
    assert tuple(splits) == SPLITS_BY_SOURCE["synthetic"]
    assert all(len(t.instances) == 20 for t in splits["train"])
    assert [t.name for t in splits["seen"]] == [t.name for t in splits["train"]]
    assert all(len(t.instances) == 8 for t in splits["seen"])
    for t, s in zip(splits["train"], splits["seen"]):  # seen instances were never trained on
        assert not {i.id for i in t.instances} & {i.id for i in s.instances}
    assert splits["unseen_paraphrase"] and splits["unseen_composition"]
    few = load_run_tasks("synthetic", synthetic_kwargs=SMALL_SUITE, max_tasks=3)
    assert len(few["train"]) == len(few["seen"]) == 3


def test_synthetic_written_as_sni_round_trips(tmp_path):
    from tagi_ds.data.synthetic import build_suite, write_sni

    write_sni(build_suite(**SMALL_SUITE), tmp_path / "syn")
    direct = load_run_tasks("synthetic", synthetic_kwargs=SMALL_SUITE, max_eval_instances=None)
    via = load_run_tasks("sni", sni_dir=str(tmp_path / "syn"), max_instances=None, max_eval_instances=None)
    assert [t.name for t in via["train"]] == [t.name for t in direct["train"]]
    assert [t.name for t in via["seen"]] == [t.name for t in direct["seen"]]  # '__seen_eval' suffix removed
    assert _n(via["seen"]) == _n(direct["seen"])
    assert {t.name for t in via["unseen"]} == {t.name for t in direct["unseen_paraphrase"] + direct["unseen_composition"]}
    a, b = via["train"][0], direct["train"][0]
    assert [(i.id, i.input, i.references) for i in a.instances] == [(i.id, i.input, i.references) for i in b.instances]


def test_sni_real_counts(sni_dir):
    splits = load_run_tasks("sni", sni_dir=str(sni_dir), max_tasks=20, max_instances=10, max_eval_instances=5)
    assert len(splits["train"]) == 20 and all(len(t.instances) == 10 for t in splits["train"])
    assert len(splits["unseen"]) == 83 and _n(splits["unseen"]) == 83 * 5
    assert all(t.meta["seen_from"] == "train_instances" for t in splits["seen"])
    held = load_run_tasks("sni", sni_dir=str(sni_dir), max_tasks=5, max_instances=10, max_eval_instances=5,
                          seen_held_back=3)
    for t, s in zip(held["train"], held["seen"]):
        assert len(t.instances) == 10 and len(s.instances) == 3 and s.name == t.name
        assert not {i.id for i in t.instances} & {i.id for i in s.instances}


def test_the_config_holds_seen_instances_back(sni_dir):
    """data.seen_held_back reaches the registry (it was a keyword no config could set): the seen split is made of
    instances the training split no longer has, and says so."""
    base = ["data.source=sni", f"data.sni_dir={sni_dir}", "data.max_tasks=4", "data.max_instances_per_task=6",
            "data.max_eval_instances_per_task=2"]
    cfg = load_config(REPO / "configs" / "tiny.yaml", base + ["data.seen_held_back=2"])
    splits = load_run_tasks_from_config(cfg)
    for t, s in zip(splits["train"], splits["seen"]):
        assert len(t.instances) == 6 and len(s.instances) == 2 and s.meta["seen_from"] == "held_back"
        assert not {i.id for i in t.instances} & {i.id for i in s.instances}
    plain = load_run_tasks_from_config(load_config(REPO / "configs" / "tiny.yaml", base))
    assert all(s.meta["seen_from"] == "train_instances" for s in plain["seen"])


def test_p3_registry(tmp_path):
    root = write_p3_fixture(tmp_path / "p3", rows_per_split=30)
    splits = load_run_tasks("p3", p3_dir=str(root), max_instances=10, max_eval_instances=6, p3_num_demonstrations=2)
    assert tuple(splits) == ("train", "seen", "unseen")
    assert len(splits["train"]) == 4 and len(splits["unseen"]) == 3
    assert all(len(t.instances) == 6 for t in splits["unseen"])


def test_registry_errors(tmp_path):
    with pytest.raises(DataError, match="sni_dir"):
        load_run_tasks("sni")
    with pytest.raises(DataError, match="p3_dir"):
        load_run_tasks("p3")
    with pytest.raises(DataError, match="data.source"):
        load_run_tasks("web")


def test_from_config(tmp_path):
    cfg = load_config(None, ["data.synthetic.instances_per_task=30", "data.synthetic.held_back_per_task=10",
                             "data.max_tasks=4", "data.max_eval_instances_per_task=5"])
    splits = load_run_tasks_from_config(cfg)
    assert len(splits["train"]) == 4 and all(len(t.instances) == 5 for t in splits["seen"])


def test_cli_json_and_table(capsys):
    code = cli_main(["tasks", "--synthetic", "--json", "--max-eval-instances", "7"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    expect = load_run_tasks("synthetic", max_eval_instances=7)
    assert out["instances"] == sum(_n(v) for v in expect.values())
    assert out["tasks"] == len({t.name for v in expect.values() for t in v})
    assert sum(out["categories"].values()) == out["tasks"]
    assert out["splits"]["train"]["tasks"] == len(expect["train"])
    assert cli_main(["tasks", "--synthetic"]) == 0
    table = capsys.readouterr().out
    assert "unseen_composition" in table and "synthetic primitive" in table


def test_cli_config_and_overrides(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("data:\n  source: p3\n  p3_dir: " + str(write_p3_fixture(tmp_path / "p3", 30)) +
                   "\n  p3_num_demonstrations: 2\n", encoding="utf-8")
    assert cli_main(["tasks", "--config", str(cfg), "data.max_instances_per_task=5", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["splits"]["train"]["instances"] == 4 * 5


def test_cli_show_sni(sni_dir, capsys):
    name = "task879_schema_guided_dstc8_classification"
    assert cli_main(["tasks", "--sni", str(sni_dir), "--max-tasks", "1", "--show", name]) == 0
    out = capsys.readouterr().out
    assert "Now complete the following example -\nInput: Which city should I search?\nOutput: \n----- end" in out
    teacher = out.split("----- teacher")[1].split("----- end")[0]
    assert "Definition: You are given a sentence" in teacher and " Positive Example 2 -" in teacher
    student = out.split("----- student hypernetwork")[1].split("----- end")[0]
    assert "Now complete" not in student and " Positive Example 2 -" in student


def test_cli_show_unknown_task(capsys):
    assert cli_main(["tasks", "--synthetic", "--show", "no_such_task"]) == 2
    assert "no_such_task" in capsys.readouterr().err


def test_cli_show_with_tokenizer_drops_examples(sni_dir, t5_tokenizer, tmp_path, capsys):
    from tagi_ds.data import prompts
    from tagi_ds.data.sni import load_sni_task

    name = "task879_schema_guided_dstc8_classification"
    t5_tokenizer.save_pretrained(str(tmp_path / "tok"))
    task = load_sni_task(sni_dir / "tasks" / f"{name}.json", cap="first")
    d, x = prompts.definition_text(task), prompts.build_task_input(task.instances[0])
    limit = len(t5_tokenizer(d + prompts.example_text(1, task.positive_examples[0]) + x)["input_ids"])
    args = ["tasks", "--sni", str(sni_dir), "--max-tasks", "1", "--show", name, "--tokenizer", str(tmp_path / "tok"),
            "--max-source-length", str(limit)]
    assert cli_main(args) == 0
    teacher = capsys.readouterr().out.split("----- teacher")[1].split("----- end")[0]
    assert " Positive Example 1 -" in teacher and " Positive Example 2 -" not in teacher
