#!/usr/bin/env python
"""Convert the bigscience/P3 release (TFRecord shards + info.<split>.json) into the jsonl folders data.p3_dir reads.

    python tools/convert_p3.py SRC OUT [--all] [--only GLOB ...] [--force]

The logic lives in tagi_ds/data/p3_release.py (see its docstring); this file only makes it runnable from a checkout.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's tagi_ds, installed or not

from tagi_ds.data.p3_release import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
