"""Logit-cache shards of the sampled and priority modes: exact round trip of seeded rows, refusal of another
mode / N naming the field, checksums of the extra files, older top-k manifests, and teacher_kl through disk."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from tests.distill.distill_helpers import zipf_logits

from tagi_ds.cli import main as cli_main
from tagi_ds.distill.logit_cache import CacheShardReader, CacheShardWriter, manifest_fields, shard_is_complete
from tagi_ds.distill.losses import teacher_kl
from tagi_ds.distill.signal import CachedTeacherSignal, PriorityTeacher, SampledTeacher
from tagi_ds.distill.sparse_kl import dense_kl
from tagi_ds.distill.teacher_rows import CacheMode, encode_rows, instance_generator
from tagi_ds.errors import ArtifactMismatchError, DataError

V, T, TASK = 150, 2.0, "task003_demo"


def fields(**mode) -> dict:
    return manifest_fields(tokenizer_hash="h", backbone_id="tiny", teacher_adapter_hash="a", temperature=T,
                           prompt_format="tk", max_source_length=32, max_target_length=8, vocab_size=V, **mode)


def write(root, f: dict, n: int = 4, task: str = TASK) -> dict[str, torch.Tensor]:
    logits = {}
    with CacheShardWriter(root, task, f) as w:
        for i in range(n):
            logits[f"{task}-{i}"] = zipf_logits(10 + i, (2 + i,), V, a=1.3)
            w.add(f"{task}-{i}", logits[f"{task}-{i}"])
    return logits


@pytest.mark.parametrize("mode", [dict(mode="sampled", num_samples=20, sample_seed=7),
                                  dict(mode="priority", k=24, sample_seed=7)])
def test_round_trip_is_the_seeded_encode_rows(tmp_path, mode):
    f = fields(**mode)
    logits = write(tmp_path, f)
    r = CacheShardReader(tmp_path / TASK, expect=f)
    cm = CacheMode.from_manifest(f)
    assert r.mode == cm and r.manifest["sample_seed"] == 7 and r.manifest["mode"] == mode["mode"]
    extra = "counts" if mode["mode"] == "sampled" else "threshold"
    assert r.manifest["dtypes"] == {"logprobs": "float16", "ids": "uint16",
                                    extra: "uint8" if extra == "counts" else "float32"}
    assert all(isinstance(a, np.memmap) for a in r.arrays.values())
    for iid, lg in logits.items():
        want = encode_rows(lg, cm, T, instance_generator(7, TASK, iid))
        got = r.rows(iid)
        for name, arr in want.items():
            assert np.array_equal(got[name].numpy(), arr.astype(got[name].numpy().dtype)), name
    # a rebuild draws the same rows: the same checksums
    write(tmp_path / "again", f)
    again = CacheShardReader(tmp_path / "again" / TASK)
    assert again.manifest["files"] == r.manifest["files"]


def test_reader_refuses_another_mode_or_n_naming_the_field(tmp_path):
    write(tmp_path / "topk", fields(k=16))
    write(tmp_path / "s32", fields(mode="sampled", num_samples=32, sample_seed=0))
    with pytest.raises(ArtifactMismatchError, match=r"field 'mode' is 'topk' but this run expects 'sampled'"):
        CacheShardReader(tmp_path / "topk" / TASK, expect=fields(mode="sampled", num_samples=32, sample_seed=0))
    with pytest.raises(ArtifactMismatchError, match=r"field 'num_samples' is 32 but this run expects 12"):
        CacheShardReader(tmp_path / "s32" / TASK, expect=fields(mode="sampled", num_samples=12, sample_seed=0))
    with pytest.raises(ArtifactMismatchError, match=r"field 'sample_seed' is 0 but this run expects 1"):
        CacheShardReader(tmp_path / "s32" / TASK, expect=fields(mode="sampled", num_samples=32, sample_seed=1))
    with pytest.raises(ArtifactMismatchError, match=r"field 'mode' is 'sampled' but this run expects 'topk'"):
        CacheShardReader(tmp_path / "s32" / TASK, expect=fields(k=16))
    assert not shard_is_complete(tmp_path / "s32" / TASK, fields(k=16))
    sig = CachedTeacherSignal(tmp_path / "s32")
    with pytest.raises(ArtifactMismatchError, match="'mode' is 'sampled', not 'topk'"):
        sig.topk(TASK, [f"{TASK}-0"], [2])


@pytest.mark.parametrize("name,mode", [("counts.bin", dict(mode="sampled", num_samples=8, sample_seed=0)),
                                       ("threshold.bin", dict(mode="priority", k=8, sample_seed=0))])
def test_extra_files_are_checksummed_and_sized(tmp_path, name, mode):
    write(tmp_path, fields(**mode))
    path = tmp_path / TASK / name
    data = bytearray(path.read_bytes())
    data[3] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactMismatchError, match=rf"{re.escape(name)}: sha256 checksum does not match"):
        CacheShardReader(tmp_path / TASK)
    path.write_bytes(bytes(data[:-1]))
    with pytest.raises(ArtifactMismatchError, match=rf"{re.escape(name)}: file has \d+ bytes, expected \d+ \(trunc"):
        CacheShardReader(tmp_path / TASK, verify=False)


def test_a_manifest_from_before_modes_reads_as_top_k(tmp_path):
    write(tmp_path, fields(k=8))
    mpath = tmp_path / TASK / "manifest.json"
    m = json.loads(mpath.read_text())
    del m["mode"]
    mpath.write_text(json.dumps(m))
    r = CacheShardReader(tmp_path / TASK, expect=fields(k=8))
    assert r.mode == CacheMode.make("topk", k=8) and r.k == 8


def test_writer_refuses_rows_of_another_mode(tmp_path):
    f = fields(mode="priority", k=4, sample_seed=0)
    with pytest.raises(DataError, match=r"a \(logprobs, ids\) pair is a top-k row, but this shard's mode is 'prio"):
        with CacheShardWriter(tmp_path, TASK, f) as w:
            w.add("x", (torch.zeros(2, 4), torch.zeros(2, 4, dtype=torch.long)))
    with pytest.raises(DataError, match="counts must sum to num_samples=4"):
        with CacheShardWriter(tmp_path, TASK, fields(mode="sampled", num_samples=4, sample_seed=0)) as w:
            w.add("x", {"logprobs": np.zeros((1, 4)), "ids": np.zeros((1, 4)), "counts": np.array([[1, 1, 0, 0]])})
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="'sampled' takes num_samples"):
        fields(mode="sampled", k=4, sample_seed=0)


def test_teacher_kl_through_disk_for_every_mode_and_mixed_tasks(tmp_path):
    """k = V priority keeps every id with weight p: the same value as the dense KL (float16 store). Sampled rows
    of two tasks come back as one batch; shards of different modes in one batch are refused."""
    lengths = [3, 2, 4]
    teacher = zipf_logits(0, (3, 4), V, a=1.3)
    g = torch.Generator().manual_seed(3)
    student = (teacher + torch.randn(3, 4, V, generator=g)).requires_grad_(True)
    mask = torch.arange(4)[None, :] < torch.tensor(lengths)[:, None]
    for task, f in (("full", fields(mode="priority", k=V, sample_seed=1)),
                    ("a", fields(mode="sampled", num_samples=16, sample_seed=1)),
                    ("b", fields(mode="sampled", num_samples=16, sample_seed=1)),
                    ("c", fields(mode="sampled", num_samples=8, sample_seed=1))):
        with CacheShardWriter(tmp_path, task, f) as w:
            for i, n in enumerate(lengths):
                w.add(f"i{i}", teacher[i, :n])
    sig = CachedTeacherSignal(tmp_path)
    ids = [f"i{i}" for i in range(3)]
    got = teacher_kl(student, mask, sig, "full", ids, T, control=0.0)
    torch.testing.assert_close(got, dense_kl(student, teacher, mask, T), rtol=2e-3, atol=0)
    assert isinstance(sig.batch("full", ids, lengths), PriorityTeacher)
    mixed = sig.batch(["a", "b", "a"], ids, lengths)
    assert isinstance(mixed, SampledTeacher) and mixed.num_samples == 16
    assert torch.equal(mixed.ids[1, :2], sig.batch("b", ids[1:2], lengths[1:2]).ids[0, :2])
    loss = teacher_kl(student, mask, sig, ["a", "b", "a"], ids, T)
    loss.backward()
    assert torch.isfinite(loss) and (student.grad[~mask] == 0).all()
    with pytest.raises(ArtifactMismatchError, match="one batch needs one mode"):
        sig.batch(["a", "c", "a"], ids, lengths)


def test_inspect_cache_reports_the_mode_and_all_row_bytes(tmp_path, capsys):
    write(tmp_path, fields(mode="sampled", num_samples=10, sample_seed=0), task="s")
    write(tmp_path, fields(mode="priority", k=6, sample_seed=0), task="p")
    assert cli_main(["inspect-cache", str(tmp_path), "--json"]) == 0
    rep = {r["task"]: r for r in json.loads(capsys.readouterr().out)["tasks"]}
    assert rep["s"]["mode"] == "sampled" and rep["s"]["bytes_per_token"] == 10 * (2 + 2 + 1)
    assert rep["p"]["mode"] == "priority" and rep["p"]["bytes_per_token"] == 6 * 4 + 4
    assert 0 < rep["s"]["mean_kept_mass"] < 1 and 0 < rep["p"]["mean_kept_mass"] < 1
