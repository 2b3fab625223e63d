"""The offline task suite: compositions of word-list operations, with held-out wordings and held-out compositions.

Design (measured first, see ../shared/OFFLINE_DEMO_EVIDENCE.md):
- 12 primitives on short word lists: k-th / last word, word count as a number word, alphabetically first / last
  word, contains X (yes/no), is sorted (yes/no), and the list operations reverse, sort, drop-first. Answers are
  mostly short, and every operation changes what ROUGE-L / exact match see (no case- or punctuation-only ops).
- A task is a composition of one to three primitives: zero to two list operations, then a final step. Compositions
  whose answers equal a primitive's, or a composition already taken, or a constant, are rejected by measuring them.
- Every input is 3–6 distinct words from ONE shared list, 25% of them sorted, for every task alike: the input alone
  never tells which task is asked, so only the instruction can (the instruction signal the demo must show).
- Each operation has 3 training phrasings and 1 held-out paraphrase. Splits:
  train (primitives + seen compositions), seen_eval (their held-back instances, same task names),
  unseen_paraphrase (the primitives worded with the held-out paraphrase), unseen_composition (held-out compositions).
Everything is a pure function of the seed.
"""
from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional, Sequence

from ..errors import DataError
from ..io_utils import atomic_write_text
from .tasks import Example, Instance, Task

# One shared word list: distinct first letters, so alphabetical order is unambiguous and single-token-friendly.
WORDS: tuple[str, ...] = (
    "apple", "bread", "cloud", "dog", "egg", "fish", "grape", "house", "ink", "jam", "kite", "lamp",
    "moon", "nut", "owl", "pear", "queen", "river", "sun", "tree", "van", "wolf", "yarn", "zoo",
)
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

Words = tuple[str, ...]


@dataclass(frozen=True)
class Op:
    """One primitive. `fn(words, x)` returns a word list (list op) or a short answer string (final step).

    `phrasings[:3]` are the training wordings, `phrasings[3]` the held-out paraphrase; `{x}` is the op's argument.
    """

    name: str
    is_list_op: bool
    fn: Callable[[Words, Optional[str]], object]
    phrasings: tuple[str, str, str, str]
    min_len: int = 1  # the op is defined on lists of at least this many words
    takes_arg: bool = False


def _yes(b: bool) -> str:
    return "yes" if b else "no"


OPS: dict[str, Op] = {op.name: op for op in (
    Op("first", False, lambda w, x: w[0], (
        "write the first word", "give the word that comes first in the list",
        "output the word at position one", "return the word at the start of the list")),
    Op("second", False, lambda w, x: w[1], (
        "write the second word", "give the word that comes second in the list",
        "output the word at position two", "return the word right after the first word"), min_len=2),
    Op("third", False, lambda w, x: w[2], (
        "write the third word", "give the word that comes third in the list",
        "output the word at position three", "return the word right after the second word"), min_len=3),
    Op("last", False, lambda w, x: w[-1], (
        "write the last word", "give the word that comes last in the list",
        "output the word at the end of the list", "return the final word of the list")),
    Op("count", False, lambda w, x: NUMBER_WORDS[len(w)], (
        "write how many words there are, as a number word", "count the words and give the count as a word",
        "output the number of words, spelled as a word", "return the length of the list as a number word")),
    Op("alpha_first", False, lambda w, x: min(w), (
        "write the word that comes first in alphabetical order", "give the word that would be first in a dictionary",
        "output the alphabetically smallest word", "return the earliest word by alphabet")),
    Op("alpha_last", False, lambda w, x: max(w), (
        "write the word that comes last in alphabetical order", "give the word that would be last in a dictionary",
        "output the alphabetically largest word", "return the latest word by alphabet")),
    Op("contains", False, lambda w, x: _yes(x in w), (
        "answer yes if the word {x} is in the list, otherwise answer no",
        "write yes when {x} appears among the words and no when it does not",
        "output yes if the list contains {x}, else no",
        "return yes if {x} is one of the words, or no if it is missing"), takes_arg=True),
    Op("is_sorted", False, lambda w, x: _yes(list(w) == sorted(w)), (
        "answer yes if the words are in alphabetical order, otherwise answer no",
        "write yes when the list is sorted alphabetically and no when it is not",
        "output yes if the words are already sorted, else no",
        "return yes if each word comes after the one before it in the alphabet, or no otherwise")),
    Op("reverse", True, lambda w, x: tuple(reversed(w)), (
        "reverse the order of the words", "write the words backwards, from last to first",
        "output the list in reversed order", "return the words starting from the end of the list")),
    Op("sort", True, lambda w, x: tuple(sorted(w)), (
        "sort the words in alphabetical order", "write the words ordered by alphabet",
        "output the list sorted alphabetically", "return the words arranged as in a dictionary")),
    Op("drop_first", True, lambda w, x: tuple(w[1:]), (
        "remove the first word", "write all words except the first one",
        "output the list without its first word", "return every word after the first word"), min_len=2),
)}
PRIMITIVES: tuple[str, ...] = tuple(OPS)
LIST_OPS: tuple[str, ...] = tuple(n for n, op in OPS.items() if op.is_list_op)

