"""The P3 release (TFRecord shards + info.<split>.json) → jsonl: rows equal what was written, only T0 folders by
default, resumable, and every malformed input refused with the file (and record) named."""
from __future__ import annotations

import json
import shutil

import pytest
from tests.data.p3_fixture import RELEASE_FOLDERS, T0_HELDOUT_FOLDERS, T0_TRAIN_FOLDERS, read_jsonl, write_p3_release

from tagi_ds.data.p3 import load_p3
from tagi_ds.data.p3_release import MARKER, convert_p3, read_split_specs
from tagi_ds.data.tfrecord import write_examples
from tagi_ds.errors import DataError


@pytest.fixture()
def release(tmp_path):
    rows = write_p3_release(tmp_path / "src", rows_per_split=24, seed=3)
    return tmp_path / "src", rows


def test_rows_round_trip_and_t0_filter(release, tmp_path):
    src, rows = release
    out = tmp_path / "out"
    summary = convert_p3(src, out, progress=False)
    assert sorted(summary.converted) == sorted(T0_TRAIN_FOLDERS + T0_HELDOUT_FOLDERS)
    assert sorted(p.name for p in out.iterdir()) == sorted(T0_TRAIN_FOLDERS + T0_HELDOUT_FOLDERS)
    for folder in summary.converted:
        for split, want in rows[folder].items():
            assert read_jsonl(out / folder / f"{split}.jsonl") == want  # text, order, unicode, answer choices
        marker = json.loads((out / folder / MARKER).read_text())
        assert marker["rows"] == {s: len(r) for s, r in rows[folder].items()}
    assert "answer_choices" not in read_jsonl(out / "common_gen_topic_to_sentence" / "train.jsonl")[0]
    # ANLI's validation split came in two shards, read in shard order
    assert summary.converted["anli_GPT_3_style_r1"] == {"test": 24, "train": 24, "validation": 24}


def test_converted_tree_loads_as_p3_tasks(release, tmp_path):
    src, rows = release
    convert_p3(src, tmp_path / "out", progress=False)
    train = load_p3(tmp_path / "out", "train", num_demonstrations=4, max_instances=None, seed=0)
    assert [t.name for t in train] == sorted(T0_TRAIN_FOLDERS)
    sentiment = next(t for t in train if t.name.startswith("rotten_tomatoes"))
    written = {r["inputs_pretokenized"].strip(): r for r in rows[sentiment.name]["train"]}
    assert len(sentiment.instances) == 20 and len(sentiment.positive_examples) == 4
    for inst in sentiment.instances:
        row = written[inst.input]
        assert inst.references == (row["targets_pretokenized"],) and inst.answer_choices == ("bad", "good")
    test = load_p3(tmp_path / "out", "test", num_demonstrations=2, max_instances=5, seed=0)
    assert [(t.name, t.meta["dataset"], t.meta["prompt"]) for t in test] == [
        ("anli_GPT_3_style_r1", "anli_r1", "GPT_3_style"), ("super_glue_rte_GPT_3_style", "rte", "GPT_3_style")]
    anli = test[0]
    assert [i.input for i in anli.instances] == [r["inputs_pretokenized"].strip()
                                                 for r in rows["anli_GPT_3_style_r1"]["validation"][:5]]
    assert all(i.answer_choices == ("yes", "maybe", "no") for i in anli.instances)


def test_all_only_and_resume(release, tmp_path):
    src, _ = release
    out = tmp_path / "out"
    s = convert_p3(src, out, all_folders=True, only=["super_glue_rte_*"], progress=False)
    assert sorted(s.converted) == ["super_glue_rte_GPT_3_style", "super_glue_rte_GPT_3_style_score_eval"]
    first = (out / "super_glue_rte_GPT_3_style" / "validation.jsonl").stat().st_mtime_ns
    s = convert_p3(src, out, all_folders=True, progress=False)  # resumes: the two done folders are not redone
    assert sorted(s.skipped) == ["super_glue_rte_GPT_3_style", "super_glue_rte_GPT_3_style_score_eval"]
    assert sorted(s.converted) == sorted(set(RELEASE_FOLDERS) - set(s.skipped))
    assert (out / "super_glue_rte_GPT_3_style" / "validation.jsonl").stat().st_mtime_ns == first
    # an interrupted folder (no final name, a stale temporary one) is redone and the leftover removed
    (out / ".common_gen_topic_to_sentence.abc.tmp").mkdir()
    shutil.rmtree(out / "common_gen_topic_to_sentence")
    s = convert_p3(src, out, progress=False)
    assert list(s.converted) == ["common_gen_topic_to_sentence"]
    assert not list(out.glob(".*.tmp"))
    s = convert_p3(src, out, force=True, only=["anli_*"], progress=False)
    assert list(s.converted) == ["anli_GPT_3_style_r1"]


