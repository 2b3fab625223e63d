"""Issue 19, "Code run from a file" and "Damage not noticed" (cases 6, 7, 9), through the real CLI:

6. a pickle planted in a teacher checkpoint or a hypernetwork checkpoint never runs (its payload would create a
   sentinel file, which stays absent); a DeepSpeed checkpoint (pickle by DeepSpeed) loads only with this user's HMAC;
7. a damaged teacher (truncated or zeroed weights) is retrained by `teacher` and refused, naming the file, by
   `cache-logits`; a damaged cache shard and a shard of an older teacher are rebuilt; a damaged adapter-cache entry
   is regenerated;
9. every published file follows the umask (0664 under umask 002), safetensors included.
Case 8 (one writer per stage folder) is tests/reliability/test_stage_locks.py.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from tests.reliability.rel_helpers import cli_run, copy_run, refused, tree_sha
from tagi_ds.io_utils import sha256_file


class Payload:
    """Unpickling this object creates `path`: the code a planted checkpoint would run."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def __reduce__(self):
        return (Path.touch, (self.path,))


def plant(path: Path, sentinel: Path, extra: dict | None = None) -> None:
    """Replace `path` by a torch file whose unpickling runs Payload; rewrite a checkpoint manifest beside it (size and
    sha256), as anyone who can write the run folder could."""
    torch.save({**(extra or {}), "payload": Payload(sentinel)}, path)
    man = path.parent / "manifest.json"
    if man.is_file():
        m = json.loads(man.read_text())
        if path.name in m["files"]:
            m["files"][path.name] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
            man.write_text(json.dumps(m))


# ------------------------------------------------------------------------------------------------ case 6
def test_pickle_planted_in_a_teacher_checkpoint_does_not_run(rel_run, capsys, tmp_path):
    from tagi_ds.run.paths import RunPaths
    from tagi_ds.run.units import load_run_units

    sets = (f"runs_dir={tmp_path / 'runs'}", "name=t")
    cfg = rel_run.cfg(*sets)
    ckpt = RunPaths.of(cfg).teacher_ckpt(load_run_units(cfg).units) / "state.pt"
    ckpt.parent.mkdir(parents=True)
    sentinel = tmp_path / "PWNED_teacher"
    plant(ckpt, sentinel, {"tag": {"units": ["synth_first", "synth_second"]}, "step": 1})
    rc, out, err = cli_run(capsys, ["teacher", *rel_run.args(*sets)])
    assert not sentinel.exists(), "the planted checkpoint ran its payload"
    assert rc == 0, err
    assert f"ignoring checkpoint {ckpt}: not a checkpoint of ours, or damaged" in out + err
    assert "resumed" not in out + err  # trained from scratch, published
    assert all((cfg.run_dir / "teachers" / u / "manifest.json").is_file() for u in ("synth_first", "synth_second"))


@pytest.mark.parametrize("victim", ["trainable.pt", "optimizer.pt", "progress_rank0.pt"])
def test_pickle_planted_in_a_hypernetwork_checkpoint_does_not_run(rel_run, capsys, tmp_path, victim):
    run = copy_run(rel_run.run_dir, tmp_path / "runs")
    f = run / "finetune" / "tagi" / "checkpoints" / "step00000002" / victim
    sentinel = tmp_path / "PWNED_hypernet"
    plant(f, sentinel)
    before = tree_sha(run)
    rc, _, err = cli_run(capsys, ["finetune", *rel_run.args(f"runs_dir={tmp_path / 'runs'}")])
    assert not sentinel.exists(), "the planted checkpoint ran its payload"
    assert rc == 2 and "Traceback" not in err, err
    assert f"tagi-ds finetune: error: {f}: cannot be read as a checkpoint file" in err and "never unpickled" in err
    assert tree_sha(run) == before


