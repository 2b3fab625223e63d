"""Stage `backbone`: a tiny budget still yields a loadable model + tokenizer whose copy loss falls; skips when done."""
from __future__ import annotations

import json
import os

import pytest

from tagi_ds.config import load_config
from tagi_ds.run import backbone_recipe as R
from tagi_ds.train import backbone_stage as bs

TINY = ["backbone.tiny_hidden=32", "backbone.tiny_layers=2", "backbone.tiny_heads=2", "backbone.tiny_ffn=64",
        "backbone.tiny_vocab=500", "backbone.copy_pretrain_seconds=1000000.0", "backbone.copy_pretrain_lr=0.005",
        "backbone.copy_pretrain_batch=16", "device=cpu"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    cfg = load_config(None, TINY + [f"runs_dir={runs}"])
    path = bs.run(cfg, max_steps=40, progress=False)
    return cfg, path


def test_copy_data_answers_are_the_prompt_input():
    data = bs.CopyData(0)
    for full in (True, False):
        prompt, answer = data.pair(full)
        assert prompt.endswith(f"Input: {answer}.\nOutput: ")
        assert ("Definition:" in prompt) == full and ("Positive Example 2" in prompt) == full


def test_copy_encoding_labels_every_copy_and_only_copies():
    """Full-format identity prompts also carry the loss on both demonstration outputs; input-only ones on the answer."""
    from transformers import AutoTokenizer

    from tagi_ds.train.backbone_stage import IGNORE, encode_pair

    if not (R.ASSET_DIR / "tokenizer.json").exists():
        pytest.skip("no committed tiny backbone (its tokenizer) in this checkout")
    tok = AutoTokenizer.from_pretrained(R.ASSET_DIR)
    data = bs.CopyData(3)
    prompt, answer = data.pair(True)
    demos = [line.strip()[len("Output: "):-1] for line in prompt.splitlines() if line.startswith(" Output: ")]
    assert len(demos) == 2
    enc = bs.encode_copy(tok, prompt, answer)
    plain = encode_pair(tok, prompt, answer)
    assert enc.input_ids == plain.input_ids
    labelled = [t for t in enc.labels if t != IGNORE]
    expected = tok(" ".join(demos + [answer]), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert labelled == expected
    assert [l for l, p in zip(enc.labels, plain.labels) if p != IGNORE] == [p for p in plain.labels if p != IGNORE]
    prompt, answer = data.pair(False)
    assert bs.encode_copy(tok, prompt, answer) == encode_pair(tok, prompt, answer)


def test_stage_publishes_a_loadable_backbone_whose_copy_loss_falls(built):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg, path = built
    assert path == cfg.run_dir / "backbone"
    record = json.loads((path / "recipe.json").read_text())
    assert record["recipe"]["hash"] == R.recipe(cfg)["hash"] and record["copy_steps"] == 40
    assert record["loss_last10"] < record["loss_first10"] - 0.5
    assert 0.0 <= record["copy_em"] <= 100.0
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 2
    assert model.config.tie_word_embeddings and model.config.vocab_size == len(tok)
    assert model.config.initializer_range == bs.INIT_STD == record["init_std"]
    assert (path / "model.safetensors").exists()
    assert list((cfg.run_dir / "tb" / "backbone").glob("events.out.tfevents*"))


def test_rerun_with_the_same_recipe_skips_and_a_new_recipe_rebuilds(built, capsys):
    cfg, path = built
    before = os.stat(path / "model.safetensors").st_mtime_ns
    assert bs.run(cfg, max_steps=40, progress=False) == path
    assert "skipping" in capsys.readouterr().out
    assert os.stat(path / "model.safetensors").st_mtime_ns == before
    assert R.resolve_backbone_path(cfg) == path  # the asset holds another recipe


def test_explicit_backbone_path_is_used_as_given(tmp_path):
    cfg = load_config(None, [f"backbone.name_or_path={tmp_path}/mine"])
    assert R.resolve_backbone_path(cfg) == tmp_path / "mine"


def test_committed_asset_matches_the_tiny_recipe_and_copies():
    asset = R.ASSET_DIR
    if not (asset / "recipe.json").exists():
        pytest.skip("no committed tiny backbone in this checkout")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = load_config(os.path.join(os.path.dirname(__file__), "..", "..", "configs", "tiny.yaml"))
    assert R.resolve_backbone_path(cfg) == asset
    record = json.loads((asset / "recipe.json").read_text())
    assert record["copy_em"] >= 90  # 97.7% after 741 steps / 300 s (init 0.02 + answer-only loss: 36.7% after 550)
    total = sum(f.stat().st_size for f in asset.iterdir())
    assert total < 8 * 2**20
    model, tok = AutoModelForCausalLM.from_pretrained(asset), AutoTokenizer.from_pretrained(asset)
    assert bs.copy_exact_match(model, tok, seed=1, n=32) >= 80  # a random model scores 0