# Candidate compositions in preference order; `compositions()` keeps the first 22 that measure as new and balanced.
# Mostly short answers (16 end in a word / number / yes-no step), 6 list answers: list answers are the hardest for a
# tiny model and echoing the input already earns ~35 ROUGE-L on them, so a few suffice.
_CANDIDATES: tuple[tuple[str, ...], ...] = (
    ("reverse", "second"), ("reverse", "third"), ("sort", "second"), ("sort", "third"),
    ("drop_first", "count"), ("drop_first", "alpha_first"), ("drop_first", "alpha_last"), ("drop_first", "is_sorted"),
    ("reverse", "drop_first", "alpha_first"), ("reverse", "drop_first", "alpha_last"), ("sort", "reverse", "second"),
    ("sort", "reverse", "third"), ("drop_first", "sort", "second"), ("drop_first", "drop_first", "count"),
    ("drop_first", "drop_first", "alpha_first"), ("drop_first", "drop_first", "alpha_last"),
    ("reverse", "drop_first"), ("sort", "reverse"), ("sort", "drop_first"), ("drop_first", "reverse"),
    ("drop_first", "sort"), ("reverse", "drop_first", "reverse"),
    # fallbacks, should a change to the probes reject one of the above
    ("drop_first", "drop_first", "is_sorted"), ("drop_first", "drop_first"), ("sort", "reverse", "drop_first"),
    ("reverse", "is_sorted"), ("drop_first", "contains"),
)
# A composition whose most common answer covers more than this share of inputs is rejected: a held-out task whose
# answer is 'no' 97% of the time (reverse → is-sorted) measures the answer prior, not the instruction, and made the
# unseen-composition score swing by ±15 ROUGE-L between identical runs.
MAX_MAJORITY_SHARE = 0.8
NUM_COMPOSITIONS = 22


def apply_ops(ops: Sequence[str], words: Words, x: Optional[str] = None) -> str:
    """Run a composition on a word list; the answer as text (a list answer is its words joined by spaces)."""
    cur: object = tuple(words)
    for name in ops:
        op = OPS[name]
        if not isinstance(cur, tuple) or len(cur) < op.min_len:
            raise DataError(f"operation {name!r} is undefined on {cur!r} (composition {'+'.join(ops)})")
        cur = op.fn(cur, x)
    return " ".join(cur) if isinstance(cur, tuple) else str(cur)


def random_words(rng: random.Random, min_words: int, max_words: int, sorted_fraction: float) -> Words:
    """One input: distinct words from the shared list; `sorted_fraction` of inputs come out sorted."""
    words = rng.sample(WORDS, rng.randint(min_words, max_words))
    return tuple(sorted(words)) if rng.random() < sorted_fraction else tuple(words)


def _signature(ops: Sequence[str], probes: list[Words]) -> Optional[tuple[str, ...]]:
    """Answers on fixed probes (None when undefined on some probe): two ops are 'the same' when these match."""
    try:
        return tuple(apply_ops(ops, w, WORDS[0]) for w in probes)
    except DataError:
        return None


