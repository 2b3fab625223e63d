"""Benchmark: reading P3's TFRecord shards without TensorFlow, measured in ONE run.

    PYTHONPATH=. python bench/tfrecord.py [--mb 8]

Prints, side by side on the same bytes:
  crc32c numpy      tagi_ds.data.tfrecord.crc32c (byte-position tables, one numpy gather + XOR-reduce per 4 KiB)
  crc32c python     the classic table-driven byte loop in pure Python (what a pure-Python reader would do)
  read records      iter_records on a P3-like shard: framing + both CRCs per record
  read + parse      iter_examples with only the three text features decoded (what tools/convert_p3.py does)
  read + parse all  every feature decoded, token-id lists included
and the ratio of each to the pure-Python CRC. Records are P3-like: ~300 token ids per input, ~1 KB of text.
"""
from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from pathlib import Path

from tagi_ds.data.tfrecord import crc32c, iter_examples, iter_records, write_examples

_TABLE = []
for _i in range(256):
    _c = _i
    for _ in range(8):
        _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1
    _TABLE.append(_c)


def crc32c_python(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc = _TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def rate(fn, nbytes: int) -> float:
    t0 = time.perf_counter()
    fn()
    return nbytes / (time.perf_counter() - t0) / 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=8.0, help="size of the test shard")
    args = ap.parse_args()
    rng = random.Random(0)
    blob = os.urandom(4 << 20)
    assert crc32c(blob) == crc32c_python(blob)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        shard = Path(tmp) / "train.tfrecord-00000-of-00001"
        words = ["the", "cat", "sat", "question", "answer", "premise", "hypothesis", "ünïcode", "true", "false"]

        def example():
            text = " ".join(rng.choice(words) for _ in range(160))
            return {"inputs": [rng.randrange(32000) for _ in range(300)], "inputs_pretokenized": [text],
                    "targets": [rng.randrange(32000) for _ in range(3)], "targets_pretokenized": ["yes"],
                    "answer_choices": ["yes", "no", "maybe"]}

        n = 0
        target = int(args.mb * 1e6)

        def examples():
            nonlocal n
            size = 0
            while size < target:
                ex = example()
                size += 2 * 1000 + 300 * 3
                n += 1
                yield ex

        write_examples(shard, examples())
        size = shard.stat().st_size
        keep = ("inputs_pretokenized", "targets_pretokenized", "answer_choices")
        py = rate(lambda: crc32c_python(blob), len(blob))
        rows.append(("crc32c python", py))
        rows.append(("crc32c numpy", rate(lambda: crc32c(blob), len(blob))))
        rows.append(("read records", rate(lambda: sum(1 for _ in iter_records(shard)), size)))
        rows.append(("read + parse", rate(lambda: sum(1 for _ in iter_examples(shard, only=keep)), size)))
        rows.append(("read + parse all", rate(lambda: sum(1 for _ in iter_examples(shard)), size)))
        print(f"shard: {n} records, {size / 1e6:.1f} MB; CRC blob {len(blob) >> 20} MiB")
        for name, mbps in rows:
            print(f"  {name:<18} {mbps:8.1f} MB/s   x{mbps / py:6.1f} vs pure-Python CRC")


if __name__ == "__main__":
    main()
