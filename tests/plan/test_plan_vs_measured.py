"""Plan's byte formulas against what the code really allocates on tiny configs (CPU, no CUDA):
- the instruction states `precompute_encodings` returns: bytes of its tensors = finetune_instruction_states_bytes;
- its peak while torch.cat runs (two copies): an RSS delta in a fresh process, within 25%;
- a teacher adapter as read back = teacher_adapter_bytes;
- a whole stage (`tagi-ds pretrain` through the CLI, O(documents) instruction states) : peak RSS within 25% of the
  plan's CPU-run figure for that same config."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tagi_ds.plan import structures as S
from tagi_ds.plan.shapes import backbone_shape

from conftest import REPO

# A fixed glibc mmap threshold: every tensor over 128 KiB gets its own mapping and goes back to the OS when freed, as
# the real-width tensors (tens of MB and up, over glibc's 32 MiB dynamic ceiling) always do. With the default dynamic
# threshold the tiny models' MB-sized chunk tensors fragment the heap: +40% RSS in the precompute test below.
ENV = dict(os.environ, PYTHONPATH=str(REPO), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
           TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore",
           MALLOC_MMAP_THRESHOLD_="131072")


def _tensor_bytes(*ts: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    """A suite tokenizer + a random 4-layer LLaMA, hidden 128, 4 heads (2 KV heads: GQA exercises kv_width)."""
    from tagi_ds.data.synthetic import all_wording, build_suite
    from tagi_ds.data.tokenizer import train_sentencepiece_tokenizer
    from tagi_ds.modeling.tiny import build_from_config, tiny_llama_config

    out = tmp_path_factory.mktemp("plan_llama") / "backbone"
    tok = train_sentencepiece_tokenizer(all_wording(build_suite(instances_per_task=10, held_back_per_task=2)), out,
                                        vocab_size=600, kind="llama")
    cfg = tiny_llama_config(vocab_size=len(tok), hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
                            intermediate_size=256, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                            eos_token_id=tok.eos_token_id)
    model = build_from_config(cfg, seed=0)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    return out


@pytest.mark.parametrize("arch", ["llama", "t5"])
def test_instruction_states_bytes_equal_what_precompute_returns(arch):
    from tagi_ds.modeling.tagi import build_student
    from tagi_ds.modeling.tiny import build_from_config, tiny_llama_config, tiny_t5_config
    from tagi_ds.train.hypernet_trainer import precompute_encodings

    cfg = (tiny_llama_config(vocab_size=100, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2,
                             intermediate_size=64) if arch == "llama" else
           tiny_t5_config(vocab_size=100, d_model=32, num_layers=2, num_heads=4, d_ff=64))
    backbone = build_from_config(cfg, seed=0, frozen=True).to(torch.bfloat16)
    student = build_student(backbone, arch, ["q", "v"], r=4, alpha=8, hidden=16, embed_dim=8, fusion=True,
                            backend="reference")
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(3, 100, (int(n),), generator=g).tolist() for n in torch.randint(5, 40, (37,), generator=g)]
    enc = precompute_encodings(student, rows, pad_id=0, device="cpu")
    width = max(len(r) for r in rows)
    held = _tensor_bytes(enc.pooled, enc.hidden, enc.mask, *(t for kv in (enc.prefix or ()) for t in kv))
    predicted = S.finetune_instruction_states_bytes(backbone_shape(cfg, arch), len(rows), width, 2, True, arch)
    assert predicted == held


def test_teacher_adapter_bytes_equal_what_is_read_back(tmp_path):
    from tagi_ds.adapters.peft_io import read_peft_adapter, write_peft_adapter
    from tagi_ds.modeling.backbone import target_specs
    from tagi_ds.modeling.tiny import tiny_t5_config

    specs = target_specs(tiny_t5_config(d_model=32, num_layers=2, num_heads=4, d_ff=64), ["q", "v"])
    r = 4
    adapters = {}
    for s in specs:
        a, b = adapters.get(s.module_type, ([], []))
        a.append(torch.randn(r, s.d_in))
        b.append(torch.randn(s.d_out, r))
        adapters[s.module_type] = (a, b)
    adapters = {k: (torch.stack(a), torch.stack(b)) for k, (a, b) in adapters.items()}
    write_peft_adapter(tmp_path / "t", specs, adapters, r=r, alpha=8, base_model="x", task_type="SEQ_2_SEQ_LM")
    back, _, _ = read_peft_adapter(tmp_path / "t", specs)
    lora = sum(r * (s.d_in + s.d_out) for s in specs)
    assert _tensor_bytes(*(t for ab in back.values() for t in ab)) == S.teacher_adapter_bytes(lora)
    assert S.evaluate_teacher_stack_bytes(7, lora) == 2 * 7 * S.teacher_adapter_bytes(lora)


_PEAK_SCRIPT = r"""
import json, sys, torch
from tagi_ds.modeling.tagi import build_student
from tagi_ds.modeling.tiny import build_from_config, tiny_llama_config
from tagi_ds.train.hypernet_trainer import precompute_encodings
torch.set_num_threads(1)
cfg = tiny_llama_config(vocab_size=100, hidden_size=64, num_layers=8, num_heads=4, intermediate_size=64)
student = build_student(build_from_config(cfg, seed=0, frozen=True), "llama", ["q", "v"], r=2, alpha=4, hidden=8,
                        embed_dim=4, fusion=True, backend="reference")
