"""Issue 19, "Tracebacks instead of a clear error, exit 2" (cases 10-14), through the real CLI: one line naming the
key / file and what is expected, exit 2, no traceback, nothing under the run folder changed (sha256).

10. every numeric config value is range-checked at load (the typed config's field ranges);
11. a missing / non-model backbone, --device cuda without CUDA, a read-only run folder, a full disk (two finetunes
    at once: test_stage_locks.py);
12. an empty config file;
13. `tasks --sni DIR` on a plain folder of task files (one split);
14. predict --max-input-length 0, a split-list line that leaves tasks/; an instance whose only reference is "" is
    scored alike by both metrics.
"""
from __future__ import annotations

import dataclasses
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import torch

from tests.proc_helpers import worker_env
from tests.reliability.rel_helpers import cli_run, copy_run, refused, tree_sha

REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------------ case 10
@pytest.mark.parametrize("override, match", [
    ("finetune.lr=.nan", "key 'finetune.lr' must be a finite number > 0, got nan"),
    ("finetune.tasks_per_batch=0", "key 'finetune.tasks_per_batch' must be >= 1, got 0"),
    ("finetune.temperature=0", "key 'finetune.temperature' must be > 0, got 0.0"),
    ("lora.r=0", "key 'lora.r' must be >= 1, got 0"),
    ("cache.top_k=0", "key 'cache.top_k' must be >= 1, got 0"),
    ("lora.dropout=1.5", "key 'lora.dropout' must be in [0, 1), got 1.5"),
    ("teacher.lr=.inf", "key 'teacher.lr' must be a finite number > 0, got inf"),
])
def test_out_of_range_values_are_refused_at_load(rel_run, capsys, override, match):
    refused(capsys, ["finetune", *rel_run.args("variant=ranges", override)], rel_run.run_dir,
            match=[str(rel_run.yaml), match])


def test_every_numeric_config_field_has_a_range():
    """A new int/float field without a range (or a check) fails here, so case 10 stays closed."""
    from tagi_ds.config import RunConfig

    def walk(cls, prefix=""):
        hints = typing.get_type_hints(cls)
        for fl in dataclasses.fields(cls):
            tp = hints[fl.name]
            if dataclasses.is_dataclass(tp):
                yield from walk(tp, prefix + fl.name + ".")
                continue
            args = set(typing.get_args(tp)) - {type(None)} or {tp}
            if args & {int, float} and not (fl.metadata.get("range") or fl.metadata.get("check")):
                yield prefix + fl.name
    assert list(walk(RunConfig)) == []


# ------------------------------------------------------------------------------------------------ case 11
def test_backbone_that_is_not_a_model(rel_run, capsys, tmp_path):
    missing = tmp_path / "no_such_backbone"
    refused(capsys, ["teacher", *rel_run.args(f"backbone.name_or_path={missing}")], rel_run.run_dir,
            match=f"backbone.name_or_path={missing}: no such folder")
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "readme.txt").write_text("not a model\n")
    refused(capsys, ["finetune", *rel_run.args(f"backbone.name_or_path={notes}")], rel_run.run_dir,
            match=f"backbone.name_or_path={notes}: this folder is not a model folder (no config.json in it)")
    refused(capsys, ["teacher", *rel_run.args("backbone.name_or_path=nobody/not-cached-model")], rel_run.run_dir,
            match="hub id is not in the local cache while the hub is offline")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda(rel_run, capsys, tmp_path):
    base = ["--hypernet", str(rel_run.export), "--instruction", "Copy.", "--no-cache", "--device", "cuda"]
    refused(capsys, ["generate-adapter", *base, "--out", str(tmp_path / "a")], tmp_path, rel_run.run_dir,
            match="--device cuda: no CUDA device is available here")
    inputs = tmp_path / "in.jsonl"
    inputs.write_text('{"input": "a"}\n')
    refused(capsys, ["predict", *base, "--inputs", str(inputs), "--out", str(tmp_path / "p.jsonl")], tmp_path,
            match="--device cuda: no CUDA device is available here")
    refused(capsys, ["finetune", *rel_run.args("device=cuda")], rel_run.run_dir,
            match="device=cuda but no CUDA device is available here")


def _mount_tmpfs(where: Path, size: str) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
    return r.returncode == 0


