"""Stage `backbone` in mode pretrain_corpus=sni: tokenizer + causal-LM pretraining on the SNI train tasks' text
(a tiny model, a few seconds); the suite recipe (the committed asset's hash) is untouched."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tagi_ds.config import load_config
from tagi_ds.errors import ConfigError
from tagi_ds.run import backbone_recipe as R
from tagi_ds.train import backbone_stage as bs

REPO = Path(__file__).resolve().parents[2]
STEPS = 20
TINY_SNI = ["backbone.pretrain_corpus=sni", "backbone.tiny_hidden=64", "backbone.tiny_layers=2",
            "backbone.tiny_heads=2", "backbone.tiny_ffn=128", "backbone.tiny_vocab=400",
            "backbone.copy_pretrain_seconds=1000000.0", "backbone.copy_pretrain_lr=0.005",
            "backbone.copy_pretrain_batch=4", "data.source=sni", "data.max_tasks=8", "device=cpu"]


@pytest.fixture(scope="module")
def built(sni_dir, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    cfg = load_config(None, TINY_SNI + [f"data.sni_dir={sni_dir}", f"runs_dir={runs}"])
    path = bs.run(cfg, max_steps=STEPS, progress=False)
    return cfg, path, json.loads((path / "recipe.json").read_text())


def test_stage_publishes_model_tokenizer_and_a_record_whose_lm_loss_fell(built):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg, path, rec = built
    assert path == cfg.run_dir / "backbone" == R.resolve_backbone_path(cfg)
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    assert rec["recipe"]["hash"] == R.recipe(cfg)["hash"] and rec["corpus"] == "sni"
    assert rec["steps"] == STEPS and rec["docs"] == 8 and rec["seq_len"] == R.LM_SEQ_LEN
    assert 0 < rec["tokens_seen"] <= STEPS * 4 * R.LM_SEQ_LEN
    assert rec["heldout_lm_loss_after"] < rec["heldout_lm_loss_before"] - 0.5
    assert rec["init_std"] == R.sni_init_std(64) == 0.125
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert model.config.hidden_size == 64 and model.config.vocab_size == len(tok) == rec["vocab_size"]
    assert model.config.initializer_range == rec["init_std"]


def test_heldout_documents_are_train_tasks_and_never_trained_on(built, sni_dir):
    from tagi_ds.data.sni import load_sni

    cfg, _, rec = built
    train = [t.name for t in load_sni(sni_dir, "train", None, max_instances=1, max_tasks=8)]
    test = {t.name for t in load_sni(sni_dir, "test", None, max_instances=1)}
    assert rec["heldout_docs"] and set(rec["heldout_docs"]) <= set(train) and not set(rec["heldout_docs"]) & test
    held = bs.split_heldout(8, cfg.seed)
    assert sorted(train[i] for i in held) == rec["heldout_docs"]


def test_tokenizer_round_trips_sni_text(built, sni_dir):
    from transformers import AutoTokenizer

    from tagi_ds.data.sni import load_sni

    _, path, _ = built
    tok = AutoTokenizer.from_pretrained(path)
    task = load_sni(sni_dir, "test", None, max_instances=2, cap="first")[0]  # unseen text: byte fallback at worst
    for text in (task.definition, task.instances[0].input, "line one\n\nline  two\tend"):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
        assert tok.unk_token_id not in ids


def test_documents_are_plain_text_and_windows_fit(built, sni_dir):
    from transformers import AutoTokenizer

    from tagi_ds.data.sni import load_sni

    _, path, _ = built
    task = load_sni(sni_dir, "train", None, max_instances=3, max_tasks=1)[0]
    doc = bs.sni_task_document(task)
    assert doc.startswith(task.definition.strip())
    assert f"{task.instances[0].input.strip()}\n{task.instances[0].label.strip()}" in doc
    for marker in ("Definition:", "Positive Example", "Output:"):
        assert marker not in doc.replace(task.definition, "")  # no Tk-Instruct scaffolding around the pairs
    tok = AutoTokenizer.from_pretrained(path)
    windows = bs.lm_windows(tok, [doc], seq_len=64)
    assert len(windows) > 1 and all(w[0] == tok.bos_token_id and 16 <= len(w) <= 64 for w in windows)
    body = tok(doc, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    joined = [t for w in windows for t in w[1:]]  # the document in order (a tail under 16 tokens may be dropped)
    assert joined == body[:len(joined)] and len(body) - len(joined) < 16


def test_recipe_hashes_differ_and_the_tiny_config_still_resolves_the_committed_asset(built):
    cfg, _, _ = built
    suite = load_config(None, [o for o in TINY_SNI if not o.startswith("backbone.pretrain_corpus")])
    assert R.recipe(suite)["hash"] != R.recipe(cfg)["hash"]
    assert "pretrain_corpus" not in R.recipe(suite)["spec"] and "wording" in R.recipe(suite)["spec"]
    tiny = load_config(str(REPO / "configs" / "tiny.yaml"), [])
    assert tiny.backbone.pretrain_corpus == "suite"
    if not (R.ASSET_DIR / "recipe.json").is_file():
        pytest.skip("no committed tiny backbone in this checkout")
    asset_hash = json.loads((R.ASSET_DIR / "recipe.json").read_text())["recipe"]["hash"]
    assert R.recipe(tiny)["hash"] == asset_hash
    assert R.resolve_backbone_path(tiny) == R.ASSET_DIR


def test_rerun_skips(built, capsys):
    cfg, path, _ = built
    before = os.stat(path / "model.safetensors").st_mtime_ns
    assert bs.run(cfg, max_steps=STEPS, progress=False) == path
    assert "skipping" in capsys.readouterr().out
    assert os.stat(path / "model.safetensors").st_mtime_ns == before


def test_sni_corpus_without_sni_dir_is_a_config_error(tmp_path):
    cfg = load_config(None, ["backbone.pretrain_corpus=sni", f"runs_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="data.sni_dir"):
        bs.run(cfg, max_steps=1, progress=False)


def test_the_pipeline_rebuilds_the_sni_backbone_when_its_data_changes(sni_dir, tmp_path):
    from tagi_ds.train.backbone_stage import identity as stage_key

    cfg = load_config(None, TINY_SNI + [f"data.sni_dir={sni_dir}", f"runs_dir={tmp_path}"])
    fewer = load_config(None, TINY_SNI + [f"data.sni_dir={sni_dir}", f"runs_dir={tmp_path}", "data.max_tasks=4"])
    assert stage_key(cfg) != stage_key(fewer)  # the SNI text it reads differs
    suite = load_config(REPO / "configs" / "tiny.yaml")
    other_data = load_config(REPO / "configs" / "tiny.yaml", ["data.max_tasks=4"])
    assert stage_key(suite) == stage_key(other_data)  # the suite backbone ignores data
