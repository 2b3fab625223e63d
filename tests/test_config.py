"""Typed config: YAML + dotted overrides; every error names the file, the key and what was expected."""
from __future__ import annotations

from dataclasses import dataclass

import pytest

from tagi_ds.config import RunConfig, describe, dump_yaml, f, load_config, load_yaml
from tagi_ds.errors import ConfigError


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def test_yaml_and_overrides_are_typed(tmp_path):
    p = write(tmp_path, "run.yaml", "name: demo\nfinetune:\n  steps: 7\n  lr: 1\nbackbone:\n  target_modules: [q, k]\n")
    cfg = load_config(p, ["finetune.lambda_kl=0", "data.max_tasks=null", "hypernet.fusion=false"])
    assert isinstance(cfg, RunConfig)
    assert cfg.name == "demo" and cfg.finetune.steps == 7
    assert cfg.finetune.lr == 1.0 and isinstance(cfg.finetune.lr, float)  # int widens to float
    assert cfg.finetune.lambda_kl == 0.0 and cfg.data.max_tasks is None and cfg.hypernet.fusion is False
    assert cfg.backbone.target_modules == ["q", "k"]
    # untouched sections keep their defaults
    assert cfg.pretrain.steps == 500 and cfg.lora.r == 32
    assert load_config(None, ["name=x"]).run_dir.name == "x"


@pytest.mark.parametrize("key", ["pretrain.lambda_kl", "pretrain.temperature", "pretrain.tasks_per_batch",
                                 "finetune.micro_batch_size"])
def test_each_stage_takes_only_its_own_keys(key):
    """Stage 1 has no distillation terms and stage 2 no document batches: such a key was once accepted and silently
    ignored; now it is an unknown key."""
    with pytest.raises(ConfigError, match=f"unknown key '{key}'"):
        load_config(None, [f"{key}=1"])


def test_a_moved_key_says_where_it_lives_now(tmp_path):
    p = write(tmp_path, "old.yaml", "eval:\n  baseline_steps: 3\n")
    with pytest.raises(ConfigError, match=r"old\.yaml: key 'eval\.baseline_steps' moved to 'baselines\.steps'"):
        load_config(p)


def test_unknown_key_names_file_and_key(tmp_path):
    p = write(tmp_path, "bad.yaml", "finetune:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*unknown key 'finetune\.stepz'.*steps"):
        load_config(p)


@pytest.mark.parametrize("text,key,expected", [
    ("finetune:\n  steps: many\n", "finetune.steps", "must be int"),
    ("hypernet:\n  fusion: 'yes'\n", "hypernet.fusion", "must be bool"),
    ("data:\n  source: wikipedia\n", "data.source", "one of 'synthetic', 'sni', 'p3'"),
    ("lora: 3\n", "lora", "must be LoraConfig"),
])
def test_wrong_type_names_key_and_expectation(tmp_path, text, key, expected):
    p = write(tmp_path, "t.yaml", text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(p) in str(e.value) and f"'{key}'" in str(e.value) and expected in str(e.value)


def test_malformed_yaml_names_line(tmp_path):
    p = write(tmp_path, "broken.yaml", "name: a\nfinetune:\n  steps: [1, 2\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: line \d+, column \d+ malformed YAML"):
        load_yaml(p)


def test_missing_file_directory_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(write(tmp_path, "list.yaml", "- 1\n- 2\n"))
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(bad)


def test_override_errors():
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(None, ["finetune.steps"])
    with pytest.raises(ConfigError, match="'finetune.steps' must be int"):
        load_config(None, ["finetune.steps=1.5"])


def test_exponent_floats_without_a_dot_are_floats(tmp_path):
    # PyYAML (YAML 1.1) reads 2e-4 as the string '2e-4'; a float field takes it, a non-number is still refused
    path = write(tmp_path, "lr.yaml", "finetune:\n  lr: 2e-4\n")
    cfg = load_config(path, ["teacher.lr=5E-3", "pretrain.lr=-1e+2"])
    assert (cfg.finetune.lr, cfg.teacher.lr, cfg.pretrain.lr) == (2e-4, 5e-3, -100.0)
    with pytest.raises(ConfigError, match="'finetune.lr' must be float, got '2e'"):
        load_config(None, ["finetune.lr=2e"])
    with pytest.raises(ConfigError, match="'finetune.steps' must be int, got '1e3'"):
        load_config(None, ["finetune.steps=1e3"])  # only float fields convert


def test_base_chain_merges_and_child_wins(tmp_path):
    write(tmp_path, "parent.yaml", "name: parent\nfinetune:\n  steps: 5\n  lr: 0.1\n")
    child = write(tmp_path, "child.yaml", "base: parent.yaml\nfinetune:\n  steps: 9\n")
    cfg = load_config(child)
    assert (cfg.name, cfg.finetune.steps, cfg.finetune.lr) == ("parent", 9, 0.1)
    loop = write(tmp_path, "loop.yaml", "base: loop.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_config(loop)


def test_required_field_missing_is_named(tmp_path):
    @dataclass
    class Needs:
        path: str = f(help="where the data lives")
        n: int = f(1, "count")

    with pytest.raises(ConfigError, match="required key 'path' is missing"):
        load_config(write(tmp_path, "n.yaml", "n: 2\n"), cls=Needs)


def test_every_field_has_help_and_dump_round_trips(tmp_path):
    rows = describe()
    assert rows and all(help_text for _, _, help_text in rows), [k for k, _, h in rows if not h]
    p = write(tmp_path, "dump.yaml", dump_yaml(load_config(None, ["finetune.steps=3"])))
    assert load_config(p).finetune.steps == 3
