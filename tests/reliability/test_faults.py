"""Faults survived: a finished artifact of another configuration is never overwritten (teacher, finetune export),
a pretrain SIGKILLed after its first checkpoint and rerun publishes the same export bytes as an uninterrupted run,
and every file the package publishes goes through tagi_ds.io_utils (a source scan).

Covered elsewhere (referenced in the issue, not repeated):
- two ranks, one dies -> the peer exits with a clear error in bounded time:
  tests/train/test_engine_distributed.py::test_dead_rank_makes_peer_exit_with_clear_error
- kill -9 then rerun -> same result: teacher tests/train/test_teacher_resume.py, cache-logits
  tests/train/test_cache_logits.py::test_cache_killed_mid_shard_leaves_no_final_name_and_completes_on_rerun,
  finetune under ZeRO-3 tests/train/test_recipes_distributed.py::test_sigkill_after_checkpoint_then_resume_...
- a cache shard of another configuration: tests/train/test_teacher_stage.py::test_cache_of_another_configuration_...
"""
from __future__ import annotations

import ast
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from tests.proc_helpers import worker_env
from tests.reliability.rel_helpers import snapshot
from tagi_ds import cli
from tagi_ds.run.artifacts import teacher_manifest
from tagi_ds.run.backbone import load_run_backbone
from tagi_ds.run.units import load_run_units

REPO = Path(__file__).resolve().parents[2]
WORKER = ["-m", "tests.train.recipe_worker"]


def _cli(capsys, argv: list[str]) -> tuple[int, str]:
    capsys.readouterr()
    rc = cli.main(argv)
    return rc, capsys.readouterr().err