def compositions(min_words: int = 3, max_words: int = 6) -> list[tuple[str, ...]]:
    """The suite's 22 compositions: the first candidates that are defined on every input length, not (nearly)
    constant, not the identity, and answer differently from every primitive and every composition kept before them."""
    rng = random.Random("probes")
    probes = [random_words(rng, min_words, max_words, 0.25) for _ in range(400)]
    # Make sure the probes cover the shortest inputs (where, e.g., drop-first twice leaves one word).
    probes += [tuple(rng.sample(WORDS, min_words)) for _ in range(20)]
    seen = {_signature((p,), probes) for p in PRIMITIVES}
    seen.add(tuple(" ".join(w) for w in probes))  # identity
    kept: list[tuple[str, ...]] = []
    for ops in _CANDIDATES:
        sig = _signature(ops, probes)
        if sig is None or sig in seen or Counter(sig).most_common(1)[0][1] > MAX_MAJORITY_SHARE * len(sig):
            continue
        seen.add(sig)
        kept.append(ops)
        if len(kept) == NUM_COMPOSITIONS:
            return kept
    raise DataError(f"only {len(kept)} usable compositions for inputs of {min_words}-{max_words} words; "
                    f"expected {NUM_COMPOSITIONS}")


# ------------------------------------------------------------------------------------------------ task building
def _capitalize(s: str) -> str:
    return s[:1].upper() + s[1:]


def definition_for(ops: Sequence[str], phrasing_ids: Sequence[int], x: Optional[str]) -> str:
    """'You are given a list of words. First, A. Then, B. Finally, C.' (one step: 'You are given ... A.')"""
    steps = [OPS[o].phrasings[i].format(x=x) for o, i in zip(ops, phrasing_ids)]
    head = "You are given a list of words."
    if len(steps) == 1:
        return f"{head} {_capitalize(steps[0])}."
    linkers = ["First", "Then"] if len(steps) == 2 else ["First", "Then", "Finally"]
    return head + "".join(f" {lk}, {st}." for lk, st in zip(linkers, steps))


def task_name(ops: Sequence[str], x: Optional[str], prefix: str = "synth") -> str:
    parts = [f"{o}_{x}" if OPS[o].takes_arg else o for o in ops]
    return f"{prefix}_" + "_then_".join(parts)


def _make_instances(name: str, ops: Sequence[str], x: Optional[str], n: int, seed: int, min_words: int,
                    max_words: int, sorted_fraction: float) -> list[Instance]:
    rng = random.Random(f"{seed}:{name}:instances")
    out = []
    for i in range(n):
        words = random_words(rng, min_words, max_words, sorted_fraction)
        answer = apply_ops(ops, words, x)
        out.append(Instance(id=f"{name}-{i}", input=" ".join(words), references=(answer,), label=answer))
    return out


def _make_examples(name: str, ops: Sequence[str], x: Optional[str], seed: int, min_words: int, max_words: int,
                   sorted_fraction: float, num: int = 3) -> tuple[Example, ...]:
    """Demonstrations with different answers where possible (a yes/no task shows both a yes and a no)."""
    rng = random.Random(f"{seed}:{name}:examples")
    examples: list[Example] = []
    answers: set[str] = set()
    for _ in range(num):
        best = None
        for _try in range(200):
            words = random_words(rng, min_words, max_words, sorted_fraction)
            if x is not None and len(examples) % 2 == 0 and x not in words and _try < 100:
                words = words[:-1] + (x,) if x not in words[:-1] else words  # show the argument at work
            answer = apply_ops(ops, words, x)
            best = (words, answer)
            if answer not in answers:
                break
        words, answer = best  # type: ignore[misc]
        answers.add(answer)
        examples.append(Example(input=" ".join(words), output=answer))
    return tuple(examples)


def make_task(ops: Sequence[str], phrasing_ids: Sequence[int], x: Optional[str], split: str, n: int, seed: int,
              min_words: int, max_words: int, sorted_fraction: float, prefix: str = "synth") -> Task:
    ops = tuple(ops)
    name = task_name(ops, x, prefix)
    kind = "primitive" if len(ops) == 1 else "composition"
    return Task(
        name=name,
        definition=definition_for(ops, phrasing_ids, x),
        positive_examples=_make_examples(name, ops, x, seed, min_words, max_words, sorted_fraction),
        negative_examples=(),
        instances=tuple(_make_instances(name, ops, x, n, seed, min_words, max_words, sorted_fraction)),
        categories=(f"synthetic {kind}",),
        meta={"split": split, "ops": list(ops), "x": x, "kind": kind, "phrasings": list(phrasing_ids),
              "source": "synthetic"},
    )


