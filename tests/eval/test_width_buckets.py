"""Issue #17: inference pads its batches to width buckets (collate.WIDTH_BUCKET), so the shapes an evaluation runs
are few whatever the number of tasks. The CPU kernels keep one compiled kernel per shape (oneDNN / ideep caches of
bf16 matmuls, torch's unbounded brgemm cache behind CPU flash attention): with exact widths, every new length an
evaluation met grew host memory. Checked here: the widths the backbone sees are multiples of the bucket, at most one
per bucket however many lengths come in (exact widths: one per length, which fails), and the answers, scores and
instruction encodings are those of exact widths (the extra columns are masked)."""
from __future__ import annotations

import random

import pytest
import torch
from tests.tiny import bpe_tokenizer, make_student, randomize_b_heads, tiny_backbone

from tagi_ds.data.collate import WIDTH_BUCKET, bucket_width, pad_id, pad_rows
from tagi_ds.data.tasks import Instance, Task
from tagi_ds.eval.rank_classification import collate_pairs, module_forward, rank_classify_ids
from tagi_ds.run.decode import decode_prompts, decode_student

N_ROWS = 24


@pytest.fixture(scope="module")
def tok():
    return bpe_tokenizer("t5")


def _rows(tok, n: int = N_ROWS, seed: int = 0, longest: int = 150) -> list[list[int]]:
    """n token rows of n distinct lengths in [1, longest], each ending with EOS (as encoded prompts do)."""
    rng = random.Random(seed)
    lengths = rng.sample(range(1, longest + 1), n)
    return [[rng.randrange(4, len(tok)) for _ in range(k - 1)] + [tok.eos_token_id] for k in lengths]


class WidthRecorder:
    """The sequence widths a module's forward is called with (its input_ids' last dimension)."""

    def __init__(self, module: torch.nn.Module):
        self.widths: list[int] = []
        self.handle = module.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None:
            self.widths.append(int(ids.shape[-1]))

    def close(self) -> list[int]:
        self.handle.remove()
        return self.widths


def _check_bucketed(widths: list[int], rows: list[list[int]]) -> None:
    longest = max(len(r) for r in rows)
    assert widths and all(w % WIDTH_BUCKET == 0 for w in widths), widths
    assert len(set(widths)) <= -(-longest // WIDTH_BUCKET)  # at most one shape per bucket
    assert max(widths) == bucket_width(longest)  # never wider than the longest row's bucket


def test_bucket_width_and_pad_rows():
    assert [bucket_width(w) for w in (0, 1, 63, 64, 65, 1000)] == [0, 64, 64, 64, 128, 1024]
    assert bucket_width(37, 1) == 37 and bucket_width(37, 8) == 40
    out = pad_rows([[5, 6, 7], [8]], 0, left=True, multiple=4)
    assert out.tolist() == [[0, 5, 6, 7], [0, 0, 0, 8]]
    assert pad_rows([[5, 6, 7], [8]], 9, multiple=8).shape == (2, 8)


def test_plain_decoding_runs_bucketed_widths_with_the_exact_widths_answers(tok):
    model = tiny_backbone("t5", vocab_size=len(tok), wide_init=True, seed=3).eval()
    rows = _rows(tok)
    rec = WidthRecorder(model.encoder)
    bucketed = decode_prompts(model, tok, "t5", rows, device="cpu", max_new_tokens=4, batch_size=5)
    _check_bucketed(rec.close(), rows)
    rec = WidthRecorder(model.encoder)
    exact = decode_prompts(model, tok, "t5", rows, device="cpu", max_new_tokens=4, batch_size=5, width_multiple=1)
    assert len(set(rec.close())) == -(-N_ROWS // 5)  # exact widths: a new shape for every batch
    assert bucketed == exact and len(set(exact)) > 1  # the answers depend on the prompt, not on the padding


@pytest.mark.parametrize("arch", ["t5", "llama"])
def test_student_instructions_and_decoding_run_bucketed_widths(arch):
    tok = bpe_tokenizer(arch)
    special = {} if arch == "t5" else dict(pad_token_id=None, bos_token_id=tok.bos_token_id,
                                           eos_token_id=tok.eos_token_id)
    student = make_student(arch, tiny_backbone(arch, vocab_size=len(tok), wide_init=True, seed=4, **special).eval())
    randomize_b_heads(student, std=0.2)
    instr = _rows(tok, n=3, seed=1, longest=100)
    rec = WidthRecorder(student.backbone.encoder if arch == "t5" else student.backbone.model)
    enc = student.encode_instruction_rows(instr, pad_id(tok), "cpu", width_multiple=WIDTH_BUCKET)
    _check_bucketed(rec.close(), instr)
    exact = student.encode_instruction_rows(instr, pad_id(tok), "cpu")
    w = exact.hidden.shape[1]
    assert enc.hidden.shape[1] == bucket_width(w) and bool((enc.mask[:, w:] == 0).all())
    torch.testing.assert_close(enc.pooled, exact.pooled, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(enc.hidden[:, :w] * exact.mask[..., None], exact.hidden * exact.mask[..., None],
                               atol=1e-5, rtol=1e-5)

    rows = _rows(tok, seed=2)
    task_of_row = [i % 3 for i in range(N_ROWS)]
    adapters = student.generate_adapters(enc)
    rec = WidthRecorder(student.backbone.encoder if arch == "t5" else student.backbone)
    bucketed = decode_student(student, tok, enc, adapters, rows, task_of_row, device="cpu", max_new_tokens=3,
                              batch_size=5)
    widths = rec.close()
    if arch == "llama":  # the first call of each batch reads the prompt; the next steps read one token
        widths = [x for x in widths if x > 1]
    _check_bucketed(widths, rows)
    exact_answers = decode_student(student, tok, exact, student.generate_adapters(exact), rows, task_of_row,
                                   device="cpu", max_new_tokens=3, batch_size=5, width_multiple=1)
    assert bucketed == exact_answers and len(set(bucketed)) > 1


def test_rank_classification_scores_bucketed_as_exact(tok):
    model = tiny_backbone("t5", vocab_size=len(tok), wide_init=True, seed=5).eval()
    sources = _rows(tok, n=6, seed=3, longest=90)
    insts = tuple(Instance(f"i{k}", "x", ("Yes",), "Yes", ("Yes", "No", "The cat sat on the mat."))
                  for k in range(len(sources)))
    task = Task("t", "", (), (), insts, meta={"dataset": "rte", "prompt": "p"})
    batch = collate_pairs("t5", [(s, [7, 8, 1]) for s in sources], pad_id(tok))
    assert batch.input_ids.shape[1] == bucket_width(max(len(s) for s in sources)) and batch.labels.shape[1] == 8
    rec = WidthRecorder(model.encoder)
    res = rank_classify_ids(module_forward(model, "t5"), "t5", tok, task, sources, pad_id(tok), batch_size=2)
    _check_bucketed(rec.close(), sources)
    alone = [rank_classify_ids(module_forward(model, "t5"), "t5", tok, Task("t", "", (), (), (i,)), [s],
                               pad_id(tok), batch_size=1) for i, s in zip(insts, sources)]
    assert [a.predictions[0] for a in alone] == res.predictions
    for a, scores in zip(alone, res.scores):
        assert a.scores[0] == pytest.approx(scores, abs=1e-5)
    exact = collate_pairs("t5", [(s, [7, 8, 1]) for s in sources], pad_id(tok), buckets=False)
    assert exact.input_ids.shape[1] == max(len(s) for s in sources) and exact.labels.shape[1] == 3
