"""bigscience/P3 on local disk → `Task`, with T0's train / held-out split as data.

Layout read here (P3's released TFRecord shards converted by `python tools/convert_p3.py SRC OUT`, or any export
to files `datasets.load_dataset` reads):
    <p3_dir>[/data]/<dataset>_<prompt>/train.{jsonl,json,parquet,arrow}   (also train-00000-of-00001.parquet, …)
                                       /validation.*  /test.*
with columns `inputs_pretokenized`, `targets_pretokenized` and, for classification prompts, `answer_choices`.
`*_score_eval` folders (one row per answer choice) are skipped: `answer_choices` on the plain folder is enough for
rank classification.

One P3 task = one dataset-prompt folder. As in HyperT5 / FiD-ICL, the instruction is `k` templated demonstrations
held out from that prompt's train rows (never also used as instances); the input is the templated query. The
`Task.definition` is empty, so the Tk-Instruct prompt has no "Definition:" line and the demonstrations are the
"Positive Example" blocks.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

from ..errors import DataError
from ..io_utils import atomic_path, atomic_write_text
from .tasks import Example, Instance, Task, cap_instances, draw_label


@dataclass(frozen=True)
class P3Dataset:
    """One T0 dataset: the P3 folder names of its prompts are `<prefix><prompt>[<suffix>]`."""

    name: str
    cluster: str
    prefixes: tuple[str, ...]
    suffix: str = ""


# T0 (Sanh et al., 2022, Fig. 2 / model card): the training mixture, one entry per dataset. P3 folder prefixes
# spell the HF dataset + subset (CommonsenseQA is cos_e v1.11 in P3; Hotpot QA is the KILT closed-book version).
# That is 35 datasets; papers that count 36 (or 38) count DuoRC's (and Adversarial QA's) subsets apart.
T0_TRAIN: tuple[P3Dataset, ...] = (
    P3Dataset("commonsense_qa", "Multiple-Choice QA", ("cos_e_v1.11_",)),
    P3Dataset("dream", "Multiple-Choice QA", ("dream_",)),
    P3Dataset("quail", "Multiple-Choice QA", ("quail_",)),
    P3Dataset("quartz", "Multiple-Choice QA", ("quartz_",)),
    P3Dataset("social_i_qa", "Multiple-Choice QA", ("social_i_qa_",)),
    P3Dataset("wiqa", "Multiple-Choice QA", ("wiqa_",)),
    P3Dataset("cosmos_qa", "Multiple-Choice QA", ("cosmos_qa_",)),
    P3Dataset("qasc", "Multiple-Choice QA", ("qasc_",)),
    P3Dataset("quarel", "Multiple-Choice QA", ("quarel_",)),
    P3Dataset("sciq", "Multiple-Choice QA", ("sciq_",)),
    P3Dataset("wiki_hop", "Multiple-Choice QA", ("wiki_hop_original_",)),
    P3Dataset("adversarial_qa", "Extractive QA",
              ("adversarial_qa_dbidaf_", "adversarial_qa_dbert_", "adversarial_qa_droberta_")),
    P3Dataset("quoref", "Extractive QA", ("quoref_",)),
    P3Dataset("duorc", "Extractive QA", ("duorc_SelfRC_", "duorc_ParaphraseRC_")),
    P3Dataset("ropes", "Extractive QA", ("ropes_",)),
    P3Dataset("hotpot_qa", "Closed-Book QA", ("kilt_tasks_hotpotqa_",)),
    P3Dataset("wiki_qa", "Closed-Book QA", ("wiki_qa_",)),
    P3Dataset("common_gen", "Structure-To-Text", ("common_gen_",)),
    P3Dataset("wiki_bio", "Structure-To-Text", ("wiki_bio_",)),
    P3Dataset("amazon_polarity", "Sentiment", ("amazon_polarity_",)),
    P3Dataset("app_reviews", "Sentiment", ("app_reviews_",)),
    P3Dataset("imdb", "Sentiment", ("imdb_",)),
    P3Dataset("rotten_tomatoes", "Sentiment", ("rotten_tomatoes_",)),
    P3Dataset("yelp_review_full", "Sentiment", ("yelp_review_full_",)),
    P3Dataset("cnn_dailymail", "Summarization", ("cnn_dailymail_3.0.0_",)),
    P3Dataset("gigaword", "Summarization", ("gigaword_",)),
    P3Dataset("multi_news", "Summarization", ("multi_news_",)),
    P3Dataset("samsum", "Summarization", ("samsum_",)),
    P3Dataset("xsum", "Summarization", ("xsum_",)),
    P3Dataset("ag_news", "Topic Classification", ("ag_news_",)),
    P3Dataset("dbpedia_14", "Topic Classification", ("dbpedia_14_",)),
    P3Dataset("trec", "Topic Classification", ("trec_",)),
    P3Dataset("mrpc", "Paraphrase Identification", ("glue_mrpc_",)),
    P3Dataset("paws", "Paraphrase Identification", ("paws_labeled_final_",)),
    P3Dataset("qqp", "Paraphrase Identification", ("glue_qqp_",)),
)

# T0's held-out evaluation (MTest11): 11 datasets in 4 unseen task clusters. ANLI's P3 folders put the round last.
T0_HELDOUT: tuple[P3Dataset, ...] = (
    P3Dataset("anli_r1", "Natural Language Inference", ("anli_",), "_r1"),
    P3Dataset("anli_r2", "Natural Language Inference", ("anli_",), "_r2"),
    P3Dataset("anli_r3", "Natural Language Inference", ("anli_",), "_r3"),
    P3Dataset("cb", "Natural Language Inference", ("super_glue_cb_",)),
    P3Dataset("rte", "Natural Language Inference", ("super_glue_rte_",)),
    P3Dataset("wsc", "Coreference Resolution", ("super_glue_wsc.fixed_",)),
    P3Dataset("winogrande", "Coreference Resolution", ("winogrande_winogrande_xl_",)),
    P3Dataset("copa", "Sentence Completion", ("super_glue_copa_",)),
    P3Dataset("hellaswag", "Sentence Completion", ("hellaswag_",)),
    P3Dataset("story_cloze", "Sentence Completion", ("story_cloze_2016_",)),
    P3Dataset("wic", "Word Sense Disambiguation", ("super_glue_wic_",)),
)

DATA_EXTENSIONS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}
SPLIT_ALIASES = {"train": "train", "test": "unseen", "unseen": "unseen", "heldout": "unseen"}


def classify_folder(folder_name: str) -> Optional[tuple[P3Dataset, str, bool]]:
    """(dataset, prompt name, held out?) for a P3 folder name, or None (score_eval folders, other datasets)."""
    if folder_name.endswith("_score_eval"):
        return None
    best: Optional[tuple[int, P3Dataset, str, bool]] = None
    for heldout, table in ((False, T0_TRAIN), (True, T0_HELDOUT)):
        for ds in table:
            for prefix in ds.prefixes:
                if not folder_name.startswith(prefix) or not folder_name.endswith(ds.suffix):
                    continue
                prompt = folder_name[len(prefix):len(folder_name) - len(ds.suffix)]
                if prompt and (best is None or len(prefix) + len(ds.suffix) > best[0]):
                    best = (len(prefix) + len(ds.suffix), ds, prompt, heldout)
    return None if best is None else best[1:]


def split_files(folder: Path, split: str) -> list[Path]:
    """`<split>.<ext>` or `<split>-*.<ext>` data files of one prompt folder, one format only."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in DATA_EXTENSIONS
                   and (p.stem == split or p.name.startswith(split + "-")))
    kinds = {DATA_EXTENSIONS[p.suffix] for p in files}
    if len(kinds) > 1:
        raise DataError(f"{folder}: split '{split}' has files in several formats ({', '.join(sorted(kinds))})")
    return files


