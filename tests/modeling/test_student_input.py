"""The fused LLaMA student reads what Tk-Instruct's model would: [bos instruction ; input] with ONE bos (issue 18: the
student input used to start with the tokenizer's bos again, after the instruction prefix)."""
from __future__ import annotations

import torch

from tagi_ds.data.collate import PromptSettings, collate_student, encode_prompt
from tagi_ds.data.prompts import build_task_input
from tagi_ds.data.tasks import Example, Instance, Task

from tests.tiny import bpe_tokenizer, make_student, tiny_backbone


def _tasks() -> list[Task]:
    def task(name: str, definition: str, n: int) -> Task:
        insts = tuple(Instance(f"{name}-{i}", "Which city should I search" + "?" * (i + 1), ("Yes",),
                               "Yes" if i % 2 else "No") for i in range(n))
        return Task(name, definition, (Example("I am feeling hungry.", "No"),), (), insts)

    return [task("a", "Answer with Yes or No.", 2), task("b", "Your task is to identify whether it is a question.", 2)]


def _student_and_batch():
    tok = bpe_tokenizer("llama")
    student = make_student("llama", tiny_backbone("llama", vocab_size=len(tok)))  # fresh hypernet: ΔW = 0 exactly
    pairs = [(t, inst) for t in _tasks() for inst in t.instances]
    batch = collate_student(pairs, tok, PromptSettings(arch="llama", max_instruction_length=256))
    return tok, student, batch


def test_fused_llama_student_equals_the_plain_model_on_one_bos_sequence():
    tok, student, batch = _student_and_batch()
    with torch.no_grad():
        enc = student.encode_instructions(batch.instr_ids, batch.instr_mask)
        logits = student(enc, batch.task_ids, batch.input_ids, batch.attention_mask).logits
        for row in range(batch.input_ids.shape[0]):
            t = int(batch.task_ids[row])
            instr = batch.instr_ids[t][batch.instr_mask[t].bool()]
            x = batch.input_ids[row][batch.attention_mask[row].bool()]
            seq = torch.cat([instr, x])  # what the backbone reads, as one sequence
            assert int((seq == tok.bos_token_id).sum()) == 1 and seq[0] == tok.bos_token_id
            ref = student.backbone(input_ids=seq[None]).logits[0, len(instr):]
            torch.testing.assert_close(logits[row][batch.attention_mask[row].bool()], ref, atol=1e-5, rtol=1e-5)


def test_a_second_bos_would_change_the_logits():
    """The check above can fail: the old input (encode_prompt: bos + text) is not the one-bos sequence."""
    tok, student, batch = _student_and_batch()
    inst = _tasks()[0].instances[0]
    old = encode_prompt(tok, build_task_input(inst), 128)
    assert old[0] == tok.bos_token_id
    with torch.no_grad():
        enc = student.encode_instructions(batch.instr_ids[:1], batch.instr_mask[:1])
        x = torch.tensor([old])
        got = student(enc, torch.tensor([0]), x, torch.ones_like(x)).logits[0, 1:]
        instr = batch.instr_ids[0][batch.instr_mask[0].bool()]
        ref = student.backbone(input_ids=torch.cat([instr, x[0, 1:]])[None]).logits[0, len(instr):]
    assert (got - ref).abs().max() > 1e-3


def test_without_fusion_the_input_keeps_its_bos_and_t5_inputs_are_unchanged():
    """No prefix (hypernet.fusion=false): the input is the whole sequence and opens with bos. T5: text + eos."""
    llama, t5 = bpe_tokenizer("llama"), bpe_tokenizer("t5")
    pairs = [(t, inst) for t in _tasks() for inst in t.instances]
    text = build_task_input(pairs[0][1])
    alone = collate_student(pairs, llama, PromptSettings(arch="llama", student_input_after_prefix=False))
    fused = collate_student(pairs, llama, PromptSettings(arch="llama"))
    n = len(encode_prompt(llama, text, 128))
    assert alone.input_ids[0, :n].tolist() == encode_prompt(llama, text, 128)
    assert fused.input_ids[0, :n - 1].tolist() == encode_prompt(llama, text, 128)[1:]
    capped = collate_student(pairs[:1], llama, PromptSettings(arch="llama", max_input_length=5), for_generation=True)
    assert capped.input_ids[0].tolist() == encode_prompt(llama, text, 6)[1:]  # still 5 tokens, none of them bos
    t5_batch = collate_student(pairs, t5, PromptSettings(arch="t5"))
    m = len(encode_prompt(t5, text, 128))
    assert t5_batch.input_ids[0, :m].tolist() == encode_prompt(t5, text, 128) and t5.bos_token_id is not None


def test_the_run_prompt_settings_follow_hypernet_fusion():
    """Every stage's student inputs come from run.prompts.prompt_settings: one bos after the prefix only with fusion."""
    from tagi_ds.config import load_config
    from tagi_ds.run.prompts import prompt_settings

    assert prompt_settings(load_config(None, []), "llama").student_input_after_prefix is True
    off = load_config(None, ["hypernet.fusion=false"])
    assert prompt_settings(off, "llama").student_input_after_prefix is False
