"""Tiny tokenizer + backbone folders, hypernetwork exports and SNI task files for the adapters tests (a module)."""
from __future__ import annotations

import json
from pathlib import Path


from tagi_ds.modeling.tagi import TagiStudent
from tests import tiny

KINDS = ["q", "v"]
R, ALPHA = 4, 8.0


def tiny_backbone(arch: str, d_model: int = 32, vocab_size: int = 256, **special):
    """tests.tiny's backbone with the wide init: a random model's greedy output then depends on its input."""
    return tiny.tiny_backbone(arch, d_model=d_model, vocab_size=vocab_size, wide_init=True, **special)


def make_student(backbone, arch: str, fusion: bool) -> TagiStudent:
    """A student on `backbone` with random non-zero B heads (its adapters change the backbone)."""
    student = tiny.make_student(arch, backbone, fusion=fusion, kinds=KINDS, r=R, alpha=ALPHA, backend="reference")
    tiny.randomize_b_heads(student)
    return student.eval()


def build_backbone_dir(out: Path, arch: str, d_model: int = 32) -> Path:
    """A small sentencepiece tokenizer + a seeded random tiny model with the wide init, saved together."""
    return tiny.backbone_dir(out, arch, hidden=d_model, heads=4, kv_heads=2, ffn=64, vocab=400, suite_size=(10, 2),
                             wide_init=True)


def build_export(out: Path, backbone_dir: Path, arch: str, fusion: bool = True) -> Path:
    """A hypernetwork export (run/export_io.py format) of a student with random non-zero heads."""
    from tagi_ds.modeling.backbone import load_backbone
    from tagi_ds.run.export_io import export_config
    from tagi_ds.train.checkpoint import export_trainable

    backbone, _ = load_backbone(str(backbone_dir), arch)
    student = make_student(backbone, arch, fusion)
    cfg = export_config(student, backbone_id=str(backbone_dir), target_kinds=KINDS, r=R, alpha=ALPHA,
                        dtype="float32", tokenizer=str(backbone_dir), stage="finetune", variant="tagi")
    export_trainable(out, student, cfg)
    return out


def write_task_file(path: Path, name_seed: int = 0, n_instances: int = 5) -> Path:
    """A native SNI task file: Definition, two positive examples, a few instances."""
    words = ["red", "blue", "green", "apple", "river", "stone", "cloud", "seven", "three", "house"]
    defs = ["Copy the input words in order.", "Write the last word of the input."]
    data = {
        "Definition": [defs[name_seed % 2]],
        "Positive Examples": [{"input": "red apple", "output": "red apple" if name_seed % 2 == 0 else "apple",
                               "explanation": ""},
                              {"input": "blue stone cloud", "output": "blue stone cloud" if name_seed % 2 == 0
                               else "cloud", "explanation": ""}],
        "Negative Examples": [],
        "Instances": [{"id": f"t{name_seed}-{i}", "input": " ".join(words[(i + k) % 10] for k in range(2 + i % 3)),
                       "output": ["x"]} for i in range(n_instances)],
        "Categories": ["test"],
    }
    path.write_text(json.dumps(data))
    return path