def test_missing_shard_and_bad_info(release, tmp_path):
    src, _ = release
    folder = src / "data" / "anli_GPT_3_style_r1"
    (folder / "validation.tfrecord-00001-of-00002").unlink()
    with pytest.raises(DataError, match=r"info\.validation\.json: num_shards is 2 but .*00000-of-00002"):
        read_split_specs(folder)
    (folder / "info.test.json").write_text("{not json")
    with pytest.raises(DataError, match=r"info\.test\.json: not valid JSON"):
        read_split_specs(folder)
    (folder / "info.test.json").write_text(json.dumps({"num_shards": 1, "features": {"x": 1}}))
    with pytest.raises(DataError, match=r"info\.test\.json: expected"):
        read_split_specs(folder)


def _one_bad_record(src, feats: dict, example: dict) -> None:
    folder = src / "data" / "super_glue_rte_GPT_3_style"
    good = {"inputs_pretokenized": ["ok"], "targets_pretokenized": ["yes"], "answer_choices": ["yes", "no"]}
    write_examples(folder / "validation.tfrecord-00000-of-00001", [good, example])
    (folder / "info.validation.json").write_text(json.dumps({"num_shards": 1, "features": feats}))


TEXT = {"shape": [], "dtype": "string"}
CHOICES = {"shape": [None], "dtype": "string"}


@pytest.mark.parametrize("feats,example,message", [
    ({"inputs_pretokenized": TEXT, "targets_pretokenized": TEXT},
     {"inputs_pretokenized": ["x"]}, "feature 'targets_pretokenized' is missing"),
    ({"inputs_pretokenized": TEXT, "targets_pretokenized": TEXT},
     {"inputs_pretokenized": ["x", "y"], "targets_pretokenized": ["z"]}, "has 2 values, info says shape"),
    ({"inputs_pretokenized": TEXT, "targets_pretokenized": TEXT, "answer_choices": CHOICES},
     {"inputs_pretokenized": ["x"], "targets_pretokenized": ["z"], "answer_choices": [1, 2]},
     "'answer_choices' is a int64_list, info says string"),
    ({"inputs_pretokenized": TEXT, "targets_pretokenized": TEXT},
     {"inputs_pretokenized": [b"\xff\xfe"], "targets_pretokenized": ["z"]}, "is not UTF-8"),
])
def test_bad_records_name_file_and_record(release, tmp_path, feats, example, message):
    src, _ = release
    _one_bad_record(src, feats, example)
    with pytest.raises(DataError, match=r"validation\.tfrecord-00000-of-00001: record 1 at byte \d+: .*"
                                        + message.replace("(", r"\(")):
        convert_p3(src, tmp_path / "out", only=["super_glue_rte_GPT_3_style"], progress=False)
    assert not (tmp_path / "out" / "super_glue_rte_GPT_3_style").exists()  # nothing half-written under the name
    assert not list((tmp_path / "out").glob(".*.tmp"))


def test_spec_errors(release, tmp_path):
    src, _ = release
    folder = src / "data" / "super_glue_rte_GPT_3_style"
    (folder / "info.validation.json").write_text(json.dumps(
        {"num_shards": 1, "features": {"inputs_pretokenized": TEXT}}))
    with pytest.raises(DataError, match=r"info\.validation\.json: features lack targets_pretokenized"):
        convert_p3(src, tmp_path / "out", only=["super_glue_rte_*"], progress=False)
    (folder / "info.validation.json").write_text(json.dumps(
        {"num_shards": 1, "features": {"inputs_pretokenized": {"shape": [None], "dtype": "int32"}}}))
    with pytest.raises(DataError, match="'inputs_pretokenized' has dtype 'int32', expected 'string'"):
        convert_p3(src, tmp_path / "out", only=["super_glue_rte_*"], progress=False)
    with pytest.raises(DataError, match="no release folder matches"):
        convert_p3(src, tmp_path / "out", only=["nothing_*"], progress=False)
    with pytest.raises(DataError, match="no P3 dataset-prompt folders"):
        convert_p3(tmp_path / "out", tmp_path / "out2", progress=False)
    with pytest.raises(DataError, match="not found"):
        convert_p3(tmp_path / "nowhere", tmp_path / "out", progress=False)


def test_unconverted_release_points_at_the_converter(release):
    src, _ = release
    with pytest.raises(DataError, match="tools/convert_p3.py"):
        load_p3(src, "train", num_demonstrations=2)