def _umount(where: Path) -> None:
    """Detach the test's tmpfs even while this process still maps a file of it (a cache shard's memmap)."""
    import gc

    gc.collect()
    subprocess.run(["umount", "-l", str(where)], capture_output=True)


@pytest.fixture()
def readonly_run(rel_run, tmp_path):
    """A copy of the session run on a read-only filesystem (root: a tmpfs remounted ro) or in read-only folders."""
    mnt = tmp_path / "ro"
    mounted = _mount_tmpfs(mnt, "64m")
    run = copy_run(rel_run.run_dir, mnt / "runs")
    if mounted:
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
    else:
        for p in [run, *run.rglob("*")]:
            p.chmod(p.stat().st_mode & ~0o222)
    try:
        yield run
    finally:
        if mounted:
            _umount(mnt)
        else:
            for p in [run, *run.rglob("*")]:
                p.chmod(p.stat().st_mode | 0o200)


def test_read_only_run_folder(rel_run, readonly_run, capsys):
    run = readonly_run
    if os.geteuid() == 0 and not os.path.ismount(run.parent.parent):
        pytest.skip("root ignores folder permissions and tmpfs cannot be mounted here")
    msg = refused(capsys, ["finetune", *rel_run.args(f"runs_dir={run.parent}", "variant=fresh")], run,
                  match=[str(run / "finetune")])
    assert "Read-only file system (EROFS)" in msg or "Permission denied (EACCES)" in msg, msg


def test_full_disk(rel_run, capsys, tmp_path):
    """A finetune on a nearly full filesystem: one line naming the file and ENOSPC; nothing half-written remains."""
    mnt = tmp_path / "small"
    if not _mount_tmpfs(mnt, "1200k"):
        pytest.skip("needs root to mount a small tmpfs")
    try:
        run = copy_run(rel_run.run_dir, mnt / "runs")
        free = shutil.disk_usage(mnt).free
        (mnt / "filler").write_bytes(b"\0" * max(0, free - 96 * 1024))  # leave ~96 KB: less than a checkpoint
        kept = lambda tree: {k: v for k, v in tree.items() if not k.startswith(("finetune/full", "tb/finetune/full"))}
        before = kept(tree_sha(run))
        rc, _, err = cli_run(capsys, ["finetune", *rel_run.args(f"runs_dir={run.parent}", "variant=full")])
        lines = [ln for ln in err.splitlines() if ln.startswith("tagi-ds finetune: error:")]
        assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
        assert "No space left on device (ENOSPC)" in lines[0] and str(run / "finetune" / "full") in lines[0], lines[0]
        assert not [p for p in run.rglob("*.tmp")]  # no temp file left behind
        assert kept(tree_sha(run)) == before  # everything that was there is intact
        with capsys.disabled():
            print(f"\n[finetune] rc=2 :: {lines[0]}")
    finally:
        _umount(mnt)


def test_file_size_limit_in_a_real_process(rel_run, tmp_path):
    """The same translation in a plain `python -m tagi_ds.cli` process under `ulimit -f` (no root needed): torch's
    native writer fails mid-checkpoint; the user reads one line with the file and the errno, no traceback."""
    runs = tmp_path / "runs"
    copy_run(rel_run.run_dir, runs)

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    r = subprocess.run([sys.executable, "-m", "tagi_ds.cli", "finetune", *rel_run.args(f"runs_dir={runs}",
                        "variant=big")], cwd=REPO, env=worker_env(), capture_output=True, text=True, timeout=300,
                       preexec_fn=limit)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    line = [ln for ln in r.stderr.splitlines() if ln.startswith("tagi-ds finetune: error:")][0]
    assert "File too large (EFBIG)" in line and str(runs / "r" / "finetune" / "big") in line, line
    print(f"\n[finetune] rc=2 :: {line}")


# ------------------------------------------------------------------------------------------------ case 12
def test_empty_config_file(rel_run, capsys, tmp_path, monkeypatch):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing here\n")
    monkeypatch.chdir(tmp_path)  # the defaults would write runs/tiny here
    refused(capsys, ["teacher", "--config", str(empty)], tmp_path, match=f"{empty}: the config file is empty")
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------------------------ case 13
TASK = {"Definition": ["Copy the input."], "Positive Examples": [{"input": "a", "output": "a"}],
        "Instances": [{"id": "i-1", "input": "b", "output": ["b"]}], "Categories": ["Copying"]}