@dataclass(frozen=True)
class SuiteSplits:
    train: list[Task]
    seen_eval: list[Task]
    unseen_paraphrase: list[Task]
    unseen_composition: list[Task]

    def all_tasks(self) -> list[Task]:
        return self.train + self.seen_eval + self.unseen_paraphrase + self.unseen_composition

    def unseen(self) -> list[Task]:
        return self.unseen_paraphrase + self.unseen_composition


def build_suite(seed: int = 0, instances_per_task: int = 200, held_back_per_task: int = 40,
                num_unseen_compositions: int = 6, min_words: int = 3, max_words: int = 6,
                sorted_fraction: float = 0.25) -> SuiteSplits:
    """The whole suite, deterministic in `seed` (see the module docstring for what each split holds)."""
    if not 1 <= min_words <= max_words <= len(WORDS):
        raise DataError(f"synthetic suite: need 1 <= min_words <= max_words <= {len(WORDS)}, "
                        f"got min_words={min_words}, max_words={max_words}")
    if not 0 <= held_back_per_task < instances_per_task:
        raise DataError(f"synthetic suite: held_back_per_task ({held_back_per_task}) must be in "
                        f"[0, instances_per_task={instances_per_task})")
    if not 0.0 <= sorted_fraction <= 1.0:
        raise DataError(f"synthetic suite: sorted_fraction must be in [0, 1], got {sorted_fraction}")
    comps = compositions(min_words, max_words)
    if not 0 <= num_unseen_compositions < len(comps):
        raise DataError(f"synthetic suite: num_unseen_compositions must be in [0, {len(comps)}), "
                        f"got {num_unseen_compositions}")
    rng = random.Random(f"{seed}:suite")
    unseen_idx = set(rng.sample(range(len(comps)), num_unseen_compositions))
    seen_comps = [c for i, c in enumerate(comps) if i not in unseen_idx]
    unseen_comps = [c for i, c in enumerate(comps) if i in unseen_idx]

    # Training wordings rotate per op across the training tasks, so each op is seen in all 3 phrasings.
    turn = {o: 0 for o in OPS}

    def next_phrasings(ops: Sequence[str]) -> list[int]:
        ids = []
        for o in ops:
            ids.append(turn[o] % 3)
            turn[o] += 1
        return ids

    def arg_for(ops: Sequence[str], tag: str) -> Optional[str]:
        return random.Random(f"{seed}:{tag}:{'+'.join(ops)}:x").choice(WORDS) if "contains" in ops else None

    common = dict(seed=seed, min_words=min_words, max_words=max_words, sorted_fraction=sorted_fraction)
    seen_tasks = [make_task((p,), next_phrasings((p,)), arg_for((p,), "train"), "train", instances_per_task, **common)
                  for p in PRIMITIVES]
    seen_tasks += [make_task(c, next_phrasings(c), arg_for(c, "train"), "train", instances_per_task, **common)
                   for c in seen_comps]
    cut = instances_per_task - held_back_per_task
    train = [t.with_instances(t.instances[:cut]) for t in seen_tasks]
    seen_eval = [replace(t.with_instances(t.instances[cut:]), meta={**t.meta, "split": "seen_eval"})
                 for t in seen_tasks]
    unseen_paraphrase = [make_task((p,), (3,), arg_for((p,), "para"), "unseen_paraphrase", instances_per_task,
                                   prefix="synth_para", **common) for p in PRIMITIVES]
    crng = random.Random(f"{seed}:unseen_phrasing")
    unseen_composition = [make_task(c, [crng.randrange(3) for _ in c], arg_for(c, "unseen"), "unseen_composition",
                                    instances_per_task, **common) for c in unseen_comps]
    return SuiteSplits(train, seen_eval, unseen_paraphrase, unseen_composition)


