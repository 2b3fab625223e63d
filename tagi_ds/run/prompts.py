"""The run's prompt settings, from the config: every stage and every evaluated method encodes prompts through
`data.collate` with these, so a teacher, a baseline and the frozen backbone read the same tokens for the same
instance (one encoder, one truncation rule: `collate.encode_prompt` keeps the start, as Tk-Instruct's collator does).
"""
from __future__ import annotations

from typing import Sequence

from ..data.collate import EncodedPair, PromptSettings, encode_prompt, encode_target, full_prompt_text
from ..data.tasks import Instance, Task


def num_demonstrations(data_cfg) -> int:
    """Demonstrations in an instruction: P3's instruction is its held-out templated demonstrations
    (`data.p3_num_demonstrations`, 16 as in HyperT5 / FiD-ICL); SNI and the suite use Def + `num_pos_examples` Pos."""
    return data_cfg.p3_num_demonstrations if data_cfg.source == "p3" else data_cfg.num_pos_examples


def prompt_settings(cfg, arch: str) -> PromptSettings:
    d = cfg.data
    return PromptSettings(arch=arch, num_pos=num_demonstrations(d), add_definition=d.add_task_definition,
                          max_source_length=d.max_source_length, max_input_length=d.max_input_length,
                          max_target_length=d.max_target_length, instruction_overflow=d.instruction_overflow,
                          student_input_after_prefix=cfg.hypernet.fusion)


def encode_examples(task: Task, tokenizer, settings: PromptSettings, with_instruction: bool = True
                    ) -> list[EncodedPair]:
    """Each instance's prompt and target ids, exactly as `collate.collate_full` builds them (the student's labels
    come from the same `encode_target(Instance.label, max_target_length)`). `with_instruction=False`: the
    no-instruction baseline's prompt (the instance part alone, capped at max_input_length)."""
    return [EncodedPair(tuple(source_ids(task, inst, tokenizer, settings, with_instruction)),
                        tuple(encode_target(tokenizer, inst.label, settings.max_target_length)))
            for inst in task.instances]


def source_ids(task: Task, inst: Instance, tokenizer, settings: PromptSettings, with_instruction: bool = True
               ) -> list[int]:
    """One instance's full prompt ids (Tk-Instruct source), or its instance part alone (`with_instruction=False`)."""
    max_len = settings.max_source_length if with_instruction else settings.max_input_length
    return encode_prompt(tokenizer, full_prompt_text(task, inst, tokenizer, settings, with_instruction), max_len)


def prompt_ids(tasks: Sequence[Task], tokenizer, settings: PromptSettings, with_instruction: bool = True
               ) -> list[list[int]]:
    """The prompts of every instance of `tasks`, in order (what a plain backbone is asked to continue)."""
    return [source_ids(t, inst, tokenizer, settings, with_instruction) for t in tasks for inst in t.instances]


def teacher_reads_instruction(cfg) -> bool:
    """True when the teachers read the full Tk-Instruct prompt (teacher.prompt=full); False when they read the
    instance part alone (teacher.prompt=input: the same ids the no-instruction baseline reads). Every reader of a
    teacher (its training, its cache, the online KL, its report row) encodes through this, so each teacher is always
    read on the prompt it was trained on."""
    return cfg.teacher.prompt == "full"


def teacher_examples(cfg, task: Task, tokenizer, settings: PromptSettings) -> list[EncodedPair]:
    """A task's instances as its teacher reads them (`teacher.prompt`), targets as the student's."""
    return encode_examples(task, tokenizer, settings, with_instruction=teacher_reads_instruction(cfg))


def teacher_options(cfg) -> dict:
    """The teacher settings beyond run.artifacts.teacher_config that change what a teacher is (its prompt, its base,
    its init):
    only the non-default ones, so teachers and shards published before these options existed keep their hashes."""
    out = {}
    if cfg.teacher.prompt != "full":
        out["prompt"] = cfg.teacher.prompt
    if cfg.teacher.base != "backbone":
        out["base"] = cfg.teacher.base
    if cfg.teacher.init != "per_unit":
        out["init"] = cfg.teacher.init
    return out
