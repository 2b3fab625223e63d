"""Collation: label masking for T5 and causal backbones, instruction/input separation, padding sides, truncation."""
from __future__ import annotations

import pytest
import torch

from tagi_ds.data import prompts
from tagi_ds.data.collate import (IGNORE, PromptSettings, collate_full, collate_student, encode_target,
                                  instruction_ids)
from tagi_ds.data.tasks import Example, Instance, Task
from tagi_ds.errors import DataError


def _task(name: str, n: int, definition: str = "Answer with Yes or No.") -> Task:
    insts = tuple(Instance(f"{name}-{i}", "Which city should I search" + "?" * (i + 1),
                           ("Yes", "No"), "Yes" if i % 2 == 0 else "No is the answer") for i in range(n))
    exs = (Example("I am feeling hungry.", "No"), Example("Do you have a place?", "Yes"))
    return Task(name, definition, exs, (), insts)


@pytest.fixture
def pairs():
    a, b = _task("a", 3), _task("b", 2, "Repeat the sentence from the conversation.")
    return [(a, a.instances[0]), (b, b.instances[0]), (a, a.instances[1]), (b, b.instances[1]), (a, a.instances[2])]


def _ids(tok, text, special=True):
    return tok(text, add_special_tokens=special)["input_ids"]


def test_t5_student_batch(pairs, t5_tokenizer):
    tok = t5_tokenizer
    s = PromptSettings(arch="t5")
    batch = collate_student(pairs, tok, s)
    assert batch.task_names == ["a", "b"] and batch.task_ids.tolist() == [0, 1, 0, 1, 0]
    assert batch.instance_ids == [i.id for _, i in pairs]
    # one instruction row per task, exactly the tokenized TAGI instruction (eos appended, pad on the right)
    for row, (task, _) in zip(range(2), [pairs[0], pairs[1]]):
        want = _ids(tok, prompts.build_instruction(task))
        n = int(batch.instr_mask[row].sum())
        assert batch.instr_ids[row, :n].tolist() == want and want[-1] == tok.eos_token_id
        assert (batch.instr_ids[row, n:] == tok.pad_token_id).all()
    for k, (_, inst) in enumerate(pairs):
        want_in = _ids(tok, prompts.build_task_input(inst))
        n = int(batch.attention_mask[k].sum())
        assert batch.input_ids[k, :n].tolist() == want_in
        # labels = target ids + eos, then -100 padding
        want_lab = _ids(tok, inst.label, special=False) + [tok.eos_token_id]
        lab = batch.labels[k]
        assert lab[:len(want_lab)].tolist() == want_lab
        assert (lab[len(want_lab):] == IGNORE).all()
    assert batch.decoder_input_ids is None
    # the instruction never leaks into the backbone input
    assert not any("Definition" in tok.decode(r) for r in batch.input_ids)


def test_causal_labels_mask_prompt_and_padding(pairs, llama_tokenizer):
    tok = llama_tokenizer
    assert tok.pad_token_id is None  # LLaMA-like: padding falls back to eos
    batch = collate_full(pairs, tok, PromptSettings(arch="llama"))
    for k, (task, inst) in enumerate(pairs):
        prompt = _ids(tok, prompts.build_source(task, inst))
        assert prompt[0] == tok.bos_token_id
        target = _ids(tok, inst.label, special=False) + [tok.eos_token_id]
        n = int(batch.attention_mask[k].sum())
        assert batch.attention_mask[k, :n].all() and not batch.attention_mask[k, n:].any()  # right padding
        assert batch.input_ids[k, :n].tolist() == prompt + target
        lab = batch.labels[k].tolist()
        assert lab[:len(prompt)] == [IGNORE] * len(prompt)
        assert lab[len(prompt):n] == target
        assert lab[n:] == [IGNORE] * (len(lab) - n)
        assert (batch.input_ids[k, n:] == tok.eos_token_id).all()
    # labels and inputs line up: the loss sees exactly the target tokens
    assert int((batch.labels != IGNORE).sum()) == sum(
        len(_ids(tok, i.label, special=False)) + 1 for _, i in pairs)


