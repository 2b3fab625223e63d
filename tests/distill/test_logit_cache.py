"""Logit cache: exact round trip, refusal of corrupt / foreign shards, atomic publication under SIGKILL."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from tests.distill.distill_helpers import teacher_logits
from tests.tiny import word_tokenizer

from tagi_ds.distill.logit_cache import (CacheShardReader, CacheShardWriter, dir_hash, ids_dtype, manifest_fields,
                                         shard_is_complete, tokenizer_hash)
from tagi_ds.distill.signal import CachedTeacherSignal, TeacherSignal
from tagi_ds.errors import ArtifactMismatchError

REPO = Path(__file__).resolve().parents[2]
V, K, T = 200, 16, 2.0


def fields(tok_hash: str = "tokhash", k: int = K, vocab_size: int = V, **kw) -> dict:
    base = dict(tokenizer_hash=tok_hash, backbone_id="tiny-t5", teacher_adapter_hash="adapterhash", k=k,
                temperature=T, prompt_format="tk-instruct-v1", max_source_length=64, max_target_length=16,
                vocab_size=vocab_size)
    base.update(kw)
    return manifest_fields(**base)


def write_shard(root: Path, task: str = "task001_demo", n: int = 5, f: dict | None = None) -> dict:
    written = {}
    with CacheShardWriter(root, task, f or fields()) as w:
        for i in range(n):
            logits = teacher_logits(i, L=3 + i, V=V)
            w.add(f"{task}-{i}", logits)
            lp, ids = torch.topk(torch.log_softmax(logits / T, -1), K)
            written[f"{task}-{i}"] = (lp, ids)
    return written


def test_round_trip_is_exact_float16(tmp_path):
    written = write_shard(tmp_path)
    r = CacheShardReader(tmp_path / "task001_demo", expect=fields())
    assert len(r) == 5 and r.manifest["counts"] == {"instances": 5, "tokens": sum(3 + i for i in range(5))}
    assert r.manifest["dtypes"] == {"logprobs": "float16", "ids": "uint16"}
    assert r.manifest["temperature"] == T and r.manifest["k"] == K
    for iid, (lp, ids) in written.items():
        got_lp, got_ids = r.get(iid)
        assert got_lp.dtype == torch.float32 and got_ids.dtype == torch.int64
        assert torch.equal(got_ids, ids)
        assert torch.equal(got_lp, lp.half().float())  # bit-exact float16 store
    # the files are memory-mapped, not loaded
    assert isinstance(r.logprobs, np.memmap) and isinstance(r.ids, np.memmap)
    with pytest.raises(ArtifactMismatchError, match="not in this cache shard"):
        r.get("nope")


def test_precomputed_topk_and_int32_ids_for_big_vocab(tmp_path):
    assert ids_dtype(65535) == np.uint16 and ids_dtype(65536) == np.int32
    big = 70000
    lp = torch.log_softmax(torch.randn(4, K), -1)
    ids = torch.tensor([[69999 - j for j in range(K)]] * 4)
    with CacheShardWriter(tmp_path, "big", fields(vocab_size=big)) as w:
        w.add("a", (lp, ids))
    r = CacheShardReader(tmp_path / "big")
    assert r.manifest["dtypes"]["ids"] == "int32"
    got_lp, got_ids = r.get("a")
    assert torch.equal(got_ids, ids) and torch.equal(got_lp, lp.half().float())


def test_flipped_byte_is_refused_naming_the_file(tmp_path):
    write_shard(tmp_path)
    path = tmp_path / "task001_demo" / "logprobs.bin"
    data = bytearray(path.read_bytes())
    data[17] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactMismatchError, match=r"logprobs\.bin: sha256 checksum does not match"):
        CacheShardReader(tmp_path / "task001_demo", expect=fields())
    assert not shard_is_complete(tmp_path / "task001_demo", fields())


def test_truncated_file_is_refused_naming_the_file(tmp_path):
    write_shard(tmp_path)
    path = tmp_path / "task001_demo" / "ids.bin"
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(ArtifactMismatchError, match=r"ids\.bin: file has \d+ bytes, expected \d+ \(truncated\)"):
        CacheShardReader(tmp_path / "task001_demo")


def test_manifest_from_another_tokenizer_is_refused_naming_the_field(tmp_path, tmp_path_factory):
    tok_a = word_tokenizer(None, [f"w{i}" for i in range(40)])
    tok_b = word_tokenizer(None, [f"w{i}" for i in range(39)] + ["other"])
    ha, hb = tokenizer_hash(tok_a), tokenizer_hash(tok_b)
    assert ha != hb
    write_shard(tmp_path, f=fields(tok_hash=ha))
    with pytest.raises(ArtifactMismatchError) as e:
        CacheShardReader(tmp_path / "task001_demo", expect={"tokenizer_hash": hb, "k": K})
    msg = str(e.value)
    assert "tokenizer_hash" in msg and ha in msg and hb in msg
    with pytest.raises(ArtifactMismatchError, match=r"'temperature' is 2\.0 but this run expects 1\.0"):
        CacheShardReader(tmp_path / "task001_demo", expect={"temperature": 1.0})
    assert shard_is_complete(tmp_path / "task001_demo", fields(tok_hash=ha))


def test_tokenizer_hash_is_stable_across_save_and_load(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = word_tokenizer(None, [f"w{i}" for i in range(40)])
    tokenizer.save_pretrained(tmp_path / "tok")
    again = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert tokenizer_hash(again) == tokenizer_hash(tokenizer)
    # an added special token changes it
    again.add_special_tokens({"additional_special_tokens": ["<extra_0>"]})
    assert tokenizer_hash(again) != tokenizer_hash(tokenizer)


def test_dir_hash_changes_with_content(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "adapter_model.safetensors").write_bytes(b"123")
    h1 = dir_hash(tmp_path / "a")
    (tmp_path / "a" / "adapter_model.safetensors").write_bytes(b"124")
    assert dir_hash(tmp_path / "a") != h1


def test_exception_inside_writer_publishes_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with CacheShardWriter(tmp_path, "t", fields()) as w:
            w.add("x", teacher_logits(0, 2, V))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


_SLOW_WRITER = textwrap.dedent("""
    import time, torch
    from tagi_ds.distill.logit_cache import CacheShardWriter, manifest_fields
    f = manifest_fields(tokenizer_hash="tokhash", backbone_id="tiny-t5", teacher_adapter_hash="adapterhash",
                        k={k}, temperature={t}, prompt_format="tk-instruct-v1", max_source_length=64,
                        max_target_length=16, vocab_size={v})
    w = CacheShardWriter({root!r}, "task001_demo", f)
    for i in range(1000):
        g = torch.Generator().manual_seed(i)
        w.add(f"task001_demo-{{i}}", torch.randn(4, {v}, generator=g))
        print("added", i, flush=True)
        time.sleep(0.05)
    w.close()