# ------------------------------------------------------------------------------- another configuration
def test_finetune_export_of_another_configuration_is_not_overwritten(rel_run, capsys, tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(rel_run.run_dir.parent, runs)
    ft = runs / "r" / "finetune" / "tagi"
    export_bytes = (ft / "export" / "trainable.safetensors").read_bytes()
    before = snapshot(runs / "r")
    rc, err = _cli(capsys, ["finetune", *rel_run.args(f"runs_dir={runs}", "finetune.lr=0.01")])
    msg = [ln for ln in err.splitlines() if ln.startswith("tagi-ds finetune: error:")]
    assert rc == 2 and len(msg) == 1 and "Traceback" not in err, err
    have = json.loads((ft / "stage.json").read_text())["hash"]
    for want in (str(ft), "holds the finetune outputs of another configuration", have[:16], "finetune.lr: 0.003 -> 0.01",
                 str(ft / "stage.json")):
        assert want in msg[0], msg[0]
    assert snapshot(runs / "r") == before  # nothing written: not the export, not config.yaml, not TensorBoard
    with capsys.disabled():
        print(f"\n[finetune] rc=2 untouched=yes :: {msg[0]}")
    # the same configuration (runtime keys may differ) is accepted: resumes at its last step, same export bytes
    rc, err = _cli(capsys, ["finetune", *rel_run.args(f"runs_dir={runs}", "threads=2", "finetune.log_every=5")])
    assert rc == 0, err
    assert (ft / "export" / "trainable.safetensors").read_bytes() == export_bytes


def test_stage_identity_ignores_runtime_keys_and_other_stages(rel_run):
    from tagi_ds.train import finetune, pretrain

    base = rel_run.cfg()
    same = rel_run.cfg("threads=2", "name=other", "finetune.time_budget_s=5", "eval.batch_size=3",
                       "distributed.timeout_s=9", "hypernet.kernel=auto")
    assert finetune.identity(base) == finetune.identity(same)
    tasks = rel_run.cfg("data.max_tasks=1", "finetune.lr=0.5", "cache.top_k=4")  # not read by pretrain
    assert pretrain.identity(base) == pretrain.identity(tasks)
    assert finetune.identity(base) != finetune.identity(tasks)
    assert pretrain.identity(base) != pretrain.identity(rel_run.cfg("pretrain.lr=0.5"))


def test_teacher_of_another_configuration_is_not_overwritten(rel_run, capsys, tmp_path):
    """A published teacher (real manifest of config A) is skipped by A and refused by B, untouched both times."""
    from tagi_ds.run.peft_io import write_peft_adapter

    sets = (f"runs_dir={tmp_path / 'runs'}", "name=t")
    cfg_a = rel_run.cfg(*sets)
    ru, bb = load_run_units(cfg_a), load_run_backbone(cfg_a)
    g = torch.Generator().manual_seed(0)
    for u in ru.units:  # stand-in adapters (training them is tests/train's job); the manifest is the real one
        adapters = {}
        for s in bb.specs:
            n = 1 + max(x.layer for x in bb.specs if x.module_type == s.module_type)
            adapters.setdefault(s.module_type, (torch.randn(n, 4, s.d_in, generator=g),
                                                torch.randn(n, s.d_out, 4, generator=g)))
        write_peft_adapter(cfg_a.run_dir / "teachers" / u, bb.specs, adapters, r=4, alpha=8.0, base_model=bb.path,
                           task_type="CAUSAL_LM",
                           extra_files={"manifest.json": teacher_manifest(cfg_a, u, ru.tasks[u], bb.arch, bb.tokenizer_hash)})
    before = snapshot(cfg_a.run_dir)
    rc, err = _cli(capsys, ["teacher", *rel_run.args(*sets)])
    assert rc == 0 and snapshot(cfg_a.run_dir) == before, err
    rc, err = _cli(capsys, ["teacher", *rel_run.args(*sets, "teacher.lr=0.5")])
    msg = [ln for ln in err.splitlines() if ln.startswith("tagi-ds teacher: error:")]
    cfg_b = rel_run.cfg(*sets, "teacher.lr=0.5")
    have = teacher_manifest(cfg_a, "synth_first", ru.tasks["synth_first"], bb.arch, bb.tokenizer_hash)["hash"]
    want = teacher_manifest(cfg_b, "synth_first", ru.tasks["synth_first"], bb.arch, bb.tokenizer_hash)["hash"]
    assert rc == 2 and len(msg) == 1 and "Traceback" not in err, err
    for s in (str(cfg_a.run_dir / "teachers" / "synth_first"), "trained for another configuration", have, want):
        assert s in msg[0], msg[0]
    assert snapshot(cfg_a.run_dir) == before
    with capsys.disabled():
        print(f"\n[teacher] rc=2 untouched=yes :: {msg[0]}")


# ------------------------------------------------------------------------------------------------ kill -9
def test_pretrain_sigkilled_after_first_checkpoint_reruns_to_identical_export(rel_run, tmp_path):
    from safetensors.torch import load_file

    from tagi_ds.train import pretrain

    runs = tmp_path / "runs"
    killed = rel_run.sets + [f"runs_dir={runs}", "name=killed"]
    pid_dir = tmp_path / "pids"
    phase = {"stage": "pretrain", "config": str(rel_run.yaml), "set": killed, "stall_after_save": 2,
             "pid_dir": str(pid_dir)}
    proc = subprocess.Popen([sys.executable, *WORKER, "--phase", json.dumps(phase)], cwd=REPO,
                            env=worker_env(warnings="ignore"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.time() + 240
        while not (pid_dir / "pid_rank0").exists():  # written by the worker right after the step-2 checkpoint
            assert proc.poll() is None, f"worker exited early: {proc.stderr.read()[-3000:]}"
            assert time.time() < deadline, "the pretrain never reached its first checkpoint"
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    out_k = runs / "killed" / "pretrain"
    assert (out_k / "checkpoints" / "latest").read_text().strip() == "step00000002"
    assert not (out_k / "export").exists()  # killed before publishing: nothing under the final name

    prev = torch.get_num_threads()
    try:
        resumed = pretrain.run(rel_run.cfg(*killed[3:]), progress=False)
        ref = pretrain.run(rel_run.cfg(f"runs_dir={runs}", "name=uninterrupted"), progress=False)
    finally:
        torch.set_num_threads(prev)
    assert json.loads((out_k / "summary.json").read_text())["resumed_from"] == 2
    a, b = load_file(resumed / "trainable.safetensors"), load_file(ref / "trainable.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (resumed / "trainable.safetensors").read_bytes() == (ref / "trainable.safetensors").read_bytes()
    assert not list(out_k.rglob(".*.tmp"))  # no temp leftovers after the rerun


# --------------------------------------------------------------------------------------- atomic publication
WRITERS = {"save_pretrained", "save", "save_file", "write_text", "write_bytes", "tofile", "savez"}
ATOMIC = {"atomic_path", "atomic_dir", "TemporaryDirectory"}
# Writers that are not publications, each with its reason.
ALLOWED = {
    ("tagi_ds/distill/logit_cache.py", "open"): "CacheShardWriter writes into its own mkdtemp folder, renamed on close",
    ("tagi_ds/distill/logit_cache.py", "write_text"): "same temp folder (offsets.json, manifest.json)",
    ("tagi_ds/train/engine_stage.py", "open"): "metrics.jsonl is an appended log stream, not an artifact",
    ("tagi_ds/data/p3_release.py", "open"): "convert_split writes into the temp folder its caller publishes by rename",
    ("tagi_ds/data/tfrecord.py", "open"): "TFRecordWriter opens the temp path of its own atomic_path context",
    ("tagi_ds/train/teacher_batch.py", "save_checkpoint"): "its own method, which writes through atomic_path",
    ("tagi_ds/train/engine.py", "save_checkpoint"): "DeepSpeed's own files; a checkpoint counts once its manifest "
                                                     "(atomic) and then `latest` (atomic) are written",
}


def _writes(tree: ast.AST):
    """(call name, line, names bound by enclosing `with atomic_*(...) as x`) for each write-like call."""
    def visit(node, bound: set[str]):
        if isinstance(node, ast.With):
            names = set(bound)
            for item in node.items:
                c = item.context_expr
                fn = c.func.attr if isinstance(c, ast.Call) and isinstance(c.func, ast.Attribute) else (
                    c.func.id if isinstance(c, ast.Call) and isinstance(c.func, ast.Name) else None)
                if fn in ATOMIC and isinstance(item.optional_vars, ast.Name):
                    names.add(item.optional_vars.id)
            bound = names
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else (f.id if isinstance(f, ast.Name) else "")
            mode = next((a.value for a in node.args[1:2] if isinstance(a, ast.Constant)), None)
            if name in WRITERS | {"save_checkpoint"} or (name == "open" and isinstance(mode, str) and
                                                         set(mode) & set("wa")):
                yield name, node, bound
        for child in ast.iter_child_nodes(node):
            yield from visit(child, bound)
    yield from visit(tree, set())


def test_every_published_file_goes_through_io_utils():
    """A write-like call (save_pretrained, torch/np.save, save_file, write_text/bytes, open(.., 'w'/'a')) must sit
    inside a `with atomic_path/atomic_dir(...) as tmp` block, unless ALLOWED says why it is not a publication."""
    bad = []
    for py in sorted((REPO / "tagi_ds").rglob("*.py")):
        rel = py.relative_to(REPO).as_posix()
        if rel == "tagi_ds/io_utils.py":
            continue
        for name, node, bound in _writes(ast.parse(py.read_text())):
            if name == "save" and not (isinstance(node.func, ast.Attribute) and
                                       getattr(node.func.value, "id", "") in ("torch", "np", "numpy")):
                continue  # not torch.save / np.save (e.g. a PIL image or an engine's own method)
            # inside an atomic block (the target is its temp path, or a path built from it) or explained
            if bound or (rel, name) in ALLOWED:
                continue
            bad.append(f"{rel}:{node.lineno} {name}(...) outside atomic_path/atomic_dir")
    assert not bad, "\n".join(bad)
