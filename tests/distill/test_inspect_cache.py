"""`tagi-ds inspect-cache`: bytes per token and kept top-k mass of a small cache."""
from __future__ import annotations

import json

import torch
from tests.distill.distill_helpers import zipf_logits

from tagi_ds.cli import main as cli_main
from tagi_ds.distill.logit_cache import CacheShardWriter, manifest_fields

V, K, T = 500, 8, 1.0


def build(root):
    f = manifest_fields(tokenizer_hash="h", backbone_id="tiny", teacher_adapter_hash="a", k=K, temperature=T,
                        prompt_format="tk", max_source_length=32, max_target_length=8, vocab_size=V)
    masses = []
    for t, n in (("task_a", 3), ("task_b", 2)):
        with CacheShardWriter(root, t, f) as w:
            for i in range(n):
                logits = zipf_logits(i, (4,), V)
                w.add(f"{t}-{i}", logits)
                lp = torch.topk(torch.log_softmax(logits / T, -1), K).values.half().double()
                masses.append(lp.logsumexp(-1).exp())
    return torch.cat(masses).mean().item()


def test_inspect_cache_prints_bytes_per_token_and_kept_mass(tmp_path, capsys):
    mass = build(tmp_path)
    assert cli_main(["inspect-cache", str(tmp_path), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    tot = rep["total"]
    assert [r["task"] for r in rep["tasks"]] == ["task_a", "task_b"]
    assert tot["instances"] == 5 and tot["tokens"] == 20
    # per token: K float16 log-probs + K uint16 ids; the total size adds offsets and manifests
    assert tot["bytes_per_token"] == 4 * K and rep["tasks"][0]["bytes_per_token"] == 4 * K
    assert tot["bytes"] > tot["row_bytes"] == 20 * 4 * K
    assert abs(tot["mean_kept_mass"] - mass) < 1e-6 and 0.5 < mass < 1.0
    assert cli_main(["inspect-cache", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    print(out)
    assert "bytes/tok" in out and f"{4 * K:.1f}" in out and "kept mass" in out and f"{mass:.4f}" in out and "TOTAL (2 tasks)" in out


def test_inspect_cache_refuses_a_corrupt_shard(tmp_path, capsys):
    build(tmp_path)
    p = tmp_path / "task_b" / "ids.bin"
    p.write_bytes(p.read_bytes()[:-2])
    assert cli_main(["inspect-cache", str(tmp_path)]) == 2
    assert "ids.bin" in capsys.readouterr().err
