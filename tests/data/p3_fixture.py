"""A tiny bigscience/P3 release in the real on-disk format, for tests and tiny pipeline runs.

    rows = write_p3_release(root)        # root/data/<dataset_prompt>/info.<split>.json + <split>.tfrecord-*-of-*

    python -m tests.data.p3_fixture OUT  # the release configs/tiny-p3.yaml runs on (TINY_RUN_FOLDERS: every T0
                                         # held-out dataset); then `python tools/convert_p3.py OUT CONVERTED`

Each split is a seqio cache as the release ships it: `info.<split>.json` ({"num_shards", "features": {name:
{"shape", "dtype"}}, "seqio_version"}) beside `<split>.tfrecord-SSSSS-of-NNNNN` shards of tf.train.Example records
with token ids (`inputs`, `targets`), texts (`inputs_pretokenized`, `targets_pretokenized`) and, for
classification prompts, `answer_choices`. Returns the text rows written, {folder: {split: [row, …]}}, so tests can
compare what a reader gives back with what is on disk.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Optional

from tagi_ds.data.tfrecord import Feature, write_examples
from tagi_ds.io_utils import atomic_write_json

_SUBJECTS = ["the cat", "a farmer", "my sister", "the old bridge", "a small robot", "the river", "our teacher"]
_VERBS = ["saw", "painted", "crossed", "fixed", "followed", "liked", "visited"]
_OBJECTS = ["the red door", "a long road", "the garden", "an empty box", "the market", "a quiet lake"]

# folder → (kind, {split: shards}). Two T0 training prompts (one with answer choices, one generative), two held-out
# prompts (RTE with train + validation, ANLI R1 with train / validation / test and its validation in two shards),
# a score_eval folder and a dataset outside T0 (both skipped unless the converter is asked for --all).
RELEASE_FOLDERS: dict[str, tuple[str, dict[str, int]]] = {
    "rotten_tomatoes_Reviewer_Opinion_bad_good_choices": ("sentiment", {"train": 1, "validation": 1}),
    "common_gen_topic_to_sentence": ("generation", {"train": 1, "validation": 1}),
    "super_glue_rte_GPT_3_style": ("nli2", {"train": 1, "validation": 1}),
    "anli_GPT_3_style_r1": ("nli3", {"train": 1, "validation": 2, "test": 1}),
    "super_glue_rte_GPT_3_style_score_eval": ("score_eval", {"validation": 1}),
    "lambada_please_next_word": ("generation", {"train": 1}),
}
T0_TRAIN_FOLDERS = ("common_gen_topic_to_sentence", "rotten_tomatoes_Reviewer_Opinion_bad_good_choices")
T0_HELDOUT_FOLDERS = ("anli_GPT_3_style_r1", "super_glue_rte_GPT_3_style")

# The tiny P3 pipeline run (configs/tiny-p3.yaml): three training prompts in two T0 clusters (two teacher units by
# category), and every T0 held-out dataset (MTest11) with one or two prompts, so the report has a row per dataset
# and the median of per-dataset medians is a real median. Sentence-completion datasets get answer choices of
# different lengths (where token-mean and summed scores disagree); StoryCloze has no train split, as in P3.
TINY_RUN_FOLDERS: dict[str, tuple[str, dict[str, int]]] = {
    "rotten_tomatoes_Reviewer_Opinion_bad_good_choices": ("sentiment", {"train": 1, "validation": 1}),
    "imdb_Movie_Expressed_Sentiment": ("sentiment", {"train": 1, "test": 1}),
    "common_gen_topic_to_sentence": ("generation", {"train": 1, "validation": 1}),
    "anli_GPT_3_style_r1": ("nli3", {"train": 1, "validation": 2}),
    "anli_MNLI_crowdsource_r1": ("nli3", {"train": 1, "validation": 1}),
    "anli_GPT_3_style_r2": ("nli3", {"train": 1, "validation": 1}),
    "anli_GPT_3_style_r3": ("nli3", {"train": 1, "validation": 1}),
    "super_glue_cb_GPT_3_style": ("nli3", {"train": 1, "validation": 1}),
    "super_glue_rte_GPT_3_style": ("nli2", {"train": 1, "validation": 1}),
    "super_glue_rte_MNLI_crowdsource": ("nli2", {"train": 1, "validation": 1}),
    "super_glue_wsc.fixed_GPT_3_Style": ("nli2", {"train": 1, "validation": 1}),
    "winogrande_winogrande_xl_True_or_False": ("nli2", {"train": 1, "validation": 1}),
    "super_glue_copa_best_option": ("completion", {"train": 1, "validation": 1}),
    "hellaswag_complete_first_then": ("completion", {"train": 1, "validation": 1}),
    "story_cloze_2016_Answer_Given_options": ("completion", {"validation": 1}),
    "super_glue_wic_GPT_3_prompt": ("nli2", {"train": 1, "validation": 1}),
}

_CHOICES = {"sentiment": ["bad", "good"], "nli2": ["yes", "no"], "nli3": ["yes", "maybe", "no"],
            "score_eval": ["yes", "no"]}


def _sentence(rng: random.Random) -> str:
    return f"{rng.choice(_SUBJECTS).capitalize()} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}."


def _ids(text: str) -> list[int]:
    """Stand-in token ids (the release stores T5 ids; nothing downstream reads them)."""
    return [3 + (sum(map(ord, w)) % 500) for w in text.split()] + [1]


def _row(kind: str, i: int, rng: random.Random) -> dict:
    a, b = _sentence(rng), _sentence(rng)
    choices: Optional[list[str]] = _CHOICES.get(kind)
    if kind == "generation":
        text, target = f"({i}) Write a sentence about: {a.rstrip('.').split()[-1]}", a
    elif kind == "completion":  # two endings of different lengths
        choices = [b, f"{_sentence(rng).rstrip('.')} and then {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}."]
        target = rng.choice(choices)
        text = f"({i}) {a} What happens next?"
    elif kind == "sentiment":
        target = rng.choice(choices)
        text = f"({i}) {a} Did the reviewer find this movie good or bad?"
    else:
        target = rng.choice(choices)
        text = f"({i}) {a}\nQuestion: {b} Yes, no, or maybe?" if kind == "nli3" else f"({i}) {a}\nQuestion: {b}"
    # Unicode on purpose: the strings must survive TFRecord bytes → UTF-8 → jsonl.
    row = {"inputs_pretokenized": text + " — ok?\n", "targets_pretokenized": target}
    if choices is not None:
        row["answer_choices"] = list(choices)
    return row


def _features(kind: str) -> dict:
    feats = {"inputs": {"shape": [None], "dtype": "int32"},
             "inputs_pretokenized": {"shape": [], "dtype": "string"},
             "targets": {"shape": [None], "dtype": "int32"},
             "targets_pretokenized": {"shape": [], "dtype": "string"}}
    if kind != "generation":
        feats["answer_choices"] = {"shape": [None], "dtype": "string"}
    if kind == "score_eval":
        feats.update(idx={"shape": [2], "dtype": "int32"}, is_correct={"shape": [], "dtype": "bool"},
                     weight={"shape": [], "dtype": "float32"})
    return feats


def _example(kind: str, row: dict, i: int) -> dict:
    ex = {"inputs": _ids(row["inputs_pretokenized"]), "inputs_pretokenized": [row["inputs_pretokenized"]],
          "targets": _ids(row["targets_pretokenized"]), "targets_pretokenized": [row["targets_pretokenized"]]}
    if "answer_choices" in row:
        ex["answer_choices"] = row["answer_choices"]
    if kind == "score_eval":
        ex.update(idx=[i, 0], is_correct=Feature("int64", (1,)), weight=[1.0])
    return ex


def write_p3_release(root: str | Path, rows_per_split: int = 24, seed: int = 0,
                     folders: Optional[dict[str, tuple[str, dict[str, int]]]] = None) -> dict[str, dict[str, list]]:
    """Write the release under `root/data/`; returns {folder: {split: [text rows in file order]}}."""
    rng = random.Random(seed)
    written: dict[str, dict[str, list]] = {}
    for folder, (kind, splits) in (folders or RELEASE_FOLDERS).items():
        for split, n_shards in splits.items():
            rows = [_row(kind, i, rng) for i in range(rows_per_split)]
            written.setdefault(folder, {})[split] = rows
            base = Path(root) / "data" / folder
            per = -(-len(rows) // n_shards)
            for s in range(n_shards):
                part = range(s * per, min(len(rows), (s + 1) * per))
                write_examples(base / f"{split}.tfrecord-{s:05d}-of-{n_shards:05d}",
                               (_example(kind, rows[i], i) for i in part))
            atomic_write_json(base / f"info.{split}.json",
                              {"num_shards": n_shards, "features": _features(kind), "seqio_version": "0.0.6"})
    (Path(root) / "README.md").write_text("tiny P3 release for tests\n", encoding="utf-8")
    return written


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def main(argv: Optional[list] = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m tests.data.p3_fixture",
                                 description="write the tiny P3 release configs/tiny-p3.yaml runs on (TFRecord "
                                             "shards as bigscience/P3 ships them; convert with tools/convert_p3.py)")
    ap.add_argument("out", help="folder to write the release into (OUT/data/<dataset_prompt>/...)")
    ap.add_argument("--rows", type=int, default=24, help="rows per split of every prompt")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rows = write_p3_release(args.out, rows_per_split=args.rows, seed=args.seed, folders=TINY_RUN_FOLDERS)
    print(f"wrote {len(rows)} P3 prompt folders ({args.rows} rows per split) under {Path(args.out) / 'data'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