""")


def test_sigkill_mid_write_leaves_nothing_and_rerun_completes(tmp_path):
    script = _SLOW_WRITER.format(repo=str(REPO), k=K, t=T, v=V, root=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    try:
        for _ in range(3):  # wait until it is really writing
            line = proc.stdout.readline()
            assert line.startswith("added"), line
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "task001_demo").exists()  # nothing under the final name
    stale = [p.name for p in tmp_path.iterdir()]
    assert len(stale) == 1 and stale[0].startswith(".task001_demo.") and stale[0].endswith(".tmp")
    assert (tmp_path / stale[0] / "logprobs.bin").is_file()  # it was killed mid-write (rows still buffered)
    assert not shard_is_complete(tmp_path / "task001_demo", fields())
    # rerun: completes, and the killed writer's temp folder is gone
    write_shard(tmp_path, n=4)
    assert [p.name for p in tmp_path.iterdir()] == ["task001_demo"]
    assert shard_is_complete(tmp_path / "task001_demo", fields())
    manifest = json.loads((tmp_path / "task001_demo" / "manifest.json").read_text())
    assert manifest["counts"]["instances"] == 4


def test_cached_teacher_signal_pads_and_checks_lengths(tmp_path):
    written = write_shard(tmp_path, n=3)  # lengths 3, 4, 5
    sig = CachedTeacherSignal(tmp_path, expect=lambda task: fields())
    assert isinstance(sig, TeacherSignal)
    ids = ["task001_demo-2", "task001_demo-0"]
    lp, tid, valid = sig.topk("task001_demo", ids, [5, 2])  # second: a prefix of its 3 cached positions
    assert lp.shape == (2, 5, K) and tid.shape == (2, 5, K) and valid.tolist() == [[True] * 5, [True, True] + [False] * 3]
    assert torch.equal(lp[0], written[ids[0]][0].half().float())
    assert torch.equal(tid[1, :2], written[ids[1]][1][:2]) and (lp[1, 2:] == 0).all()
    with pytest.raises(ArtifactMismatchError, match="3 cached label positions but the batch has 4"):
        sig.topk("task001_demo", ["task001_demo-0"], [4])
    with pytest.raises(ArtifactMismatchError, match="no logit-cache shard for task 'other'"):
        sig.topk("other", ["x"], [1])
