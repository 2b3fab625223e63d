"""Rank classification: batched scores equal a one-pair-at-a-time reference; a rigged model picks its answer; token
mean (the default, TAGI's scorer) and sum disagree where lengths differ; one forward per batch of instances; the
per-prompt → per-dataset → mean / median-of-medians report equals a hand computation."""
from __future__ import annotations

import math

import pytest
import torch
from tests.tiny import WORD_V as V, eager_llama, eager_t5

from tagi_ds.data.tasks import Instance, Task
from tagi_ds.errors import ConfigError, DataError
from tagi_ds.eval.rank_classification import (HELDOUT_DATASETS, PromptResult, accuracy_per_prompt_then_dataset,
                                               choice_logliks, module_forward, rank_classify, rank_classify_task,
                                               t0_report)

SOURCES = ["is the sky blue", "question w1 w2 w3 w4 w5 w6 answer", "it is true"]
CHOICES = [["yes", "no", "maybe w3 w4"], ["w7", "w8 w9"], ["true", "no w1", "yes", "w2 w3 w4 w5"]]


def _reference_loglik(model, arch, tok, src, choice):
    """One unpadded forward per pair, log-softmax by hand."""
    s = tok(src).input_ids
    c = tok(choice, add_special_tokens=False).input_ids
    with torch.no_grad():
        if arch == "t5":
            c = c + [tok.eos_token_id]
            dec_in = [model.config.decoder_start_token_id] + c[:-1]
            logits = model(input_ids=torch.tensor([s]), decoder_input_ids=torch.tensor([dec_in])).logits[0]
            logp = torch.log_softmax(logits, -1)
            return sum(logp[t, c[t]].item() for t in range(len(c))), len(c)
        logits = model(input_ids=torch.tensor([s + c])).logits[0]
        logp = torch.log_softmax(logits, -1)
        return sum(logp[len(s) - 1 + t, c[t]].item() for t in range(len(c))), len(c)


@pytest.mark.parametrize("arch", ["t5", "llama"])
def test_batched_scores_match_reference(arch, t5_tok, llama_tok):
    model = eager_t5() if arch == "t5" else eager_llama()
    tok = t5_tok if arch == "t5" else llama_tok
    got_sum = choice_logliks(model, arch, tok, SOURCES, CHOICES, reduction="sum", batch_size=3)
    got_mean = choice_logliks(model, arch, tok, SOURCES, CHOICES, reduction="mean", batch_size=4)
    for i, (src, chs) in enumerate(zip(SOURCES, CHOICES)):
        assert len(got_sum[i]) == len(chs)
        for j, ch in enumerate(chs):
            ref, n = _reference_loglik(model, arch, tok, src, ch)
            assert got_sum[i][j] == pytest.approx(ref, abs=1e-4)
            assert got_mean[i][j] == pytest.approx(ref / n, abs=1e-4)


