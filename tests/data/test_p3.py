"""P3 layout: T0 split data, folder classification, fixture round trip through `datasets`, bad files."""
from __future__ import annotations

import json

import pytest

from tagi_ds.data import prompts
from tagi_ds.data.p3 import (FIXTURE_FOLDERS, T0_HELDOUT, T0_TRAIN, classify_folder, load_p3, write_p3_fixture)
from tagi_ds.errors import DataError


def test_t0_split_tables():
    assert len(T0_TRAIN) == 35  # the model card's list; DuoRC / Adversarial QA subsets are prefixes of one entry
    assert sorted(d.name for d in T0_HELDOUT) == sorted(
        ["anli_r1", "anli_r2", "anli_r3", "cb", "rte", "wsc", "winogrande", "copa", "hellaswag", "story_cloze",
         "wic"])
    prefixes = [p for d in T0_TRAIN + T0_HELDOUT for p in d.prefixes]
    assert len(prefixes) == len(set(prefixes)) + 2  # anli_ is shared by its three rounds


@pytest.mark.parametrize("folder,dataset,prompt,heldout", [
    ("super_glue_rte_GPT_3_style", "rte", "GPT_3_style", True),
    ("anli_GPT_3_style_r2", "anli_r2", "GPT_3_style", True),
    ("wiki_hop_original_choose_best_object_interrogative_1", "wiki_hop", "choose_best_object_interrogative_1",
     False),
    ("wiki_qa_Topic_Prediction_Answer_Only", "wiki_qa", "Topic_Prediction_Answer_Only", False),
    ("duorc_ParaphraseRC_title_generation", "duorc", "title_generation", False),
    ("cos_e_v1.11_aligned_with_common_sense", "commonsense_qa", "aligned_with_common_sense", False),
    ("super_glue_wsc.fixed_GPT_3_Style", "wsc", "GPT_3_Style", True),
])
def test_classify_folder(folder, dataset, prompt, heldout):
    ds, got_prompt, got_heldout = classify_folder(folder)
    assert (ds.name, got_prompt, got_heldout) == (dataset, prompt, heldout)


def test_classify_skips_score_eval_and_other_datasets():
    assert classify_folder("super_glue_rte_GPT_3_style_score_eval") is None
    assert classify_folder("lambada_please_next_word") is None
    assert classify_folder("super_glue_boolq_GPT_3_Style") is None  # T0++ only, not in T0's mixture or MTest11


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_fixture_round_trip(tmp_path, fmt):
    root = write_p3_fixture(tmp_path / "p3", rows_per_split=30, fmt=fmt)
    train = load_p3(root, "train", num_demonstrations=4, max_instances=20, seed=1)
    assert [t.name for t in train] == sorted(f for f, _, s in FIXTURE_FOLDERS
                                             if classify_folder(f) and not classify_folder(f)[2])
    raw = {}
    for folder, _, _ in FIXTURE_FOLDERS:
        path = root / folder / f"train.{fmt}"
        if fmt == "jsonl" and path.exists():
            raw[folder] = [json.loads(line) for line in path.read_text().splitlines()]
    for task in train:
        assert len(task.positive_examples) == 4 and len(task.instances) == 20
        assert task.definition == "" and task.meta["source"] == "p3"
        demo_inputs = {e.input for e in task.positive_examples}
        used = {int(i.id.rsplit("-", 1)[1]) for i in task.instances}
        assert len(used) == 20
        if fmt == "jsonl":
            rows = raw[task.name]
            for inst in task.instances:  # instances read back are the rows written, stripped
                row = rows[int(inst.id.rsplit("-", 1)[1])]
                assert inst.input == row["inputs_pretokenized"].strip()
                assert inst.references == (row["targets_pretokenized"].strip(),)
                assert inst.answer_choices == (tuple(row["answer_choices"]) if row["answer_choices"] else None)
            # demonstrations are train rows that are never instances
            demo_rows = [i for i, r in enumerate(rows) if r["inputs_pretokenized"].strip() in demo_inputs]
            assert demo_rows and not set(demo_rows) & used
        for inst in task.instances:
            if inst.answer_choices is not None:
                assert inst.label in inst.answer_choices
    sentiment = next(t for t in train if t.name.startswith("imdb_"))
    assert sentiment.instances[0].answer_choices == ("negative", "positive")
    assert sentiment.categories == ("Sentiment",)

    test = load_p3(root, "test", num_demonstrations=4, max_instances=10, seed=1)
    assert [t.name for t in test] == ["anli_GPT_3_style_r1", "story_cloze_2016_Story_Continuation_and_Options",
                                      "super_glue_rte_GPT_3_style"]
    by = {t.name: t for t in test}
    assert by["super_glue_rte_GPT_3_style"].meta["instance_split"] == "validation"
    # first N validation rows, in order
    assert [i.id for i in by["super_glue_rte_GPT_3_style"].instances] == [
        f"super_glue_rte_GPT_3_style-validation-{k}" for k in range(10)]
    # StoryCloze has no train rows: demonstrations come from validation rows that are then not evaluated
    sc = by["story_cloze_2016_Story_Continuation_and_Options"]
    assert len(sc.positive_examples) == 4 and len(sc.instances) == 10
    assert not {e.input for e in sc.positive_examples} & {i.input for i in sc.instances}


def test_p3_prompt_has_no_definition_line(tmp_path):
    root = write_p3_fixture(tmp_path / "p3", rows_per_split=20)
    task = load_p3(root, "train", num_demonstrations=2, max_tasks=1)[0]
    source = prompts.build_source(task, task.instances[0])
    assert source.startswith(" Positive Example 1 -\nInput: ")
    assert "Definition" not in source


def test_deterministic_in_seed(tmp_path):
    root = write_p3_fixture(tmp_path / "p3", rows_per_split=30)
    a = load_p3(root, "train", num_demonstrations=3, max_instances=5, seed=7)
    b = load_p3(root, "train", num_demonstrations=3, max_instances=5, seed=7)
    c = load_p3(root, "train", num_demonstrations=3, max_instances=5, seed=8)
    ids = lambda ts: [(t.positive_examples, [i.id for i in t.instances]) for t in ts]  # noqa: E731
    assert ids(a) == ids(b) and ids(a) != ids(c)


def test_bad_p3_inputs(tmp_path):
    root = tmp_path / "p3"
    folder = root / "imdb_Movie_Expressed_Sentiment"
    folder.mkdir(parents=True)
    (folder / "train.jsonl").write_text(json.dumps({"inputs_pretokenized": "x", "label": 1}) + "\n")
    with pytest.raises(DataError, match="targets_pretokenized") as err:
        load_p3(root, "train", num_demonstrations=1)
    assert "train.jsonl" in str(err.value)
    with pytest.raises(DataError, match="no held-out"):
        load_p3(root, "test")
    rows = "".join(json.dumps({"inputs_pretokenized": "x", "targets_pretokenized": "y"}) + "\n" for _ in range(3))
    (folder / "train.jsonl").write_text(rows)
    with pytest.raises(DataError, match="need more than 16"):
        load_p3(root, "train")
    with pytest.raises(DataError, match="not found"):
        load_p3(tmp_path / "nowhere", "train")