def task_weights(tasks: Sequence[Task], primitive_share: float = 0.6) -> list[float]:
    """Sampling weights giving primitives `primitive_share` of the mix and compositions the rest (evidence: 60/40)."""
    kinds = [t.meta.get("kind", "composition") for t in tasks]
    n_prim = sum(k == "primitive" for k in kinds)
    n_comp = len(kinds) - n_prim
    if n_prim == 0 or n_comp == 0:
        return [1.0 / len(tasks)] * len(tasks)
    return [primitive_share / n_prim if k == "primitive" else (1 - primitive_share) / n_comp for k in kinds]


# ------------------------------------------------------------------------------------------------ text + export
def all_wording(suite: SuiteSplits, prompts_per_task: int = 2) -> list[str]:
    """Every text the suite can show a model (definitions, every phrasing, examples, prompts, inputs, answers):
    the tokenizer's training corpus, so every word of every split is in its vocabulary."""
    from .prompts import build_source, no_instruction_input

    texts: list[str] = []
    for op in OPS.values():
        texts += [p.format(x=w) for p in op.phrasings for w in (WORDS if op.takes_arg else (None,))]
    texts += [" ".join(WORDS), " ".join(NUMBER_WORDS), "yes no"]
    for task in suite.all_tasks():
        texts.append(task.definition)
        texts += [f"{e.input}\n{e.output}" for e in task.positive_examples]
        for inst in task.instances[:prompts_per_task]:
            texts.append(build_source(task, inst) + inst.label)
            texts.append(no_instruction_input(inst) + inst.label)
        texts += [f"{i.input} {i.label}" for i in task.instances]
    return texts


def echo_reference(tasks: Sequence[Task], max_instances_per_task: Optional[int] = None) -> dict[str, float]:
    """Scores of answering every instance with its input unchanged (ROUGE-L gives list tasks ~30 for free)."""
    from ..metrics import compute_metrics

    preds, refs = [], []
    for t in tasks:
        for inst in t.instances[:max_instances_per_task]:
            preds.append(inst.input)
            refs.append(list(inst.references))
    return compute_metrics(preds, refs)


def _sni_json(task: Task) -> dict:
    """A task in the native SNI file layout (keys and order as upstream)."""
    return {
        "Contributors": ["tagi-ds synthetic suite"],
        "Source": ["synthetic"],
        "URL": [],
        "Categories": list(task.categories),
        "Reasoning": ["Compositional reasoning"],
        "Definition": [task.definition],
        "Input_language": ["English"],
        "Output_language": ["English"],
        "Instruction_language": ["English"],
        "Domains": ["Synthetic"],
        "Positive Examples": [{"input": e.input, "output": e.output, "explanation": e.explanation}
                              for e in task.positive_examples],
        "Negative Examples": [],
        "Instances": [{"id": i.id, "input": i.input, "output": list(i.references)} for i in task.instances],
        "Instance License": ["Apache 2.0"],
    }


SEEN_EVAL_SUFFIX = "__seen_eval"


def write_sni(suite: SuiteSplits, out_dir: str | Path) -> Path:
    """Write the suite as SNI: tasks/<name>.json (+ <name>__seen_eval.json for held-back instances of seen tasks),
    splits/{train,test,seen_eval,unseen_paraphrase,unseen_composition}_tasks.txt, mirrored in splits/default/ (the
    config's default split folder). test = unseen_paraphrase + unseen_composition. Every file is written atomically."""
    out = Path(out_dir)
    files: dict[str, list[str]] = {"train": [], "seen_eval": [], "unseen_paraphrase": [], "unseen_composition": []}
    for split, tasks in (("train", suite.train), ("seen_eval", suite.seen_eval),
                         ("unseen_paraphrase", suite.unseen_paraphrase),
                         ("unseen_composition", suite.unseen_composition)):
        for t in tasks:
            name = t.name + (SEEN_EVAL_SUFFIX if split == "seen_eval" else "")
            atomic_write_text(out / "tasks" / f"{name}.json", json.dumps(_sni_json(t), indent=4, ensure_ascii=False))
            files[split].append(name)
    files["test"] = files["unseen_paraphrase"] + files["unseen_composition"]
    for folder in (out / "splits", out / "splits" / "default"):
        for split, names in files.items():
            atomic_write_text(folder / f"{split}_tasks.txt", "\n".join(names) + "\n")
    return out
