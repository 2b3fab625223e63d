"""Tiny tokenizer + backbone folders, hypernetwork exports and SNI task files for the adapters tests (a module)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from student_helpers import randomize_b_heads
from tagi_ds.modeling.tagi import TagiStudent, build_student
from tagi_ds.modeling.tiny import build_from_config, tiny_llama_config, tiny_t5_config

KINDS = ["q", "v"]
R, ALPHA = 4, 8.0


def tiny_backbone(arch: str, d_model: int = 32, vocab_size: int = 256, **special):
    if arch == "t5":
        cfg = tiny_t5_config(vocab_size=vocab_size, d_model=d_model, num_layers=2, num_heads=4, d_ff=64, **special)
    else:
        cfg = tiny_llama_config(vocab_size=vocab_size, hidden_size=d_model, num_layers=2, num_heads=4, num_kv_heads=2,
                                intermediate_size=64, **special)
    # A wider init than HF's default, so a random model's greedy output depends on its input (HF's init gives
    # near-uniform logits: every row predicts the same token and prediction comparisons would prove nothing).
    cfg.initializer_range, cfg.initializer_factor = 0.3, 8.0
    return build_from_config(cfg, seed=0, frozen=True)


def make_student(backbone, arch: str, fusion: bool) -> TagiStudent:
    torch.manual_seed(1)
    student = build_student(backbone, arch, KINDS, r=R, alpha=ALPHA, hidden=32, trunk_layers=2, embed_dim=8,
                            fusion=fusion, backend="reference")
    randomize_b_heads(student)
    return student.eval()


def build_backbone_dir(out: Path, arch: str, d_model: int = 32) -> Path:
    """A small sentencepiece tokenizer + a seeded random tiny model, saved together (what from_pretrained reads)."""
    from tagi_ds.data.synthetic import all_wording, build_suite
    from tagi_ds.data.tokenizer import train_sentencepiece_tokenizer

    texts = all_wording(build_suite(instances_per_task=10, held_back_per_task=2))
    tok = train_sentencepiece_tokenizer(texts, out, vocab_size=400, kind=arch)
    special = (dict(pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
               if arch == "llama" else
               dict(pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                    decoder_start_token_id=tok.pad_token_id))
    model = tiny_backbone(arch, d_model=d_model, vocab_size=len(tok), **special)
    model.save_pretrained(out)
    return out


def build_export(out: Path, backbone_dir: Path, arch: str, fusion: bool = True) -> Path:
    """A hypernetwork export (train/export.py format) of a student with random non-zero heads."""
    from tagi_ds.modeling.backbone import load_backbone
    from tagi_ds.train.export import export_config, export_hypernetwork

    backbone, _ = load_backbone(str(backbone_dir), arch)
    student = make_student(backbone, arch, fusion)
    cfg = export_config(student, backbone_id=str(backbone_dir), target_kinds=KINDS, r=R, alpha=ALPHA,
                        dtype="float32", tokenizer=str(backbone_dir), stage="finetune", variant="tagi")
    export_hypernetwork(out, student, cfg)
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
