"""Fixtures of the plan tests: the scale configs' plans, made once per module (meta-device models, seconds)."""
from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCALE = {"t5-xl-sni": "google/t5-xl-lm-adapt", "llama-sni": "meta-llama/Llama-2-7b-hf",
         "t5-xl-p3": "google/t5-xl-lm-adapt"}