def _release_hint(folder: Path) -> str:
    """A pointer to the converter when `folder` holds the release's TFRecord shards instead of data files."""
    if any(folder.glob("*.tfrecord-*-of-*")):
        return (" (it holds P3's released TFRecord shards: convert the release first with "
                "`python tools/convert_p3.py SRC OUT` and set data.p3_dir to OUT)")
    return ""


class _Rows:
    """One split's rows, memory-mapped by `datasets` (P3's larger prompts hold millions): only the rows picked
    as demonstrations or instances are turned into Python objects, and only those are type-checked."""

    def __init__(self, files: Sequence[Path]) -> None:
        import datasets  # lazy: heavy import

        kind = DATA_EXTENSIONS[files[0].suffix]
        bars = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()  # one bar per prompt folder is noise; restored below
        try:
            self.ds = datasets.load_dataset(kind, data_files=[str(f) for f in files], split="train")
        except Exception as e:  # datasets raises many kinds; the user needs the file name
            raise DataError(f"{files[0]}: cannot read P3 data with datasets.load_dataset('{kind}'): {e}") from None
        finally:
            if bars:
                datasets.enable_progress_bars()
        self.file = files[0]
        for col in ("inputs_pretokenized", "targets_pretokenized"):
            if col not in self.ds.column_names:
                raise DataError(f"{self.file}: column '{col}' is missing (have: {', '.join(self.ds.column_names)})")

    def __len__(self) -> int:
        return len(self.ds)

    def take(self, indices: Sequence[int]) -> list[dict]:
        rows = self.ds.select(list(indices)).to_list() if len(indices) else []
        for i, row in zip(indices, rows):
            for col in ("inputs_pretokenized", "targets_pretokenized"):
                if not isinstance(row[col], str):
                    raise DataError(f"{self.file}: row {i} column '{col}' must be a string, "
                                    f"got {type(row[col]).__name__}")
            choices = row.get("answer_choices")
            if choices is not None and (not isinstance(choices, list) or not all(isinstance(c, str) for c in choices)):
                raise DataError(f"{self.file}: row {i} column 'answer_choices' must be a list of strings")
        return rows


