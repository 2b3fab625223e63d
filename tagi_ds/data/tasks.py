"""The one in-memory task format every source produces and every stage consumes.

`Instance.label` is the training target, drawn once per instance from `references` with a seed (`draw_labels`),
so a teacher's cached logits and the student's labels always refer to the same string. Evaluation keeps all
`references`.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from typing import Optional


@dataclass(frozen=True)
class Example:
    """A demonstration shown inside an instruction (SNI positive/negative example)."""

    input: str
    output: str
    explanation: str = ""


@dataclass(frozen=True)
class Instance:
    id: str
    input: str
    references: tuple[str, ...]
    label: str
    answer_choices: Optional[tuple[str, ...]] = None


@dataclass(frozen=True)
class Task:
    name: str
    definition: str
    positive_examples: tuple[Example, ...]
    negative_examples: tuple[Example, ...]
    instances: tuple[Instance, ...]
    categories: tuple[str, ...] = ()
    # Free-form provenance: source file, split kind (seen / unseen_paraphrase / unseen_composition), …
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    def with_instances(self, instances) -> "Task":
        return replace(self, instances=tuple(instances))


def draw_label(references: tuple[str, ...] | list[str], seed: int, instance_id: str) -> str:
    """Pick one reference deterministically from (seed, instance id): independent of load order."""
    if not references:
        raise ValueError(f"instance {instance_id!r} has no references to draw a label from")
    rng = random.Random(f"{seed}:{instance_id}")
    return references[rng.randrange(len(references))]


def cap_instances(instances: list[Instance], cap: Optional[int], seed: int, task_name: str) -> list[Instance]:
    """Keep at most `cap` instances, chosen with a seed, in their original order."""
    if cap is None or len(instances) <= cap:
        return list(instances)
    rng = random.Random(f"{seed}:{task_name}")
    keep = sorted(rng.sample(range(len(instances)), cap))
    return [instances[i] for i in keep]
