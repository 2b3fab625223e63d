"""Which backbone a run uses: `backbone.name_or_path`, or for `auto` the run's own tiny backbone, identified by the
hash of the recipe that builds it (the `backbone` stage builds it; every other stage only resolves it here).

'auto' resolves to the committed asset (tagi_ds/assets/tiny_backbone) when it holds this recipe's hash, else to
<run_dir>/backbone. The recipe's constants live here because its hash must be computable without the stage: a run
whose backbone recipe changed must see a new backbone identity in every later stage.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from ..data.synthetic import NUMBER_WORDS, OPS, WORDS
from ..errors import ConfigError
from ..io_utils import sha256_json
from .paths import RunPaths

ASSET_DIR = Path(__file__).resolve().parents[1] / "assets" / "tiny_backbone"
RECIPE_FILE = "recipe.json"
RECIPE_VERSION = 3  # bump when the copy data, the init or the tokenizer corpus changes meaning (3: init, demo loss)
INIT_STD = 0.08  # initializer_range of the tiny LLaMA (transformers' 0.02 stalls copying at hidden 128; see the stage)
LM_SEQ_LEN = 256  # tokens per LM-pretraining window (sni mode), bos included
LM_HELDOUT_FRACTION = 0.02  # of the SNI train tasks, held out of LM pretraining to measure its loss
TOKENIZER_INSTANCES = 20  # instances per train task in the tokenizer corpus (all 68k: same pieces, minutes longer)


def _wording_fingerprint() -> str:
    """The tokenizer corpus is the default suite's wording: fixed words and phrasings, whatever the run's seed."""
    return sha256_json({"words": WORDS, "numbers": NUMBER_WORDS, "phrasings": {n: o.phrasings for n, o in OPS.items()}})


def recipe(cfg) -> dict:
    """Everything that decides the tiny backbone's weights; its hash names the artifact."""
    b = cfg.backbone
    spec = {"version": RECIPE_VERSION, "seed": cfg.seed, "wording": _wording_fingerprint(),
            "hidden": b.tiny_hidden, "layers": b.tiny_layers, "heads": b.tiny_heads, "ffn": b.tiny_ffn,
            "vocab": b.tiny_vocab, "copy_seconds": b.copy_pretrain_seconds, "copy_lr": b.copy_pretrain_lr,
            "copy_batch": b.copy_pretrain_batch, "init_std": INIT_STD, "demo_loss": True}
    if b.pretrain_corpus != "suite":  # only then: the suite recipe (and the committed asset's hash) stays as it was
        spec.pop("wording"), spec.pop("demo_loss")
        spec.update({"pretrain_corpus": b.pretrain_corpus, "sni_train": _sni_train_fingerprint(cfg),
                     "max_tasks": cfg.data.max_tasks, "seq_len": LM_SEQ_LEN, "heldout": LM_HELDOUT_FRACTION,
                     "tokenizer_instances": TOKENIZER_INSTANCES, "init_std": sni_init_std(b.tiny_hidden)})
    return {"spec": spec, "hash": sha256_json(spec)}


def sni_init_std(hidden: int) -> float:
    """1/sqrt(hidden): projections keep their input's scale (INIT_STD's reasoning, at any width)."""
    return round(hidden ** -0.5, 4)


def sni_dirs(cfg) -> tuple[Path, Optional[Path]]:
    from ..data.sni import find_split_dir

    if not cfg.data.sni_dir:
        raise ConfigError("backbone.pretrain_corpus=sni needs data.sni_dir (a folder with tasks/*.json and splits/)")
    return Path(cfg.data.sni_dir), find_split_dir(cfg.data.sni_dir, cfg.data.sni_split_dir)


def _sni_train_fingerprint(cfg) -> str:
    """The train split's task list (cheap: recipe() runs in every stage that resolves the backbone path)."""
    from ..data.sni import tasks_dir_of

    sni_dir, sdir = sni_dirs(cfg)
    split = sdir / "train_tasks.txt" if sdir is not None else None
    if split is not None and split.is_file():
        return sha256_json({"train_tasks": split.read_text(encoding="utf-8")})
    return sha256_json({"files": sorted(p.name for p in tasks_dir_of(sni_dir).glob("*.json"))})


def recipe_hash_at(path: Path) -> Optional[str]:
    """The recipe hash recorded in a built backbone folder (None when there is none)."""
    try:
        return json.loads((Path(path) / RECIPE_FILE).read_text())["recipe"]["hash"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def resolve_backbone_path(cfg) -> Path:
    """backbone.name_or_path, where 'auto' = the committed asset when it holds this recipe, else <run_dir>/backbone."""
    if cfg.backbone.name_or_path != "auto":
        return Path(cfg.backbone.name_or_path)
    if recipe_hash_at(ASSET_DIR) == recipe(cfg)["hash"]:
        return ASSET_DIR
    return RunPaths.of(cfg).backbone
