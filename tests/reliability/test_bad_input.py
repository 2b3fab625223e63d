"""Bad input through the real CLI: one paragraph naming the file/key/line and what was expected, exit code 2, no
traceback (unless --debug), and nothing under the watched folders written or overwritten.

Most cases call `tagi_ds.cli.main` in-process (a subprocess per case would cost ~5 s of imports on 2 shared cores);
`test_malformed_yaml_real_subprocess` checks the same contract on a real `python -m tagi_ds.cli` process.
Covered elsewhere, not repeated here: config key/type errors on `load_config` (tests/test_config.py), SNI file
validation on the loader (tests/data/test_sni.py), inputs.jsonl line errors (tests/adapters/test_cli_tools.py).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.reliability import rel_helpers
from tests.reliability.rel_helpers import snapshot
from tagi_ds import cli

REPO = Path(__file__).resolve().parents[2]
PY = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv" / "bin" / "python").exists() else sys.executable


def refused(capsys, argv: list[str], *watch: Path, match: str | list[str]) -> str:
    """rel_helpers.refused with "nothing written" by file set, sizes and mtimes (a rewrite with the same bytes
    shows)."""
    return rel_helpers.refused(capsys, argv, *watch, match=match, fingerprint=snapshot)


def sni_dir(root: Path, files: dict[str, bytes | str | dict]) -> Path:
    """An SNI folder (tasks/ + splits/) whose train and test splits list `files`' tasks."""
    (root / "tasks").mkdir(parents=True)
    (root / "splits").mkdir()
    for name, body in files.items():
        data = json.dumps(body) if isinstance(body, dict) else body
        p = root / "tasks" / f"{name}.json"
        p.write_bytes(data if isinstance(data, bytes) else data.encode())
    (root / "splits" / "train_tasks.txt").write_text("\n".join(files) + "\n")
    (root / "splits" / "test_tasks.txt").write_text("\n".join(files) + "\n")
    return root


GOOD_TASK = {"Definition": ["Copy the input."], "Positive Examples": [{"input": "a", "output": "a"}],
             "Instances": [{"id": "t-1", "input": "b", "output": ["b"]}]}


@pytest.fixture()
def run_copy(rel_run, tmp_path):
    """A private copy of the session run (same files), so a test may damage it; returns (RelRun, overrides)."""
    runs = tmp_path / "runs"
    shutil.copytree(rel_run.run_dir.parent, runs)
    return rel_run, [f"runs_dir={runs}"], runs / "r"