rows = [[5] * 256 for _ in range(160)]
def status(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))
before = status("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
enc = precompute_encodings(student, rows, pad_id=0, device="cpu")
print(json.dumps({"delta": status("VmHWM:") - before}))
"""


def test_precompute_peak_is_two_copies_of_the_states():
    """RSS rise while `precompute_encodings` runs = the states twice (chunk list + torch.cat) + one chunk's work."""
    from tagi_ds.modeling.tiny import tiny_llama_config

    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak RSS")
    out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT], env=ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    delta = json.loads(out.stdout.strip().splitlines()[-1])["delta"]
    sh = backbone_shape(tiny_llama_config(vocab_size=100, hidden_size=64, num_layers=8, num_heads=4,
                                          intermediate_size=64), "llama")
    states = S.finetune_instruction_states_bytes(sh, 160, 256, 4, True, "llama")  # 2 x 86 MB
    predicted = S.precompute_concat_peak_bytes(states) + S.encode_chunk_working_bytes(sh, 256, 4, "sdpa", False)
    assert 0.75 * predicted <= delta <= 1.25 * predicted, (delta, predicted)


def test_pretrain_stage_peak_rss_matches_the_plan(llama_dir, tmp_path):
    """The real `tagi-ds pretrain` (one process, plain loop, 1 step) on 3,000 documents: its O(documents)
    instruction states dominate; peak RSS within 25% of plan's CPU-run figure for the same config."""
    from tagi_ds.config import load_config
    from tagi_ds.plan.report import make_plan

    overrides = [f"runs_dir={tmp_path}", "name=p", "device=cpu", "threads=1", f"backbone.name_or_path={llama_dir}",
                 "backbone.arch=llama", "backbone.dtype=float32", "backbone.target_modules=[q, v]",
                 "distributed.use_deepspeed=false", "pretrain.steps=1", "pretrain.warmup_steps=0",
                 "pretrain.micro_batch_size=8", "data.pretrain_offline_docs=3000",
                 "data.pretrain_segment_lengths=[32, 16, 16]", "hypernet.hidden=32", "hypernet.embed_dim=8",
                 "lora.r=4", "lora.alpha=8"]
    cfg_path = REPO / "configs" / "tiny.yaml"
    plan = make_plan(load_config(cfg_path, overrides), nodes=1, gpus_per_node=1, stage="pretrain")
    predicted = plan["stages"]["pretrain"]["cpu_device_gib"] * 2 ** 30
    proc = subprocess.Popen([sys.executable, "-m", "tagi_ds.cli", "pretrain", "--config", str(cfg_path), *overrides],
                            cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    log = proc.stdout.read()
    assert os.waitstatus_to_exitcode(status) == 0, log[-3000:]
    measured = usage.ru_maxrss * 1024
    states = [p for p in plan["stages"]["pretrain"]["phases"]["instruction precompute"] if "two copies" in p["name"]]
    assert states and states[0]["bytes"] > 0.4 * predicted  # the O(documents) structure is what is being checked
    assert 0.75 * predicted <= measured <= 1.25 * predicted, (measured / 2 ** 30, predicted / 2 ** 30)
