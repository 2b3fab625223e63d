"""The Tk-Instruct prompt, to the character (../shared/SNI_PROMPT.md), and TAGI's split of it.

- `build_source`: what the teacher and the Tk-Instruct-style baseline read (instruction + input, one string).
- `build_instruction`: what the student's hypernetwork (and fusion) reads: definition + examples, once per task.
- `build_task_input`: what the student's backbone reads: the instance part alone.
"""
from __future__ import annotations

import string
from typing import Callable, Optional, Sequence

from .tasks import Example, Instance, Task

TokenCounter = Callable[[str], int]


def _p(s: str) -> str:
    """Append '.' unless the text already ends in punctuation (Tk-Instruct's rule)."""
    return s if s and s[-1] in string.punctuation else s + "."


def definition_text(task: Task, add_definition: bool = True) -> str:
    # An empty definition (P3: the instruction is the demonstrations alone) must not print "Definition: ."
    if not add_definition or not task.definition.strip():
        return ""
    return _p("Definition: " + task.definition.strip()) + "\n\n"


def example_text(i: int, ex: Example) -> str:
    """The i-th (1-based) positive example block."""
    return (f" Positive Example {i} -\n" + _p("Input: " + ex.input.strip()) + "\n"
            + _p(" Output: " + ex.output.strip()) + "\n" + "\n")


def build_task_input(instance: Instance) -> str:
    return "Now complete the following example -\n" + _p("Input: " + instance.input.strip()) + "\n" + "Output: "


def no_instruction_input(instance: Instance) -> str:
    """The no-instruction baseline's source: the instance part alone (same layout as the student's backbone input)."""
    return build_task_input(instance)


def token_counter(tokenizer) -> TokenCounter:
    return lambda text: len(tokenizer(text)["input_ids"])


def _fit_examples(definition: str, examples: Sequence[Example], num_pos: int, tail: str,
                  count: Optional[TokenCounter], max_len: int) -> list[str]:
    """Add examples in order while `definition + " ".join(added) + example_i + tail` fits (Tk-Instruct's check)."""
    added: list[str] = []
    for i, ex in enumerate(examples[:num_pos]):
        block = example_text(i + 1, ex)
        if count is not None and count(definition + " ".join(added) + block + tail) > max_len:
            break
        added.append(block)
    return added


def build_source(task: Task, instance: Instance, num_pos: int = 2, add_definition: bool = True,
                 tokenizer=None, max_source_length: int = 1024) -> str:
    """The full Tk-Instruct source string; cut to `max_source_length` tokens (and decoded) when still too long."""
    definition = definition_text(task, add_definition)
    task_input = build_task_input(instance)
    count = token_counter(tokenizer) if tokenizer is not None else None
    examples = _fit_examples(definition, task.positive_examples, num_pos, task_input, count, max_source_length)
    source = definition + "".join(examples) + task_input
    if tokenizer is not None:
        ids = tokenizer(source)["input_ids"]
        if len(ids) > max_source_length:
            source = tokenizer.decode(ids[:max_source_length], skip_special_tokens=True)
    return source


def build_instruction(task: Task, num_pos: int = 2, add_definition: bool = True, tokenizer=None,
                      max_length: int = 1024) -> str:
    """TAGI's instruction: definition + the positive examples that fit `max_length` tokens, once per task."""
    definition = definition_text(task, add_definition)
    count = token_counter(tokenizer) if tokenizer is not None else None
    examples = _fit_examples(definition, task.positive_examples, num_pos, "", count, max_length)
    return definition + "".join(examples)