# ------------------------------------------------------------------------------------------------ config
def test_malformed_yaml_real_subprocess(rel_run, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: 0\ndata: {source: synthetic\nteacher: [1,\n")
    before = snapshot(rel_run.run_dir)
    env = dict(os.environ, TAGI_DEBUG="0")
    r = subprocess.run([PY, "-m", "tagi_ds.cli", "teacher", "--config", str(bad)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert f"{bad}: line 3, column 8 malformed YAML" in r.stderr, r.stderr
    assert snapshot(rel_run.run_dir) == before
    print(f"\n[teacher] rc=2 untouched=yes :: {r.stderr.strip()}")
    d = subprocess.run([PY, "-m", "tagi_ds.cli", "teacher", "--debug", "--config", str(bad)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    assert d.returncode != 0 and "Traceback" in d.stderr and "ConfigError" in d.stderr  # --debug shows it


def test_unknown_key_in_yaml_and_override(rel_run, capsys, tmp_path):
    y = tmp_path / "typo.yaml"
    y.write_text(rel_run.yaml.read_text().replace("teacher: {steps: 2", "teacher: {stpes: 2"))
    refused(capsys, ["teacher", "--config", str(y), *rel_run.sets], rel_run.run_dir,
            match=[str(y), "unknown key 'teacher.stpes'; expected one of:", "steps"])
    refused(capsys, ["finetune", *rel_run.args("finetune.lamda_kl=0")], rel_run.run_dir,
            match="unknown key 'finetune.lamda_kl'")


def test_mistyped_value(rel_run, capsys):
    refused(capsys, ["teacher", *rel_run.args("teacher.steps=many")], rel_run.run_dir,
            match="key 'teacher.steps' must be int, got 'many' (str)")
    refused(capsys, ["finetune", *rel_run.args("data.instruction_overflow=drop")], rel_run.run_dir,
            match="key 'data.instruction_overflow' must be one of 'truncate', 'error', got 'drop'")


def test_non_utf8_config(rel_run, capsys, tmp_path):
    y = tmp_path / "latin1.yaml"
    y.write_bytes("name: caf\xe9\n".encode("latin-1"))
    refused(capsys, ["teacher", "--config", str(y), *rel_run.sets], rel_run.run_dir,
            match=[str(y), "not UTF-8 text"])


# ------------------------------------------------------------------------------------------------ data
def test_missing_sni_dir(rel_run, capsys, tmp_path):
    missing = tmp_path / "no_such_sni"
    refused(capsys, ["teacher", *rel_run.args("data.source=sni", f"data.sni_dir={missing}")], rel_run.run_dir,
            match=f"{missing}: SNI folder not found")


@pytest.mark.parametrize("case, body, match", [
    ("not_json", "{\"Definition\": [\"x\"],,}", "not valid JSON: Expecting property name enclosed in double "
                                               "quotes at line 1, column 22"),
    ("no_instances", {"Definition": ["x"]}, "required key 'Instances' is missing"),
    ("no_definition", {"Instances": [{"id": "1", "input": "a", "output": ["a"]}]}, "required key 'Definition'"),
    ("empty_task", {"Definition": ["x"], "Instances": []}, "key 'Instances' is empty; a task needs at least one"),
    ("bad_output", {"Definition": ["x"], "Instances": [{"id": "1", "input": "a", "output": "a"}]},
     "key 'Instances[0].output' must be a list of strings, got str"),
    ("latin1", "{\"Definition\": [\"caf\xe9\"]}".encode("latin-1"), "not UTF-8 text (invalid continuation byte"),
])
def test_bad_task_file_in_the_run_data(rel_run, capsys, tmp_path, case, body, match):
    d = sni_dir(tmp_path / "sni", {"task1_good": GOOD_TASK, f"task2_{case}": body})
    bad = d / "tasks" / f"task2_{case}.json"
    refused(capsys, ["teacher", *rel_run.args("data.source=sni", f"data.sni_dir={d}")], rel_run.run_dir, d,
            match=[str(bad), match])


def test_bad_task_file_given_to_the_adapter_tools(rel_run, capsys, tmp_path):
    d = sni_dir(tmp_path / "sni", {"task2_empty": {"Definition": ["x"], "Instances": []}})
    out = tmp_path / "out"
    base = ["--hypernet", str(rel_run.export), "--no-cache"]
    refused(capsys, ["generate-adapter", *base, "--task-file", str(d / "tasks"), "--out", str(out)], tmp_path,
            match=[f"{d / 'tasks'}: is a directory; --task-file expects one SNI task JSON file"])
    refused(capsys, ["predict", *base, "--task-file", str(d / "tasks"), "--out", str(out) + ".jsonl"], tmp_path,
            match=f"{d / 'tasks'}: is a directory")
    refused(capsys, ["generate-adapter", *base, "--task-file", str(d / "tasks" / "task2_empty.json"),
                     "--out", str(out)], tmp_path, match="key 'Instances' is empty")
    inputs = tmp_path / "inputs.jsonl"
    inputs.write_bytes("{\"input\": \"caf\xe9\"}\n".encode("latin-1"))
    refused(capsys, ["predict", *base, "--instruction", "Copy.", "--inputs", str(inputs), "--out",
                     str(out) + ".jsonl"], tmp_path, match=[str(inputs), "not UTF-8 text"])
    assert not out.exists() and not Path(str(out) + ".jsonl").exists()


def test_array_index_out_of_range(rel_run, capsys):
    for stage in ("teacher", "cache-logits"):
        refused(capsys, [stage, *rel_run.args("array_index=7")], rel_run.run_dir,
                match="array_index=7 is out of range: valid indices are 0-1 (2 units, 1 per job); submit with --array=0-1")
    refused(capsys, ["teacher", *rel_run.args("array_index=two")], rel_run.run_dir,
            match="array_index must be an integer, got 'two'")


# ------------------------------------------------------------------------------------------ instruction length
def test_instruction_overflow_error_refuses_and_truncate_warns(rel_run, capsys, tmp_path):
    # the training path (collate.instruction_ids): the tiny run's instructions are ~36 tokens
    refused(capsys, ["finetune", *rel_run.args("variant=overflow", "data.instruction_overflow=error",
                                               "data.max_source_length=20")], rel_run.run_dir,
            match="task 'synth_first': instruction is 36 tokens, over max_instruction_length 20 "
                  "(data.instruction_overflow=error)")
    from transformers import AutoTokenizer

    from tagi_ds.data.collate import PromptSettings, instruction_ids
    from tagi_ds.data.registry import load_run_tasks_from_config

    tok = AutoTokenizer.from_pretrained(rel_run.backbone)
    task = load_run_tasks_from_config(rel_run.cfg())["train"][0]
    with pytest.warns(UserWarning, match="task 'synth_first': instruction is 36 tokens, cut to max_instruction"):
        assert len(instruction_ids(task, tok, PromptSettings(arch="llama", max_source_length=20))) == 20
    # the inference path (generate-adapter / predict --instruction-overflow)
    out = tmp_path / "adapter"
    text = "Copy the input words in reverse order, then add the word done. " * 3
    base = ["generate-adapter", "--hypernet", str(rel_run.export), "--no-cache", "--instruction", text,
            "--max-instruction-length", "8", "--out", str(out)]
    refused(capsys, base + ["--instruction-overflow", "error"], tmp_path, rel_run.export,
            match="over --max-instruction-length 8 (--instruction-overflow error)")
    assert not out.exists()
    with pytest.warns(UserWarning, match="over --max-instruction-length 8: cut to 8 tokens"):
        assert cli.main(base) == 0
    assert (out / "adapter_model.safetensors").is_file()


# ------------------------------------------------------------------------------------------ artifacts
def test_logit_cache_of_another_tokenizer_or_teacher(run_copy, capsys):
    rel, sets, run = run_copy
    argv = ["finetune", *rel.args(*sets, "variant=fresh")]
    manifest = run / "logit_cache" / "synth_first" / "manifest.json"
    m = json.loads(manifest.read_text())
    real = m["tokenizer_hash"]
    manifest.write_text(json.dumps({**m, "tokenizer_hash": "f" * 64}))  # a cache written with another tokenizer
    refused(capsys, argv, run, match=[str(manifest), "manifest field 'tokenizer_hash' is 'ffff",
                                      f"but this run expects '{real}'"])
    manifest.write_text(json.dumps(m))
    from safetensors.torch import load_file, save_file

    w = run / "teachers" / "synth_second" / "adapter_model.safetensors"  # the teacher was retrained since
    save_file({k: v * 2 for k, v in load_file(w).items()}, str(w))
    refused(capsys, argv, run, match=[str(run / "logit_cache" / "synth_second" / "manifest.json"),
                                      "manifest field 'teacher_adapter_hash'"])
    assert not (run / "finetune" / "fresh").exists()


@pytest.mark.parametrize("damage", ["truncated", "corrupted"])
def test_damaged_checkpoint_refused_on_resume(run_copy, capsys, damage):
    rel, sets, run = run_copy
    f = run / "finetune" / "tagi" / "checkpoints" / "step00000002" / "trainable.pt"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] if damage == "truncated" else data[:-64] + b"\0" * 64)
    match = "bytes, the manifest says" if damage == "truncated" else "sha256 differs from"
    refused(capsys, ["finetune", *rel.args(*sets)], run, match=[str(f), match])


def test_export_for_another_backbone_refused(rel_run, capsys, tmp_path):
    other = tmp_path / "other_backbone"  # a LLaMA of another width: the LoRA target shapes differ
    other.mkdir()
    cfg = json.loads((rel_run.backbone / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "hidden_size": 48, "intermediate_size": 96}))
    inputs = tmp_path / "inputs.jsonl"
    inputs.write_text('{"input": "a b c"}\n')
    base = ["--hypernet", str(rel_run.export), "--backbone", str(other), "--no-cache", "--instruction", "Copy."]
    want = [str(rel_run.export), f"this hypernetwork export was made for backbone {rel_run.backbone}",
            f"but backbone {other} (llama) has other LoRA target shapes"]
    refused(capsys, ["generate-adapter", *base, "--out", str(tmp_path / "a")], tmp_path, rel_run.export, match=want)
    refused(capsys, ["predict", *base, "--inputs", str(inputs), "--out", str(tmp_path / "p.jsonl")], tmp_path,
            rel_run.export, match=want)