def _instance(row: dict, iid: str, seed: int) -> Instance:
    target = row["targets_pretokenized"].strip()
    choices = row.get("answer_choices")
    choices = tuple(c.strip() for c in choices) if choices else None
    return Instance(id=iid, input=row["inputs_pretokenized"].strip(), references=(target,),
                    label=draw_label((target,), seed, iid), answer_choices=choices)


def _demos(rows: Iterable[dict]) -> tuple[Example, ...]:
    return tuple(Example(input=r["inputs_pretokenized"].strip(), output=r["targets_pretokenized"].strip())
                 for r in rows)


def load_p3_prompt(folder: Path, dataset: P3Dataset, prompt: str, heldout: bool, num_demonstrations: int = 16,
                   max_instances: Optional[int] = 100, seed: int = 42) -> Task:
    """One dataset-prompt folder → Task. Training prompts: instances from train rows minus the demonstrations.
    Held-out prompts: instances are the first `max_instances` validation rows (test rows when there is no
    validation); demonstrations come from train rows, or from validation rows kept out of the instances when the
    dataset has no train split (StoryCloze)."""
    name = folder.name
    order = random.Random(f"{seed}:{name}")
    train_files = split_files(folder, "train")
    if not heldout:
        if not train_files:
            raise DataError(f"{folder}: training prompt has no train.* data file{_release_hint(folder)}")
        rows = _Rows(train_files)
        if len(rows) <= num_demonstrations:
            raise DataError(f"{train_files[0]}: {len(rows)} rows, need more than {num_demonstrations} "
                            f"(the demonstrations are held out from the train rows)")
        pick = order.sample(range(len(rows)), num_demonstrations)
        demos = _demos(rows.take(pick))
        taken = set(pick)
        # The seeded instance cap works on row indices, so only the kept rows are ever materialised.
        keep = cap_instances([i for i in range(len(rows)) if i not in taken], max_instances, seed, name)
        instances = [_instance(r, f"{name}-train-{i}", seed) for i, r in zip(keep, rows.take(keep))]
        eval_split = "train"
    else:
        eval_split = "validation" if split_files(folder, "validation") else "test"
        eval_files = split_files(folder, eval_split)
        if not eval_files:
            raise DataError(f"{folder}: held-out prompt has no validation.* or test.* data file"
                            f"{_release_hint(folder)}")
        eval_rows = _Rows(eval_files)
        if train_files:
            train_rows = _Rows(train_files)
            pick = order.sample(range(len(train_rows)), min(num_demonstrations, len(train_rows)))
            demos = _demos(train_rows.take(pick))
            taken: set[int] = set()
        else:
            pick = order.sample(range(len(eval_rows)), min(num_demonstrations, max(len(eval_rows) - 1, 0)))
            demos = _demos(eval_rows.take(pick))
            taken = set(pick)
        keep = []
        for i in range(len(eval_rows)):  # the first max_instances rows that are not demonstrations
            if max_instances is not None and len(keep) >= max_instances:
                break
            if i not in taken:
                keep.append(i)
        instances = [_instance(r, f"{name}-{eval_split}-{i}", seed) for i, r in zip(keep, eval_rows.take(keep))]
        if not instances:
            raise DataError(f"{eval_files[0]}: no rows left to evaluate on")
    return Task(name=name, definition="", positive_examples=demos, negative_examples=(), instances=tuple(instances),
                categories=(dataset.cluster,),
                meta={"source": "p3", "dataset": dataset.name, "prompt": prompt, "heldout": heldout,
                      "instance_split": eval_split, "folder": str(folder)})


def p3_root(p3_dir: str | Path) -> Path:
    root = Path(p3_dir)
    if not root.is_dir():
        raise DataError(f"{root}: P3 folder not found")
    return root / "data" if (root / "data").is_dir() else root


def list_p3_prompts(p3_dir: str | Path) -> list[tuple[Path, P3Dataset, str, bool]]:
    """Every T0 train / held-out prompt folder under `p3_dir`, sorted by name (other datasets are ignored)."""
    out = []
    for folder in sorted(p for p in p3_root(p3_dir).iterdir() if p.is_dir()):
        hit = classify_folder(folder.name)
        if hit is not None:
            out.append((folder, *hit))
    return out