def test_causal_generation_is_left_padded(pairs, llama_tokenizer):
    tok = llama_tokenizer
    batch = collate_student(pairs, tok, PromptSettings(arch="llama"), for_generation=True)
    assert batch.labels is None
    width = batch.input_ids.shape[1]
    for k, (_, inst) in enumerate(pairs):
        # no bos: the input continues the instruction prefix, whose row starts with it (one bos in all)
        want = _ids(tok, prompts.build_task_input(inst), special=False)
        assert want[0] != tok.bos_token_id and batch.instr_ids[0, 0] == tok.bos_token_id
        n = int(batch.attention_mask[k].sum())
        assert batch.input_ids[k, width - n:].tolist() == want  # prompt flush right
        assert not batch.attention_mask[k, :width - n].any()
    # t5 generation keeps right padding for the encoder
    t5 = collate_full(pairs, tok, PromptSettings(arch="t5"), for_generation=True)
    assert t5.attention_mask[:, 0].all()


def test_t5_full_prompt_and_no_instruction(pairs, t5_tokenizer):
    tok = t5_tokenizer
    full = collate_full(pairs, tok, PromptSettings(arch="t5"))
    bare = collate_full(pairs, tok, PromptSettings(arch="t5"), with_instruction=False)
    for k, (task, inst) in enumerate(pairs):
        n = int(full.attention_mask[k].sum())
        assert full.input_ids[k, :n].tolist() == _ids(tok, prompts.build_source(task, inst))
        m = int(bare.attention_mask[k].sum())
        assert bare.input_ids[k, :m].tolist() == _ids(tok, prompts.no_instruction_input(inst))
    assert torch.equal(full.labels, bare.labels)
    assert full.task_ids.tolist() == [0, 1, 0, 1, 0]


def test_truncation_and_target_override(pairs, t5_tokenizer, llama_tokenizer):
    s = PromptSettings(arch="t5", max_input_length=6, max_target_length=2, max_source_length=10)
    batch = collate_student(pairs, t5_tokenizer, s, targets=["No is the answer"] * len(pairs))
    assert batch.input_ids.shape[1] == 6 and (batch.input_ids[:, -1] == t5_tokenizer.eos_token_id).all()
    assert batch.labels.shape[1] == 2 and (batch.labels[:, 1] == t5_tokenizer.eos_token_id).all()
    assert encode_target(t5_tokenizer, "No is the answer", 1) == [t5_tokenizer.eos_token_id]
    full = collate_full(pairs, llama_tokenizer, PromptSettings(arch="llama", max_source_length=10,
                                                               max_target_length=3))
    assert full.input_ids.shape[1] <= 13
    assert (full.labels != IGNORE).sum(1).max() <= 3


def test_instruction_overflow(t5_tokenizer):
    task = _task("long", 1, definition="word " * 200)
    cut = instruction_ids(task, t5_tokenizer, PromptSettings(max_instruction_length=16))
    assert len(cut) == 16 and cut[-1] == t5_tokenizer.eos_token_id
    with pytest.raises(DataError, match="'long'.*max_instruction_length 16"):
        instruction_ids(task, t5_tokenizer, PromptSettings(max_instruction_length=16, instruction_overflow="error"))
    # examples are dropped before anything is cut
    short = _task("s", 1)
    n_def = len(t5_tokenizer(prompts.definition_text(short))["input_ids"])
    ids = instruction_ids(short, t5_tokenizer, PromptSettings(max_instruction_length=n_def))
    assert ids == t5_tokenizer(prompts.definition_text(short))["input_ids"]


def test_instruction_cache_is_reused(pairs, t5_tokenizer):
    cache: dict = {}
    collate_student(pairs, t5_tokenizer, PromptSettings(), instruction_cache=cache)
    assert set(cache) == {"a", "b"}
    cache["a"] = [7, 7, 1]
    batch = collate_student(pairs[:1], t5_tokenizer, PromptSettings(), instruction_cache=cache)
    assert batch.instr_ids.tolist() == [[7, 7, 1]]