def _rig(model, token_id: int, bias: float) -> None:
    """Replace the LM head by a zero map plus a bias on one token: every position predicts it."""
    d = model.lm_head.in_features
    head = torch.nn.Linear(d, V, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[token_id] = bias
    model.lm_head = head


@pytest.mark.parametrize("arch", ["t5", "llama"])
def test_rigged_model_picks_known_answer_and_sum_vs_mean(arch, t5_tok, llama_tok):
    model = eager_t5(seed=1) if arch == "t5" else eager_llama(seed=1)
    tok = t5_tok if arch == "t5" else llama_tok
    yes = tok.convert_tokens_to_ids("yes")
    b = 8.0
    _rig(model, yes, b)
    lse = math.log(math.exp(b) + V - 1)
    lp_yes, lp_other = b - lse, -lse

    sources = ["is the sky blue", "it is true", "question"]
    choices = [["no", "yes", "maybe"], ["yes", "green"], ["w1", "w2", "w3", "yes"]]
    assert rank_classify(model, arch, tok, sources, choices) == [1, 0, 3]
    # the same through a plain forward callable (how the TAGI student plugs in)
    fwd = module_forward(model, arch)
    assert rank_classify(fwd, arch, tok, sources, choices, reduction="mean") == [1, 0, 3]

    if arch == "t5":  # T0: the closing </s> is scored too
        ch = ["yes yes yes", "yes"]
        want_sum = [3 * lp_yes + lp_other, lp_yes + lp_other]
        want_mean = [want_sum[0] / 4, want_sum[1] / 2]
    else:
        ch = ["yes no", "no"]
        want_sum = [lp_yes + lp_other, lp_other]
        want_mean = [want_sum[0] / 2, want_sum[1]]
    s = choice_logliks(model, arch, tok, ["is it true"], [ch], reduction="sum")[0]
    m = choice_logliks(model, arch, tok, ["is it true"], [ch], reduction="mean")[0]
    assert s == pytest.approx(want_sum, abs=1e-4)
    assert m == pytest.approx(want_mean, abs=1e-4)
    # lengths differ, so the two reductions disagree on the answer; the default is the token mean
    assert rank_classify(model, arch, tok, ["is it true"], [ch], reduction="sum") == [1]
    assert rank_classify(model, arch, tok, ["is it true"], [ch], reduction="mean") == [0]
    assert rank_classify(model, arch, tok, ["is it true"], [ch]) == [0]


# dataset → prompt → (predictions, labels); per-prompt accuracy by hand in the comments
TABLE = {
    "rte": {"p1": ([0, 1], [0, 1]),            # 100
            "p2": ([1, 0], [1, 1]),            # 50
            "p3": ([0], [1])},                 # 0     → mean 50, median 50
    "copa": {"q1": ([1, 1, 1, 1], [1, 1, 1, 0]),  # 75
             "q2": ([0], [0])},                   # 100 → mean 87.5, median 87.5
    "cb": {"r1": ([2], [0]),                   # 0
           "r2": ([1, 1], [1, 0]),             # 50
           "r3": ([0, 0], [0, 0]),             # 100
           "r4": ([0], [1])},                  # 0     → mean 37.5, median 25
}


def test_accuracy_per_prompt_then_dataset():
    preds, labels, prompts, datasets = [], [], [], []
    for ds, by_prompt in TABLE.items():
        for pr, (p, y) in by_prompt.items():
            preds += p
            labels += y
            prompts += [pr] * len(p)
            datasets += [ds] * len(p)
    got = accuracy_per_prompt_then_dataset(preds, labels, prompts, datasets)
    assert list(got["datasets"]) == ["cb", "rte", "copa"]  # T0's held-out order
    assert got["datasets"]["rte"]["prompts"] == {"p1": 100.0, "p2": 50.0, "p3": 0.0}
    assert got["datasets"]["copa"]["prompts"] == {"q1": 75.0, "q2": 100.0}
    assert got["datasets"]["cb"]["prompts"] == {"r1": 0.0, "r2": 50.0, "r3": 100.0, "r4": 0.0}
    assert [(d["mean"], d["median"]) for d in got["datasets"].values()] == [(37.5, 25.0), (50.0, 50.0),
                                                                             (87.5, 87.5)]
    assert got["mean"] == pytest.approx((37.5 + 50 + 87.5) / 3)      # mean of the dataset means
    assert got["median"] == 50.0                                      # median of the dataset medians (TAGI)
    assert got["mean_of_medians"] == pytest.approx((25 + 50 + 87.5) / 3)  # what the old code called the median


def test_t0_report_from_prompt_results():
    results = [PromptResult(f"{ds}_{pr}", ds, pr, p, y) for ds, by in TABLE.items() for pr, (p, y) in by.items()]
    report = t0_report(results)
    assert report["median"] == 50.0 and report["datasets"]["cb"]["median"] == 25.0
    assert report["missing"] == [d for d in HELDOUT_DATASETS if d not in TABLE]
    with pytest.raises(DataError, match="appears twice"):
        t0_report(results + results[:1])


def test_one_forward_per_batch_of_instances(t5_tok, llama_tok):
    """All choices of `batch_size` instances go through one forward; an instance's choices are never split."""
    for arch, model, tok in (("t5", eager_t5(), t5_tok), ("llama", eager_llama(), llama_tok)):
        calls = []
        inner = module_forward(model, arch)

        def counting(input_ids, attention_mask, labels):
            calls.append(input_ids.shape[0])
            return inner(input_ids, attention_mask, labels)

        batched = choice_logliks(counting, arch, tok, SOURCES, CHOICES, batch_size=2)
        assert calls == [3 + 2, 4]  # instances 0-1 (3 and 2 choices), then instance 2 (4 choices)
        one_by_one = choice_logliks(model, arch, tok, SOURCES, CHOICES, batch_size=1)
        assert [s == pytest.approx(o, abs=1e-5) for s, o in zip(batched, one_by_one)] == [True] * 3


def _p3_task(choices, targets, dataset="rte", prompt="GPT_3_style") -> Task:
    insts = tuple(Instance(id=f"i{k}", input=f"question w{k}", references=(t,), label=t, answer_choices=tuple(c))
                  for k, (c, t) in enumerate(zip(choices, targets)))
    return Task(name=f"{dataset}_{prompt}", definition="", positive_examples=(), negative_examples=(),
                instances=insts, meta={"dataset": dataset, "prompt": prompt})


@pytest.mark.parametrize("arch", ["t5", "llama"])
def test_rank_classify_task(arch, t5_tok, llama_tok):
    model = eager_t5(seed=2) if arch == "t5" else eager_llama(seed=2)
    tok = t5_tok if arch == "t5" else llama_tok
    _rig(model, tok.convert_tokens_to_ids("yes"), 8.0)
    task = _p3_task([["no", "yes"], ["yes", "no"], ["maybe", "no", "yes"]], ["yes", " no", "yes"])
    sources = [i.input for i in task.instances]
    for m in (model, module_forward(model, arch)):  # a HF model or a forward closure (the TAGI student's way)
        res = rank_classify_task(m, arch, tok, task, sources)
        assert (res.dataset, res.prompt) == ("rte", "GPT_3_style")
        assert res.predictions == [1, 0, 2] and res.labels == [1, 1, 2]
        assert res.accuracy == pytest.approx(200 / 3)
    with pytest.raises(DataError, match="2 sources for 3 instances"):
        rank_classify_task(model, arch, tok, task, sources[:2])
    with pytest.raises(DataError, match=r"instance i0: target 'green' is none of its answer choices"):
        rank_classify_task(model, arch, tok, _p3_task([["no", "yes"]], ["green"]), ["q"])


def test_bad_input(t5_tok):
    model = eager_t5()
    with pytest.raises(ConfigError, match="arch"):
        choice_logliks(model, "gpt", t5_tok, ["x"], [["yes"]])
    with pytest.raises(DataError, match="no answer choices"):
        choice_logliks(model, "t5", t5_tok, ["x"], [[]])
    with pytest.raises(ConfigError, match="reduction"):
        choice_logliks(model, "t5", t5_tok, ["x"], [["yes"]], reduction="max")
    with pytest.raises(DataError, match="2 sources but 1"):
        choice_logliks(model, "t5", t5_tok, ["x", "y"], [["yes"]])


def test_source_truncation(t5_tok, llama_tok):
    from tagi_ds.eval.rank_classification import encode_pairs

    src = "w1 w2 w3 w4 w5 w6"
    (t5_pair,), = encode_pairs("t5", t5_tok, [src], [["yes"]], max_source_len=4)
    assert t5_tok.convert_ids_to_tokens(t5_pair[0]) == ["w1", "w2", "w3", "</s>"]
    assert t5_tok.convert_ids_to_tokens(t5_pair[1]) == ["yes", "</s>"]
    (ll_pair,), = encode_pairs("llama", llama_tok, [src], [["yes"]], max_source_len=3)
    assert llama_tok.convert_ids_to_tokens(ll_pair[0]) == ["w4", "w5", "w6"]  # the end of a prompt matters most
    assert llama_tok.convert_ids_to_tokens(ll_pair[1]) == ["yes"]
