"""SNI metrics against values computed by hand on fixed strings."""
from __future__ import annotations

import pytest

from tagi_ds.errors import DataError
from tagi_ds.metrics import (category_key, compute_grouped_metrics, compute_metrics, echo_reference,
                                  exact_match, normalize_answer, rouge_l)


def test_normalize_answer_keeps_articles_drops_punctuation():
    assert normalize_answer("  The Cat,  sat!\n") == "the cat sat"
    assert normalize_answer("a dog") == "a dog"  # SNI does not remove articles (unlike SQuAD)
    assert normalize_answer("don't-stop") == "dontstop"


def test_exact_match_normalised_and_max_over_refs():
    assert exact_match("Yes!", ["yes"]) == 1.0
    assert exact_match("Hello,   World", ["hello world"]) == 1.0
    assert exact_match("a dog", ["dog"]) == 0.0
    assert exact_match("blue", ["red", "Blue."]) == 1.0
    assert exact_match("blue", ["red", "green"]) == 0.0


def test_rouge_l_hand_values():
    # pred 6 tokens, ref 5, LCS 5: P=5/6, R=1, F=10/11
    assert rouge_l("The cat sat on the mat.", ["the cat sat on mat"]) == pytest.approx(10 / 11)
    # LCS("alpha beta gamma delta", "alpha gamma epsilon") = 2: P=1/2, R=2/3, F=4/7
    assert rouge_l("alpha beta gamma delta", ["alpha gamma epsilon"]) == pytest.approx(4 / 7)
    # max over references: 0, 4/7, and "alpha beta" (P=1/2, R=1, F=2/3)
    assert rouge_l("alpha beta gamma delta", ["zeta", "alpha gamma epsilon", "alpha beta"]) == pytest.approx(2 / 3)
    # Porter stemming: cats→cat, running/runs→run; punctuation is not a token
    assert rouge_l("Cats running!", ["cat runs"]) == pytest.approx(1.0)
    assert rouge_l("", ["something"]) == 0.0


def test_compute_metrics_averages_times_100():
    preds = ["The cat sat on the mat.", "yes", "alpha beta gamma delta"]
    refs = [["the cat sat on mat"], ["No", "Yes."], ["alpha gamma epsilon", "zeta"]]
    got = compute_metrics(preds, refs)
    assert got["exact_match"] == pytest.approx(round(100 / 3, 4))
    assert got["rougeL"] == pytest.approx(round(100 * (10 / 11 + 1 + 4 / 7) / 3, 4))
    assert set(got) == {"rougeL", "exact_match"}


def test_grouped_metrics_and_category_key():
    preds = ["yes", "no", "alpha beta gamma delta"]
    refs = [["yes"], ["yes"], ["alpha gamma epsilon"]]
    got = compute_grouped_metrics(preds, refs, ["task_a", "task_a", "task_b"])
    assert got == {"task_a": {"rougeL": 50.0, "exact_match": 50.0},
                   "task_b": {"rougeL": round(400 / 7, 4), "exact_match": 0.0}}
    assert category_key("Question  Answering") == "question_answering"


def test_echo_reference_scores_the_input_as_answer():
    got = echo_reference(["the sky is blue", "x"], [["The sky is blue."], ["blue sky"]])
    assert got == {"rougeL": 50.0, "exact_match": 50.0}


def test_bad_input_raises_data_error():
    with pytest.raises(DataError, match="no references"):
        rouge_l("a", [])
    with pytest.raises(DataError, match="list of strings"):
        exact_match("a", "a")
    with pytest.raises(DataError, match="2 predictions but 1"):
        compute_metrics(["a", "b"], [["a"]])
    with pytest.raises(DataError, match="lengths differ"):
        compute_grouped_metrics(["a"], [["a"]], ["g", "h"])