def test_deepspeed_checkpoint_loads_only_with_this_users_signature(tmp_path, monkeypatch):
    """DeepSpeed unpickles its own files: its checkpoints carry an HMAC (key outside the run folder); a planted file
    with a rewritten manifest is refused before anything is unpickled."""
    from tagi_ds.errors import ArtifactMismatchError
    from tagi_ds.train import checkpoint as ck

    monkeypatch.setenv(ck.KEY_ENV, str(tmp_path / "home" / "checkpoint.key"))
    tag = tmp_path / "ckpts" / "step00000004"
    tag.mkdir(parents=True)
    torch.save({"module": {"w": torch.ones(2)}}, tag / "mp_rank_00_model_states.pt")
    ck.save_progress(tag, 0, {"step": 4})
    ck.write_manifest(tag, 4, 1)
    assert "hmac" in json.loads((tag / ck.MANIFEST).read_text())
    assert oct((tmp_path / "home" / "checkpoint.key").stat().st_mode & 0o777) == "0o600"
    ck.verify_checkpoint(tag)  # this user's own checkpoint: accepted
    sentinel = tmp_path / "PWNED_deepspeed"
    plant(tag / "mp_rank_00_model_states.pt", sentinel)
    with pytest.raises(ArtifactMismatchError, match="its signature does not match this user's key"):
        ck.verify_checkpoint(tag)
    man = json.loads((tag / ck.MANIFEST).read_text())
    (tag / ck.MANIFEST).write_text(json.dumps({k: v for k, v in man.items() if k != "hmac"}))
    with pytest.raises(ArtifactMismatchError, match="it has no signature"):
        ck.verify_checkpoint(tag)
    assert not sentinel.exists()
    ck.sign_checkpoint(tag)  # a person who trusts it signs it on purpose
    ck.verify_checkpoint(tag)


def test_plain_checkpoint_rng_state_round_trips_without_pickle(tmp_path):
    """The progress record (RNG states included) is tensors and plain values: weights_only loads it, and the
    restored generators continue exactly."""
    import random

    import numpy as np

    from tagi_ds.train import checkpoint as ck

    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    ck.save_progress(tmp_path, 0, {"step": 7, "data_position": 9})
    want = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    torch.load(ck.progress_file(tmp_path, 0), weights_only=True)  # no pickle needed
    assert ck.load_progress(tmp_path, 0) == {"step": 7, "data_position": 9}
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == want


# ------------------------------------------------------------------------------------------------ case 7
def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    else:  # zeroed: same size, same header, zero weights
        n = 8 + int.from_bytes(data[:8], "little")
        path.write_bytes(data[:n] + b"\0" * (len(data) - n))


@pytest.mark.parametrize("how", ["truncated", "zeroed"])
def test_damaged_teacher_is_refused_by_readers_and_retrained(rel_pipeline, capsys, tmp_path, how):
    rp = rel_pipeline
    runs = tmp_path / "runs"
    run = copy_run(rp.run_dir, runs)
    w = run / "teachers" / "synth_first" / "adapter_model.safetensors"
    manifest = json.loads((w.parent / "manifest.json").read_text())
    published = sha256_file(w)
    _damage(w, how)
    refused(capsys, ["cache-logits", *rp.args(runs_dir=runs)], run, match=[str(w), "rerun `tagi-ds teacher`"])
    rc, out, err = cli_run(capsys, ["teacher", *rp.args(runs_dir=runs)])
    assert rc == 0, err
    assert f"teacher synth_first: {w}" in out and "retraining it" in out, out
    assert "teacher synth_second: skipped" in out
    assert manifest["weights_sha256"]["adapter_model.safetensors"] == published  # recorded at publication
    new = json.loads((w.parent / "manifest.json").read_text())
    assert new["weights_sha256"]["adapter_model.safetensors"] == sha256_file(w) and new["hash"] == manifest["hash"]
    # the shard made from the old weights is rebuilt; the other task's shard is kept as it is
    other = tree_sha(run / "logit_cache" / "synth_second")
    rc, out, err = cli_run(capsys, ["cache-logits", *rp.args(runs_dir=runs)])
    assert rc == 0, err
    assert "logit_cache/synth_first: it was made from an earlier version of its teacher's weights; rebuilding" in out
    assert tree_sha(run / "logit_cache" / "synth_second") == other


