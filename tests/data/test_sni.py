"""SNI loading: real data against its manifest, the Tk-Instruct prompt to the character, and bad input."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from tagi_ds.data import prompts
from tagi_ds.data.sni import load_sni, load_sni_task
from tagi_ds.errors import DataError

KNOWN = "task879_schema_guided_dstc8_classification"


# ------------------------------------------------------------------------------------------------ real data
@pytest.fixture(scope="module")
def real(sni_dir):
    train = load_sni(sni_dir, "train", max_instances=None)
    test = load_sni(sni_dir, "test", max_instances=None, cap="first")
    return train, test


def test_counts_match_manifest(sni_dir, real):
    train, test = real
    with open(sni_dir / "manifest.tsv", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    want = {r["task"]: r for r in rows}
    for split, tasks in (("train", train), ("test", test)):
        assert len(tasks) == sum(r["split"] == split for r in rows)
        for t in tasks:
            row = want[t.name]
            assert row["split"] == split
            assert len(t.instances) == int(row["instances_kept"]), t.name
            assert row["category"] in t.categories
    assert sum(len(t.instances) for t in train) == 68417  # README totals
    assert sum(len(t.instances) for t in test) == 4126
    assert not {t.name for t in train} & {t.name for t in test}


def test_cap_and_labels_deterministic(sni_dir):
    a = load_sni(sni_dir, "train", max_instances=7, seed=3, max_tasks=5)
    b = load_sni(sni_dir, "train", max_instances=7, seed=3, max_tasks=5)
    c = load_sni(sni_dir, "train", max_instances=7, seed=4, max_tasks=5)
    assert [t.name for t in a] == [t.name for t in b] and len(a) == 5
    assert all(len(t.instances) == 7 for t in a)
    assert [i.id for t in a for i in t.instances] == [i.id for t in b for i in t.instances]
    assert [i.id for t in a for i in t.instances] != [i.id for t in c for i in t.instances]
    for t in a:
        for inst in t.instances:
            assert inst.label in inst.references


def test_first_cap_keeps_file_order(sni_dir):
    path = sni_dir / "tasks" / f"{KNOWN}.json"
    raw = json.loads(path.read_text(encoding="utf-8"))
    task = load_sni_task(path, max_instances=5, cap="first")
    assert [i.id for i in task.instances] == [r["id"] for r in raw["Instances"][:5]]


def test_tk_instruct_prompt_character_for_character(sni_dir):
    task = load_sni_task(sni_dir / "tasks" / f"{KNOWN}.json", max_instances=None, cap="first")
    inst = task.instances[0]
    # Written by hand from SNI_PROMPT.md (Def + 2 Pos): '.' appended to the examples' bare outputs "No"/"Yes",
    # not after the instance input that already ends in '?'; the third positive example is not used.
    definition = ("Definition: You are given a sentence from a conversation between a human and a virtual "
                  "assistant. Your task is to identify whether the sentence is a question or not. Answer with "
                  "Yes or No.\n\n")
    examples = (" Positive Example 1 -\nInput: I am feeling hungry so I would like to find a place to eat.\n"
                " Output: No.\n\n"
                " Positive Example 2 -\nInput: Do you have a specific which you want the eating place to be "
                "located at?\n Output: Yes.\n\n")
    task_input = "Now complete the following example -\nInput: Which city should I search?\nOutput: "
    assert prompts.build_source(task, inst) == definition + examples + task_input
    assert prompts.build_instruction(task) == definition + examples
    assert prompts.build_task_input(inst) == task_input
    assert prompts.build_source(task, inst, num_pos=0) == definition + task_input  # "Def" setting
    assert inst.references == ("Yes",) and inst.label == "Yes"


def test_examples_dropped_to_fit_max_source_length(sni_dir, t5_tokenizer):
    task = load_sni_task(sni_dir / "tasks" / f"{KNOWN}.json", max_instances=None, cap="first")
    inst = task.instances[0]
    d = prompts.definition_text(task)
    e1, e2 = prompts.example_text(1, task.positive_examples[0]), prompts.example_text(2, task.positive_examples[1])
    x = prompts.build_task_input(inst)
    n = lambda s: len(t5_tokenizer(s)["input_ids"])  # noqa: E731 (counts include eos, as Tk-Instruct's do)
    # Tk-Instruct checks `definition + " ".join(added) + example_i + task_input` before adding example i
    # (the join puts a space between added examples only from the third check on).
    fits_two = n(d + e1 + e2 + x)
    fits_one = n(d + e1 + x)
    assert fits_one < fits_two
    tok = t5_tokenizer
    e3 = prompts.example_text(3, task.positive_examples[2])
    fits_three = n(d + e1 + " " + e2 + e3 + x)
    three = dict(num_pos=3, tokenizer=tok)
    assert prompts.build_source(task, inst, max_source_length=fits_three, **three) == d + e1 + e2 + e3 + x
    assert prompts.build_source(task, inst, max_source_length=fits_three - 1, **three) == d + e1 + e2 + x
    assert prompts.build_source(task, inst, tokenizer=tok, max_source_length=fits_two) == d + e1 + e2 + x
    assert prompts.build_source(task, inst, tokenizer=tok, max_source_length=fits_two - 1) == d + e1 + x
    assert prompts.build_source(task, inst, tokenizer=tok, max_source_length=fits_one) == d + e1 + x
    assert prompts.build_source(task, inst, tokenizer=tok, max_source_length=fits_one - 1) == d + x
    # Still too long without examples: cut to max_source_length tokens and decoded back.
    short = n(d + x) - 5
    cut = prompts.build_source(task, inst, tokenizer=tok, max_source_length=short)
    ids = tok(d + x)["input_ids"]
    assert cut == tok.decode(ids[:short], skip_special_tokens=True)
    assert (d + x).startswith(cut) and len(cut) < len(d + x)


# ------------------------------------------------------------------------------------------------ bad input
def _task_json(**over) -> dict:
    data = {
        "Categories": ["Toy"],
        "Definition": ["Repeat the input."],
        "Positive Examples": [{"input": "a", "output": "a", "explanation": "same"}],
        "Negative Examples": [],
        "Instances": [{"id": "t-1", "input": "x", "output": ["x"]}, {"id": "t-2", "input": "y", "output": ["y"]}],
    }
    data.update(over)
    return data


def _write(folder: Path, name: str, data) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    if isinstance(data, bytes):
        path.write_bytes(data)
    elif isinstance(data, str):
        path.write_text(data, encoding="utf-8")
    else:
        path.write_text(json.dumps(data, indent=4), encoding="utf-8")
    return path


def _raises(path: Path, *fragments: str) -> None:
    with pytest.raises(DataError) as err:
        load_sni_task(path)
    msg = str(err.value)
    assert str(path) in msg
    for frag in fragments:
        assert frag in msg, msg


def test_good_toy_task_loads(tmp_path):
    task = load_sni_task(_write(tmp_path, "toy", _task_json()))
    assert task.name == "toy" and task.definition == "Repeat the input." and task.categories == ("Toy",)
    assert [i.id for i in task.instances] == ["t-1", "t-2"]
    assert task.positive_examples[0].explanation == "same"


def test_not_json_names_line_and_column(tmp_path):
    _raises(_write(tmp_path, "bad", '{\n  "Definition": ["x"],\n  "Instances": [,]\n}'), "not valid JSON",
            "line 3", "column")


def test_not_utf8(tmp_path):
    raw = json.dumps(_task_json(Definition=["caf\u00e9"]), ensure_ascii=False).encode("latin-1")
    _raises(_write(tmp_path, "latin", raw), "not UTF-8")


def test_missing_definition(tmp_path):
    data = _task_json()
    del data["Definition"]
    _raises(_write(tmp_path, "nodef", data), "'Definition'", "missing")


def test_missing_and_empty_instances(tmp_path):
    data = _task_json()
    del data["Instances"]
    _raises(_write(tmp_path, "noinst", data), "'Instances'", "missing")
    _raises(_write(tmp_path, "empty", _task_json(Instances=[])), "'Instances'", "empty")


def test_wrong_types(tmp_path):
    bad_out = _task_json(Instances=[{"id": "t-1", "input": "x", "output": "x"}])
    _raises(_write(tmp_path, "out_str", bad_out), "'Instances[0].output'", "list of strings")
    bad_out2 = _task_json(Instances=[{"id": "t-1", "input": "x", "output": ["x", 3]}])
    _raises(_write(tmp_path, "out_int", bad_out2), "'Instances[0].output'", "list of strings")
    _raises(_write(tmp_path, "def_int", _task_json(Definition=[5])), "'Definition'", "list of strings")
    bad_ex = _task_json(**{"Positive Examples": [{"input": "a", "output": 1}]})
    _raises(_write(tmp_path, "ex", bad_ex), "'Positive Examples[0].output'", "string")
    _raises(_write(tmp_path, "top", [1, 2]), "top level")


def _folder(tmp_path: Path, names: list[str], split_lines: dict[str, str]) -> Path:
    for name in names:
        _write(tmp_path / "tasks", name, _task_json())
    for split, text in split_lines.items():
        (tmp_path / "splits").mkdir(exist_ok=True)
        (tmp_path / "splits" / f"{split}_tasks.txt").write_text(text, encoding="utf-8")
    return tmp_path


def test_split_naming_missing_task(tmp_path):
    root = _folder(tmp_path, ["a", "b"], {"train": "a\n\nb\nghost\n", "test": "b\n"})
    with pytest.raises(DataError) as err:
        load_sni(root, "train")
    msg = str(err.value)
    assert str(root / "splits" / "train_tasks.txt") + ":4" in msg and "'ghost'" in msg
    assert [t.name for t in load_sni(root, "test")] == ["b"]


def test_all_or_nothing_on_a_bad_file(tmp_path):
    root = _folder(tmp_path, ["a", "b"], {"train": "a\nb\nc\n"})
    _write(root / "tasks", "c", _task_json(Instances=[]))
    result = None
    with pytest.raises(DataError) as err:
        result = load_sni(root, "train")
    assert result is None and str(root / "tasks" / "c.json") in str(err.value)


def test_folder_without_split_lists_is_one_split(tmp_path):
    for name in ("b", "a"):
        _write(tmp_path, name, _task_json())
    assert [t.name for t in load_sni(tmp_path, None)] == ["a", "b"]
    assert [t.name for t in load_sni(tmp_path, "train")] == ["a", "b"]
    with pytest.raises(DataError, match="no split lists"):
        load_sni(tmp_path, "test")


def test_splits_default_folder_is_accepted(tmp_path):
    _write(tmp_path / "tasks", "a", _task_json())
    (tmp_path / "splits" / "default").mkdir(parents=True)
    (tmp_path / "splits" / "default" / "train_tasks.txt").write_text("a\n", encoding="utf-8")
    assert [t.name for t in load_sni(tmp_path, "train")] == ["a"]
