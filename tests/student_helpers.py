"""Backbone and student helpers shared across test folders (importable from every test folder: pytest puts tests/
on sys.path for the root conftest)."""
from __future__ import annotations

from pathlib import Path

import torch

from tagi_ds.modeling.tagi import TagiStudent


def randomize_b_heads(student: TagiStudent, std: float = 0.05, seed: int = 2) -> None:
    """Non-zero B half of every hypernetwork head (weight rows and bias), so generated adapters change the backbone
    (ΔW ≠ 0); a fresh head's B half is exactly zero."""
    g = torch.Generator().manual_seed(seed)
    hn = student.hypernet
    with torch.no_grad():
        for i, mt in enumerate(hn.types):
            n_a = hn.r * hn.shapes[mt][1]
            for p in (hn.head_weight[str(i)], hn.head_bias[str(i)]):
                p[n_a:] = torch.randn(p[n_a:].shape, generator=g) * std


def suite_backbone_dir(out: Path, arch: str = "llama", *, hidden: int = 64, ffn: int = 128, vocab: int = 600,
                       suite_size: tuple[int, int] = (20, 5)) -> Path:
    """A sentencepiece tokenizer trained on the synthetic suite's wording (`suite_size` = instances per task,
    held back) + a seeded random 2-layer model of `arch`, saved together (what `from_pretrained` and the stages read)."""
    from tagi_ds.data.synthetic import all_wording, build_suite
    from tagi_ds.data.tokenizer import train_sentencepiece_tokenizer
    from tagi_ds.modeling.tiny import build_from_config, tiny_llama_config, tiny_t5_config

    texts = all_wording(build_suite(instances_per_task=suite_size[0], held_back_per_task=suite_size[1]))
    tok = train_sentencepiece_tokenizer(texts, out, vocab_size=vocab, kind="llama" if arch == "llama" else "t5")
    if arch == "llama":
        cfg = tiny_llama_config(vocab_size=len(tok), hidden_size=hidden, num_layers=2, num_heads=4,
                                intermediate_size=ffn, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                eos_token_id=tok.eos_token_id)
    else:
        cfg = tiny_t5_config(vocab_size=len(tok), d_model=hidden, num_layers=2, num_heads=4, d_ff=ffn,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                             decoder_start_token_id=tok.pad_token_id)
    model = build_from_config(cfg, seed=0)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    return out
