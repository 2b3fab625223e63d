"""The offline suite: deterministic, disjoint splits, correct operations, SNI export that reads back."""
from __future__ import annotations

import json
import statistics

import pytest

from tagi_ds.data.prompts import build_source, no_instruction_input
from tagi_ds.data.synthetic import (LIST_OPS, OPS, PRIMITIVES, WORDS, all_wording, apply_ops, build_suite,
                                    compositions, echo_reference, task_weights, write_sni)
from tagi_ds.errors import DataError


@pytest.fixture(scope="module")
def suite():
    return build_suite(seed=0, instances_per_task=40, held_back_per_task=10)


def _fingerprint(s):
    return [(t.name, t.definition, t.positive_examples, t.instances) for t in s.all_tasks()]


def test_suite_is_deterministic_by_seed(suite):
    again = build_suite(seed=0, instances_per_task=40, held_back_per_task=10)
    assert _fingerprint(again) == _fingerprint(suite)
    other = build_suite(seed=1, instances_per_task=40, held_back_per_task=10)
    assert [t.instances for t in other.train] != [t.instances for t in suite.train]


def test_split_sizes_and_shapes(suite):
    assert len(PRIMITIVES) == 12 and set(LIST_OPS) == {"reverse", "sort", "drop_first"}
    assert len(compositions()) == 22
    assert len(suite.train) == 12 + 16 and len(suite.unseen_composition) == 6 and len(suite.unseen_paraphrase) == 12
    assert all(len(t.instances) == 30 for t in suite.train)
    assert all(len(t.instances) == 10 for t in suite.seen_eval)
    for t in suite.all_tasks():
        assert len(t.positive_examples) >= 2 and t.meta["split"] in (
            "train", "seen_eval", "unseen_paraphrase", "unseen_composition")
        for inst in t.instances:
            words = inst.input.split()
            assert 3 <= len(words) <= 6 and set(words) <= set(WORDS) and len(set(words)) == len(words)
            assert inst.label == inst.references[0] == apply_ops(t.meta["ops"], tuple(words), t.meta["x"])


def test_splits_are_disjoint_and_unseen_compositions_never_train(suite):
    train = {t.name for t in suite.train}
    para, comp = {t.name for t in suite.unseen_paraphrase}, {t.name for t in suite.unseen_composition}
    assert not train & para and not train & comp and not para & comp
    # seen_eval = the same tasks, other instances
    assert [t.name for t in suite.seen_eval] == [t.name for t in suite.train]
    for tr, ev in zip(suite.train, suite.seen_eval):
        assert not {i.id for i in tr.instances} & {i.id for i in ev.instances}
        assert not {i.input for i in tr.instances} >= {i.input for i in ev.instances}  # not all repeats
    train_ops = {tuple(t.meta["ops"]) for t in suite.train}
    assert not train_ops & {tuple(t.meta["ops"]) for t in suite.unseen_composition}
    assert {tuple(t.meta["ops"]) for t in suite.unseen_paraphrase} <= train_ops  # seen ops, new wording


def test_unseen_paraphrase_uses_the_held_out_wording_only_there(suite):
    for t in suite.unseen_paraphrase:
        held = OPS[t.meta["ops"][0]].phrasings[3].format(x=t.meta["x"])
        assert held[0].upper() + held[1:] in t.definition
    held_out = [OPS[p].phrasings[3].split("{x}")[0] for p in PRIMITIVES]
    for t in suite.train + suite.unseen_composition:
        assert not any(h in t.definition for h in held_out), t.definition
    # the training wordings rotate: an op used in n training tasks is shown in min(n, 3) different wordings
    used: dict[str, list[int]] = {}
    for t in suite.train:
        for op, ph in zip(t.meta["ops"], t.meta["phrasings"]):
            used.setdefault(op, []).append(ph)
    assert set(used) == set(PRIMITIVES)
    for op, ids in used.items():
        assert len(set(ids)) == min(len(ids), 3) and max(ids) < 3, op


def test_operations_against_hand_results():
    w = ("dog", "apple", "cloud", "moon")
    assert apply_ops(["first"], w) == "dog" and apply_ops(["second"], w) == "apple"
    assert apply_ops(["third"], w) == "cloud" and apply_ops(["last"], w) == "moon"
    assert apply_ops(["count"], w) == "four"
    assert apply_ops(["alpha_first"], w) == "apple" and apply_ops(["alpha_last"], w) == "moon"
    assert apply_ops(["contains"], w, "cloud") == "yes" and apply_ops(["contains"], w, "zoo") == "no"
    assert apply_ops(["is_sorted"], w) == "no" and apply_ops(["is_sorted"], tuple(sorted(w))) == "yes"
    assert apply_ops(["reverse"], w) == "moon cloud apple dog"
    assert apply_ops(["sort"], w) == "apple cloud dog moon"
    assert apply_ops(["drop_first"], w) == "apple cloud moon"
    assert apply_ops(["sort", "reverse", "second"], w) == "dog"
    assert apply_ops(["drop_first", "count"], w) == "three"
    with pytest.raises(DataError, match="undefined"):
        apply_ops(["drop_first", "drop_first", "third"], w)


