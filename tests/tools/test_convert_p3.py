"""`python tools/convert_p3.py SRC OUT` as a user runs it, then `tagi-ds tasks --p3 OUT --json` through the real CLI."""
from __future__ import annotations

import json

from tests.data.p3_fixture import T0_HELDOUT_FOLDERS, T0_TRAIN_FOLDERS, read_jsonl, write_p3_release


def test_convert_then_list_tasks_with_the_cli(tmp_path, run):
    rows = write_p3_release(tmp_path / "release", rows_per_split=30, seed=1)
    out = tmp_path / "p3"
    done = run("tools/convert_p3.py", str(tmp_path / "release"), str(out), "--no-progress", "--workers", "2")
    assert done.returncode == 0, done.stderr
    assert "converted 4 prompt folder(s), 270 rows; skipped 0" in done.stdout  # 9 splits of 30 rows
    for folder in T0_TRAIN_FOLDERS + T0_HELDOUT_FOLDERS:
        for split, want in rows[folder].items():
            assert read_jsonl(out / folder / f"{split}.jsonl") == want

    listed = run("-m", "tagi_ds.cli", "tasks", "--p3", str(out), "--json", "--max-instances", "5")
    assert listed.returncode == 0, listed.stderr
    summary = json.loads(listed.stdout)
    train, unseen = summary["splits"]["train"], summary["splits"]["unseen"]
    assert train["tasks"] == 2 and train["instances"] == 2 * 5
    assert train["categories"] == {"Sentiment": 1, "Structure-To-Text": 1}
    assert unseen["tasks"] == 2 and unseen["instances"] == 2 * 30  # all validation rows (demos come from train)
    assert unseen["categories"] == {"Natural Language Inference": 2}

    again = run("tools/convert_p3.py", str(tmp_path / "release"), str(out), "--workers", "1")  # progress bar on
    assert again.returncode == 0 and "converted 0 prompt folder(s), 0 rows; skipped 4" in again.stdout
    assert "P3 prompts" in again.stderr  # tqdm's bar


def test_a_corrupt_shard_is_refused_with_file_and_record(tmp_path, run):
    write_p3_release(tmp_path / "release", rows_per_split=10)
    shard = tmp_path / "release" / "data" / "super_glue_rte_GPT_3_style" / "train.tfrecord-00000-of-00001"
    raw = bytearray(shard.read_bytes())
    raw[-10] ^= 0xFF  # inside the last record's data
    shard.write_bytes(bytes(raw))
    done = run("tools/convert_p3.py", str(tmp_path / "release"), str(tmp_path / "p3"), "--no-progress",
               "--workers", "1")
    assert done.returncode == 2
    assert "train.tfrecord-00000-of-00001: record 9 at byte" in done.stderr and "CRC" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "p3" / "super_glue_rte_GPT_3_style").exists()
    # the folders converted before the bad one stay, so a rerun after fixing the file resumes there
    assert (tmp_path / "p3" / "anli_GPT_3_style_r1" / "_conversion.json").is_file()


def test_parallel_workers_stop_on_a_bad_folder(tmp_path, run):
    write_p3_release(tmp_path / "release", rows_per_split=10)
    info = tmp_path / "release" / "data" / "common_gen_topic_to_sentence" / "info.train.json"
    info.write_text("{oops")
    done = run("tools/convert_p3.py", str(tmp_path / "release"), str(tmp_path / "p3"), "--no-progress",
               "--workers", "2")
    assert done.returncode == 2 and "info.train.json: not valid JSON" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "p3" / "common_gen_topic_to_sentence").exists()
    assert not list((tmp_path / "p3").glob(".*.tmp"))