def test_damaged_cache_shard_of_this_configuration_is_rebuilt(rel_pipeline, capsys, tmp_path):
    rp = rel_pipeline
    runs = tmp_path / "runs"
    run = copy_run(rp.run_dir, runs)
    shard = run / "logit_cache" / "synth_first"
    good = tree_sha(shard)
    data = next(p for p in sorted(shard.glob("*.bin")) if p.stat().st_size > 0)
    data.write_bytes(b"\0" * data.stat().st_size)
    rc, out, err = cli_run(capsys, ["cache-logits", *rp.args(runs_dir=runs)])
    assert rc == 0, err
    assert f"{shard}: {data}" in out and "rebuilding it" in out, out
    assert tree_sha(shard) == good  # the same teacher, the same bytes again


def test_damaged_adapter_cache_entry_is_regenerated(rel_run, capsys, tmp_path):
    cache = tmp_path / "cache"
    base = ["generate-adapter", "--hypernet", str(rel_run.export), "--instruction", "Copy the input.",
            "--cache-dir", str(cache)]
    rc, _, err = cli_run(capsys, base + ["--out", str(tmp_path / "a1")])
    assert rc == 0, err
    entry = next(cache.rglob("tagi_cache.json")).parent
    _damage(entry / "adapter_model.safetensors", "zeroed")
    rc, out, err = cli_run(capsys, base + ["--out", str(tmp_path / "a2")])
    assert rc == 0, err
    assert f"adapter cache entry {entry}" in err and "regenerating it" in err, err
    assert "(generated;" in out
    w1, w2 = (tmp_path / "a1" / "adapter_model.safetensors"), (tmp_path / "a2" / "adapter_model.safetensors")
    assert w1.read_bytes() == w2.read_bytes()  # the old code used the zeroed entry
    assert json.loads((entry / "tagi_cache.json").read_text())["weights_sha256"] == \
        sha256_file(entry / "adapter_model.safetensors")  # rewritten, and recorded


def test_teacher_manifest_hash_is_the_published_files_hash(tmp_path):
    """with_weights_hash serializes in memory what write_peft_adapter writes: the two sha256 agree."""
    from tagi_ds.modeling.backbone import TargetSpec
    from tagi_ds.run.artifacts import with_weights_hash
    from tagi_ds.run.peft_io import write_peft_adapter

    specs = [TargetSpec(f"model.layers.{i}.self_attn.q_proj", "self.q", "q", i, 8, 8) for i in range(2)]
    g = torch.Generator().manual_seed(0)
    adapters = {"self.q": (torch.randn(2, 2, 8, generator=g), torch.randn(2, 8, 2, generator=g))}
    m = with_weights_hash({"hash": "x"}, specs, adapters)
    out = write_peft_adapter(tmp_path / "t", specs, adapters, r=2, alpha=4.0, base_model="b", task_type="CAUSAL_LM",
                             extra_files={"manifest.json": m})
    assert m["weights_sha256"]["adapter_model.safetensors"] == sha256_file(out / "adapter_model.safetensors")


# ------------------------------------------------------------------------------------------------ case 9
def test_published_files_follow_the_umask(rel_run, capsys, tmp_path):
    old = os.umask(0o002)
    try:
        runs = tmp_path / "runs"
        run = copy_run(rel_run.run_dir, runs)
        rc, _, err = cli_run(capsys, ["finetune", *rel_run.args(f"runs_dir={runs}", "variant=modes")])
        assert rc == 0, err
        rc, _, err = cli_run(capsys, ["generate-adapter", "--hypernet", str(rel_run.export), "--instruction", "Copy.",
                                      "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "adapter")])
        assert rc == 0, err
    finally:
        os.umask(old)
    made = [p for root in (run / "finetune" / "modes", run / "tb" / "finetune" / "modes", tmp_path / "adapter",
                           tmp_path / "cache") for p in [root, *root.rglob("*")]]
    assert any(p.suffix == ".safetensors" for p in made) and any(p.name == "trainable.pt" for p in made)
    bad = [f"{oct(p.stat().st_mode & 0o777)} {p}" for p in made
           if (p.stat().st_mode & 0o777) != (0o775 if p.is_dir() else 0o664)]
    assert not bad, "\n".join(bad)
