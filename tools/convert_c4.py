#!/usr/bin/env python
"""Check and index C4 shards (c4-train.NNNNN-of-01024.json.gz) for stage-1 pretraining text.

    python tools/convert_c4.py SRC... OUT [--copy | --text-only]

The logic lives in tagi_ds/data/pretrain_text.py (see `convert_c4`); this file only makes it runnable from a checkout.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's tagi_ds, installed or not

from tagi_ds.data.pretrain_text import convert_c4_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(convert_c4_main())
