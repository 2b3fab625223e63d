"""A LLaMA-family tokenizer without a pad token (tests/tiny.py's bpe_tokenizer("llama"), as Llama-2 ships): greedy
decoding of a plain backbone and of the TAGI student, and rank classification, pad with EOS (collate.pad_id), mask
the padding, and answer every row of a batch exactly as it answers that row alone. Breaks if the pad id is None
(torch.full(..., None)), if causal prompts are right-padded, or if the padding is not masked."""
from __future__ import annotations

import pytest
import torch
from tests.tiny import bpe_tokenizer, make_student, randomize_b_heads, tiny_backbone

from tagi_ds.data.collate import pad_id
from tagi_ds.data.tasks import Instance, Task
from tagi_ds.eval.rank_classification import module_forward, rank_classify_ids
from tagi_ds.run.decode import DecodeStats, decode_prompts, decode_student

PROMPTS = ["The cat sat on the mat.", "Which city should I search?",
           "A farmer crossed the long road to the market in the morning. Answer with Yes or No.", "Yes",
           "Your task is to identify whether the sentence is a question or not."]


@pytest.fixture(scope="module")
def tok():
    t = bpe_tokenizer("llama")
    assert t.pad_token is None and t.pad_token_id is None  # the case under test
    return t


def _model(tok, seed: int = 0):
    return tiny_backbone("llama", vocab_size=len(tok), wide_init=True, seed=seed, pad_token_id=None,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id).eval()


def test_pad_id_falls_back_to_eos(tok):
    assert pad_id(tok) == tok.eos_token_id


def test_plain_backbone_generates_in_batches_as_alone(tok):
    model = _model(tok)
    rows = [tok(p).input_ids for p in PROMPTS]
    assert len({len(r) for r in rows}) >= 4  # rows of different lengths: the batch needs padding
    stats = DecodeStats()
    batched = decode_prompts(model, tok, "llama", rows, device="cpu", max_new_tokens=6, batch_size=5, stats=stats)
    alone = [decode_prompts(model, tok, "llama", [r], device="cpu", max_new_tokens=6, batch_size=1)[0] for r in rows]
    assert batched == alone
    assert len(set(batched)) > 1 and all(batched)  # the answers depend on the prompt
    assert stats.rows == len(rows) and 0 < stats.new_tokens <= 6 * len(rows)


def test_student_generates_in_batches_as_alone(tok):
    student = make_student("llama", _model(tok, seed=1))
    randomize_b_heads(student, std=0.2)
    instr = [tok("Answer with Yes or No.").input_ids, tok("Your task is to identify the city.").input_ids]
    enc = student.encode_instruction_rows(instr, pad_id(tok), "cpu")
    adapters = student.generate_adapters(enc)
    rows = [tok(p).input_ids for p in PROMPTS]
    task_of_row = [0, 1, 1, 0, 1]
    batched = decode_student(student, tok, enc, adapters, rows, task_of_row, device="cpu", max_new_tokens=5,
                             batch_size=5)
    alone = [decode_student(student, tok, enc, adapters, [r], [t], device="cpu", max_new_tokens=5, batch_size=1)[0]
             for r, t in zip(rows, task_of_row)]
    assert batched == alone and len(set(batched)) > 1


def test_rank_classification_pads_with_eos(tok):
    model = _model(tok, seed=2)
    insts = tuple(Instance(f"i{k}", p, ("Yes",), "Yes", ("Yes", "No", "The cat sat on the mat."))
                  for k, p in enumerate(PROMPTS))
    task = Task("t", "", (), (), insts, meta={"dataset": "rte", "prompt": "p"})
    src = [tok(p).input_ids for p in PROMPTS]
    fwd = module_forward(model, "llama")
    batched = rank_classify_ids(fwd, "llama", tok, task, src, pad_id(tok), batch_size=5)
    alone = [rank_classify_ids(fwd, "llama", tok, Task("t", "", (), (), (i,)), [s], pad_id(tok), batch_size=1)
             for i, s in zip(insts, src)]
    assert [p for a in alone for p in a.predictions] == batched.predictions
    for a, scores in zip(alone, batched.scores):
        assert a.scores[0] == pytest.approx(scores, abs=1e-5)


def test_decode_stats_count_tokens_up_to_the_first_eos():
    stats = DecodeStats()
    stats.add(torch.tensor([[5, 2, 2, 2], [5, 6, 7, 8], [2, 9, 9, 9]]), [2])
    assert (stats.rows, stats.new_tokens) == (3, 2 + 4 + 1)