def test_tasks_on_a_plain_folder_of_task_files(capsys, tmp_path):
    for name in ("task2_b", "task1_a"):
        (tmp_path / f"{name}.json").write_text(json.dumps(TASK))
    rc, out, err = cli_run(capsys, ["tasks", "--sni", str(tmp_path), "--json"])
    assert rc == 0, err
    assert json.loads(out) == {"tasks": 2, "instances": 2, "categories": {"Copying": 2},
                               "splits": {"all": {"tasks": 2, "instances": 2, "categories": {"Copying": 2}}}}
    rc, out, err = cli_run(capsys, ["tasks", "--sni", str(tmp_path)])
    assert rc == 0 and out.splitlines()[1].split()[:3] == ["all", "2", "2"], out


def test_a_run_on_a_folder_without_split_lists_says_what_it_needs(rel_run, capsys, tmp_path):
    (tmp_path / "sni").mkdir()
    (tmp_path / "sni" / "task1_a.json").write_text(json.dumps(TASK))
    refused(capsys, ["teacher", *rel_run.args("data.source=sni", f"data.sni_dir={tmp_path / 'sni'}")],
            rel_run.run_dir, match=["no split lists", "splits/train_tasks.txt and splits/test_tasks.txt",
                                    f"tagi-ds tasks --sni {tmp_path / 'sni'}"])


# ------------------------------------------------------------------------------------------------ case 14
def test_predict_max_input_length_zero(rel_run, capsys, tmp_path):
    inputs = tmp_path / "in.jsonl"
    inputs.write_text('{"input": "a"}\n')
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # argparse's own exit: usage + one error line
        from tagi_ds import cli

        cli.main(["predict", "--hypernet", str(rel_run.export), "--instruction", "Copy.", "--inputs", str(inputs),
                  "--out", str(tmp_path / "p.jsonl"), "--max-input-length", "0"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "argument --max-input-length: must be >= 1, got 0" in err, err
    assert not (tmp_path / "p.jsonl").exists()


def test_split_list_line_cannot_leave_tasks(rel_run, capsys, tmp_path):
    root = tmp_path / "sni"
    (root / "tasks").mkdir(parents=True)
    (root / "splits").mkdir()
    (root / "tasks" / "task1_a.json").write_text(json.dumps(TASK))
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "evil.json").write_text(json.dumps(TASK))
    (root / "splits" / "train_tasks.txt").write_text("task1_a\n../../outside/evil\n")
    (root / "splits" / "test_tasks.txt").write_text("task1_a\n")
    split = root / "splits" / "train_tasks.txt"
    refused(capsys, ["tasks", "--sni", str(root), "--json"], tmp_path,
            match=[f"{split}:2: '../../outside/evil' is not a task name"])
    refused(capsys, ["teacher", *rel_run.args("data.source=sni", f"data.sni_dir={root}")], rel_run.run_dir, tmp_path,
            match=f"{split}:2")


def test_instance_whose_only_reference_is_empty(capsys, tmp_path):
    """The right answer can be "nothing" (3 instances of the real SNI training tasks): the task loads, and both
    metrics agree on it: an empty answer is right (EM and ROUGE-L 100), any other wrong (0 and 0); it was EM 100 with
    ROUGE-L 0 for the same empty answer."""
    from tagi_ds.metrics import compute_metrics, rouge_l

    task = dict(TASK, Instances=[{"id": "i-1", "input": "b", "output": ["b"]},
                                 {"id": "i-2", "input": "c", "output": [""]}])
    (tmp_path / "task1_e.json").write_text(json.dumps(task))
    rc, out, err = cli_run(capsys, ["tasks", "--sni", str(tmp_path), "--json"])
    assert rc == 0 and json.loads(out)["instances"] == 2, err
    assert compute_metrics(["b", ""], [["b"], [""]]) == {"rougeL": 100.0, "exact_match": 100.0}
    assert compute_metrics(["b", " . "], [["b"], [""]]) == {"rougeL": 100.0, "exact_match": 100.0}  # normalised
    assert compute_metrics(["b", "c"], [["b"], [""]]) == {"rougeL": 50.0, "exact_match": 50.0}
    assert rouge_l("c", ["", "c"]) == 1.0 and rouge_l("", ["", "c"]) == 1.0 and rouge_l("d", ["", "c"]) == 0.0