def load_p3(p3_dir: str | Path, split: str = "train", num_demonstrations: int = 16,
            max_instances: Optional[int] = 100, seed: int = 42, max_tasks: Optional[int] = None) -> list[Task]:
    """Tasks of T0's training mixture (`split="train"`) or of MTest11 (`"test"`/`"unseen"`), one per prompt."""
    if split not in SPLIT_ALIASES:
        raise DataError(f"P3 split {split!r} unknown; expected one of {', '.join(SPLIT_ALIASES)}")
    want_heldout = SPLIT_ALIASES[split] == "unseen"
    prompts = [p for p in list_p3_prompts(p3_dir) if p[3] == want_heldout]
    if not prompts:
        kind = "held-out (MTest11)" if want_heldout else "T0 training"
        raise DataError(f"{p3_root(p3_dir)}: no {kind} dataset-prompt folders found "
                        f"(expected folders such as 'super_glue_rte_GPT_3_style' with train/validation files)")
    if max_tasks is not None:
        prompts = prompts[:max_tasks]
    return [load_p3_prompt(folder, ds, prompt, heldout, num_demonstrations, max_instances, seed)
            for folder, ds, prompt, heldout in prompts]


# ----------------------------------------------------------------------------------------------- test fixture
_SUBJECTS = ["the cat", "a farmer", "my sister", "the old bridge", "a small robot", "the river", "our teacher"]
_VERBS = ["saw", "painted", "crossed", "fixed", "followed", "liked", "visited"]
_OBJECTS = ["the red door", "a long road", "the garden", "an empty box", "the market", "a quiet lake"]


def _sentence(rng: random.Random) -> str:
    return f"{rng.choice(_SUBJECTS).capitalize()} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}."


def _fixture_rows(kind: str, n: int, rng: random.Random) -> list[dict]:
    rows = []
    for row in range(n):
        a, b = _sentence(rng), _sentence(rng)
        if kind == "nli":
            choices = ["yes", "no"]
            target = choices[int(a == b or rng.random() < 0.5)]
            text = f"{a}\nQuestion: Does this imply that \"{b}\"? Yes or no?"
        elif kind == "sentiment":
            choices = ["negative", "positive"]
            target = rng.choice(choices)
            text = f"Review: {a} It was {'great' if target == 'positive' else 'awful'}.\nIs this review positive or negative?"
        elif kind == "completion":
            choices = [b, _sentence(rng)]
            target = choices[0]
            text = f"{a} What happens next?"
        else:  # generation: no answer choices
            choices = None
            target = a
            text = f"Write a sentence about: {', '.join(w for w in a.rstrip('.').split()[-2:])}"
        # The row number makes every input unique, so tests can tell demonstrations from instances by text.
        rows.append({"inputs_pretokenized": f"({row}) {text}\n", "targets_pretokenized": " " + target,
                     "answer_choices": choices})
    return rows


# (folder, kind, splits): training prompts, held-out prompts, one held-out dataset without train rows
# (StoryCloze), a score_eval folder and a non-T0 dataset that the loader must skip.
FIXTURE_FOLDERS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("imdb_Movie_Expressed_Sentiment", "sentiment", ("train", "test")),
    ("rotten_tomatoes_Reviewer_Opinion_bad_good_choices", "sentiment", ("train", "validation")),
    ("common_gen_topic_to_sentence", "generation", ("train", "validation")),
    ("wiki_qa_Topic_Prediction_Answer_Only", "generation", ("train",)),
    ("super_glue_rte_GPT_3_style", "nli", ("train", "validation")),
    ("anli_GPT_3_style_r1", "nli", ("train", "validation")),
    ("story_cloze_2016_Story_Continuation_and_Options", "completion", ("validation",)),
    ("super_glue_rte_GPT_3_style_score_eval", "nli", ("validation",)),
    ("lambada_please_next_word", "generation", ("train",)),
)


def write_p3_fixture(out_dir: str | Path, rows_per_split: int = 40, fmt: str = "jsonl", seed: int = 0) -> Path:
    """Write a tiny P3-layout dataset (see FIXTURE_FOLDERS) under `out_dir`; returns `out_dir`."""
    if fmt not in ("jsonl", "parquet"):
        raise ValueError(f"fmt must be 'jsonl' or 'parquet', got {fmt!r}")
    out = Path(out_dir)
    rng = random.Random(seed)
    for folder, kind, splits in FIXTURE_FOLDERS:
        for split in splits:
            rows = _fixture_rows(kind, rows_per_split, rng)
            if fmt == "jsonl":
                atomic_write_text(out / folder / f"{split}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
            else:
                import datasets

                with atomic_path(out / folder / f"{split}.parquet") as tmp:
                    datasets.Dataset.from_list(rows).to_parquet(str(tmp))
    return out