def test_every_op_changes_what_rouge_and_em_see(suite):
    from tagi_ds.metrics import normalize_answer

    for t in suite.train + suite.unseen():
        changed = [normalize_answer(i.label) != normalize_answer(i.input) for i in t.instances]
        assert sum(changed) / len(changed) >= 0.6, t.name
    for t in suite.all_tasks():  # answers never differ from an input word list by case or punctuation alone
        for i in t.instances:
            assert i.label == i.label.lower() and not any(c in i.label for c in ",.;:!?")


def test_answers_vary_and_inputs_share_one_distribution(suite):
    for t in suite.train:
        assert len({i.label for i in t.instances}) >= 2, t.name
    sorted_share = statistics.mean(i.input.split() == sorted(i.input.split()) for t in suite.train for i in t.instances)
    assert 0.2 < sorted_share < 0.4
    mean_len = [statistics.mean(len(i.input.split()) for i in t.instances) for t in suite.train]
    assert max(mean_len) - min(mean_len) < 1.2  # same length distribution for every task


def test_instruction_is_several_times_longer_than_the_input(suite):
    t = suite.train[0]
    ratios = [len(build_source(t, i)) / len(no_instruction_input(i)) for t in suite.train for i in t.instances[:3]]
    assert statistics.mean(ratios) > 3


def test_task_weights_give_primitives_their_share(suite):
    w = task_weights(suite.train, 0.6)
    prim = sum(wi for wi, t in zip(w, suite.train) if t.meta["kind"] == "primitive")
    assert sum(w) == pytest.approx(1.0) and prim == pytest.approx(0.6)


def test_echo_reference_scores_list_tasks_only(suite):
    echo = echo_reference(suite.unseen_composition)
    assert 10 < echo["rougeL"] < 60 and echo["exact_match"] < 10


def test_all_wording_covers_every_definition_word(suite):
    vocab = set(" ".join(all_wording(suite)).replace("\n", " ").split())
    for t in suite.all_tasks():
        assert set(t.definition.split()) <= vocab


def test_bad_arguments_name_the_setting():
    with pytest.raises(DataError, match="held_back_per_task"):
        build_suite(instances_per_task=10, held_back_per_task=10)
    with pytest.raises(DataError, match="min_words"):
        build_suite(min_words=5, max_words=4)


def test_write_sni_is_native_sni_json(suite, tmp_path):
    out = write_sni(suite, tmp_path / "sni")
    required = {"Definition", "Positive Examples", "Negative Examples", "Instances", "Categories"}
    train_names = (out / "splits" / "train_tasks.txt").read_text().split()
    test_names = (out / "splits" / "test_tasks.txt").read_text().split()
    assert train_names == [t.name for t in suite.train] and len(test_names) == 18
    assert (out / "splits" / "default" / "test_tasks.txt").read_text().split() == test_names
    for name in train_names + test_names:
        data = json.loads((out / "tasks" / f"{name}.json").read_text(encoding="utf-8"))
        assert required <= set(data) and isinstance(data["Definition"], list)
        assert all({"id", "input", "output"} <= set(i) and isinstance(i["output"], list) for i in data["Instances"])
    first = json.loads((out / "tasks" / f"{suite.train[0].name}.json").read_text())
    assert first["Definition"] == [suite.train[0].definition]
    assert [i["input"] for i in first["Instances"]] == [i.input for i in suite.train[0].instances]
    assert not list(out.rglob("*.tmp"))


def test_write_sni_reads_back_through_the_sni_loader(suite, tmp_path):
    sni = pytest.importorskip("tagi_ds.data.sni")
    out = write_sni(suite, tmp_path / "sni")
    loaded = sni.load_sni(out, split="test")
    assert [t.name for t in loaded] == [t.name for t in suite.unseen()]
    assert loaded[0].definition == suite.unseen()[0].definition
    assert [i.input for i in loaded[0].instances] == [i.input for i in suite.unseen()[0].instances[:len(loaded[0].instances)]]
