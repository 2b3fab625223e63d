"""Pieces of bench/scale_sim.py: the narrow backbones, the generated configs and the process measurements.

A measurement runs one stage as a subprocess through the real CLI and records, non-invasively:
- peak RSS of every stage process (VmHWM from /proc, polled every 0.5 s: it is monotonic, so only a rise in the
  last 0.5 s before exit can be missed), labelled by rank (RANK in its environment); processes a stage starts that
  are not stages (DeepSpeed's first-use JIT build: g++ at ~1.5 GB) are left out;
- seconds to the first optimizer step: wall time of the stage's first TensorBoard scalar (pretrain / finetune
  with log_every=1, the teacher with teacher.steps=1, the baselines' step-1 log) minus the moment the process
  started (imports and data loading included, as a user waits for them);
- bytes the stage wrote under its run folder (symlinked inputs not followed).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
SNI_DIR = REPO.parent / "shared" / "data" / "sni"  # ../shared beside the checkout, as configs/sni-small.yaml

# Narrow backbones of the real depth (T5-XL: 24 + 24 blocks; LLaMA-7B: 32), hidden 64, 2 heads of 32 (half the
# heads of a 64-wide model halves the s x s attention work that dominates CPU time at 1,024 tokens). Vocabulary 8,000
# BPE pieces trained on the SNI train tasks' text (the real models: ~32k; the logits scale with it and the plan reads
# it from the folder). LLaMA has 1 KV head (GQA, kv width 32, LLaMA-2-7B has none): the KV prefix of 687 tasks is
# then 2.9 GB per process, so two ranks fit this 24 GiB machine at 100% of the tasks (x2 during torch.cat).
ARCHS = {
    "t5": {"base": "configs/t5-xl-sni.yaml", "hidden": 64, "heads": 2, "ffn": 128, "layers": 24, "vocab": 8000},
    "llama": {"base": "configs/llama-sni.yaml", "hidden": 64, "heads": 2, "kv_heads": 1, "ffn": 172, "layers": 32,
              "vocab": 8000},
}


# ------------------------------------------------------------------------------------------------ backbones
def build_backbone(arch: str, root: Path) -> Path:
    """A sentencepiece tokenizer trained on SNI train text + a random narrow model of the real depth (cached)."""
    spec = ARCHS[arch]
    out = root / "backbones" / f"{arch}-h{spec['hidden']}-a{spec['heads']}-L{spec['layers']}-v{spec['vocab']}"
    if (out / "config.json").is_file():
        return out
    from tagi_ds.data.registry import load_run_tasks
    from tagi_ds.data.tokenizer import train_sentencepiece_tokenizer
    from tagi_ds.modeling.tiny import build_from_config, tiny_llama_config, tiny_t5_config
    from tagi_ds.train.backbone_stage import sni_tokenizer_texts

    t0 = time.perf_counter()
    train = load_run_tasks("sni", sni_dir=str(SNI_DIR), max_instances=100)["train"]
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tok = train_sentencepiece_tokenizer(sni_tokenizer_texts(train), tmp, vocab_size=spec["vocab"], kind=arch)
    if arch == "t5":
        cfg = tiny_t5_config(vocab_size=len(tok), d_model=spec["hidden"], num_layers=spec["layers"],
                             num_heads=spec["heads"], d_ff=spec["ffn"], feed_forward_proj="gated-gelu",
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                             decoder_start_token_id=tok.pad_token_id, relative_attention_num_buckets=32,
                             relative_attention_max_distance=128, dropout_rate=0.0)
        # dropout 0 (T5-XL: 0.1): on CPU each dropped element draws a random number, and the teachers and baselines
        # run in train() mode over (16, heads, 1024, 1024) probabilities: 7x slower steps; its memory terms are
        # checked by tests/plan/test_activations.py instead.
        # lm_head tied to the shared embedding (T5 v1.1 keeps a separate one: V x d more, 1 MB at this width;
        # transformers 5 unties the encoder / decoder embeddings too when asked to untie a fresh model)
    else:
        cfg = tiny_llama_config(vocab_size=len(tok), hidden_size=spec["hidden"], num_layers=spec["layers"],
                                num_heads=spec["heads"], num_kv_heads=spec["kv_heads"],
                                intermediate_size=spec["ffn"], max_position_embeddings=4096,
                                pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    model = build_from_config(cfg, seed=0)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(tmp)
    tmp.rename(out)
    print(f"built {out} in {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def write_config(path: Path, arch: str, backbone: Path, runs_dir: Path, name: str, extra: dict) -> Path:
    """A YAML on top of the real scale config: same data caps, lengths, batches, LoRA and hypernetwork; the narrow
    backbone; CPU; a few steps."""
    import yaml

    base = {
        "base": str(REPO / ARCHS[arch]["base"]), "name": name, "runs_dir": str(runs_dir), "device": "cpu",
        "threads": 1,
        # seen_held_back 0: the scale configs hold back each training task's last 100 instances for the seen split;
        # the shared subset holds 100 a task, so that would leave each task 1 training instance (batches of 5 rows)
        "data": {"sni_dir": str(SNI_DIR), "pretrain_text": "offline", "seen_held_back": 0},
        "backbone": {"name_or_path": str(backbone)},
        "teacher": {"steps": 1, "warmup_steps": 0, "checkpoint_every": 1000},
        "pretrain": {"steps": 2, "warmup_steps": 0, "log_every": 1, "checkpoint_every": 1000, "resume": "never"},
        "finetune": {"steps": 2, "warmup_steps": 0, "log_every": 1, "checkpoint_every": 1000, "resume": "never"},
        "distributed": {"timeout_s": 1800.0, "param_persistence_threshold": 0},
        "baselines": {"steps": 2, "warmup_steps": 0, "log_every": 1, "checkpoint_every": 1000, "resume": "never"},
    }
    merged = _merge(base, extra)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(merged, sort_keys=False))
    return path


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def publish_teacher_copies(run_dir: Path, source_unit: str, units: Sequence[str]) -> int:
    """Every unit's teacher folder as a hard link of the one trained teacher's files (same shapes, same bytes):
    the finetune (L_ins) and evaluate (teacher method) read every unit's adapter; training 687 teachers on CPU is
    out of reach. Returns how many folders were made."""
    src = run_dir / "teachers" / source_unit
    made = 0
    for u in units:
        dst = run_dir / "teachers" / u
        if dst.exists():
            continue
        dst.mkdir(parents=True)
        for f in src.iterdir():
            if f.is_file():
                os.link(f, dst / f.name)
        made += 1
    return made


# ------------------------------------------------------------------------------------------------ measuring
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# glibc raises its mmap threshold (up to 32 MiB) each time a mapped block is freed, after which the narrow model's
# MB-sized tensors come from the heap and freed ones fragment it (RSS that no structure holds: +40% on the
# old code's instruction precompute, measured). The real-width tensors are tens to hundreds of MB,
# always mapped and returned when freed; a fixed 128 KiB threshold makes the narrow ones behave the same way.
GLIBC_FIXED_MMAP = True


# DeepSpeed JIT-builds its CPU shared-memory collective (deepspeed_shm_comm) into TORCH_EXTENSIONS_DIR on first use
# (2-5 minutes on 2 cores). The default folder is per user, and another torch install on the machine rebuilds it
# there in its own flavour: measured times to the first step then include a random rebuild. The stages get a folder
# of their own, built once before any measured run (warm_extensions).
TORCH_EXTENSIONS = REPO / "runs" / "torch_extensions"


def worker_env() -> dict:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(REPO), TAGI_DEBUG="1", TORCH_EXTENSIONS_DIR=str(TORCH_EXTENSIONS))
    if GLIBC_FIXED_MMAP:
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def warm_extensions() -> float:
    """Build (or load) DeepSpeed's CPU comm op in the stages' extension folder; seconds it took."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder; "
                    "ShareMemCommBuilder().load()"], env=worker_env(), check=True, capture_output=True)
    return time.perf_counter() - t0


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


@dataclass
class Measured:
    label: str
    rc: int
    seconds: float
    peak_rss: dict[str, int] = field(default_factory=dict)  # role ("main", "rank0", ...) -> bytes
    first_step_s: Optional[float] = None
    bytes_written: int = 0
    log_tail: str = ""
    series: list = field(default_factory=list)  # (s, RSS of the largest process), ~1 sample per second

    @property
    def worker_peak(self) -> int:
        """The largest worker process (a rank, or the single process)."""
        workers = {k: v for k, v in self.peak_rss.items() if k != "launcher"}
        return max(workers.values(), default=0)


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            kids.setdefault(ppid, []).append(int(d))
    return kids


def _role(pid: int) -> str:
    """launcher (torchrun), rankN / main (a stage process), or "" for anything else they start (DeepSpeed's
    first-use JIT build runs g++ / ninja: not the stage's memory)."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return "?"
    if b"torch.distributed.run" in cmd:
        return "launcher"
    if b"tagi_ds.cli" not in cmd:
        return ""
    for kv in env:
        if kv.startswith(b"RANK="):
            return "rank" + kv[5:].decode()
    return "main"


def _status(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _hwm(pid: int) -> int:
    return _status(pid, "VmHWM:")


def _rss(pid: int) -> int:
    return _status(pid, "VmRSS:")


def dir_bytes(root: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(root, followlinks=False):
        for f in files:
            p = Path(dirpath) / f
            if not p.is_symlink():
                try:
                    total += p.stat().st_size
                except OSError:
                    pass
    return total


def first_scalar_time(tb_dir: Path) -> Optional[float]:
    """Wall time of the earliest scalar in the TensorBoard event files under `tb_dir`."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    best = None
    for f in sorted(tb_dir.rglob("events.out.tfevents.*")) if tb_dir.is_dir() else []:
        for ev in EventFileLoader(str(f)).Load():
            if ev.HasField("summary") and ev.summary.value:
                best = ev.wall_time if best is None else min(best, ev.wall_time)
                break
    return best


def run_measured(label: str, argv: Sequence[str], run_dir: Path, tb_dir: Optional[Path], log: Path,
                 stop_when: Optional[Path] = None) -> Measured:
    """Run `argv`, poll its processes' peak RSS, then read the first-step time and the bytes written.
    `stop_when`: a file whose appearance ends the run (SIGTERM to our own child): what follows is not measured."""
    before = dir_bytes(run_dir) if run_dir.exists() else 0
    log.parent.mkdir(parents=True, exist_ok=True)
    peaks: dict[int, int] = {}
    roles: dict[int, str] = {}
    series: list[tuple[float, int]] = []  # (seconds, largest worker RSS): when the peak happens
    t0 = time.time()
    with open(log, "w") as fh:
        proc = subprocess.Popen(list(argv), cwd=REPO, env=worker_env(), stdout=fh, stderr=subprocess.STDOUT)
        stop = threading.Event()
        stopped: list[float] = []

        def poll() -> None:
            seen: list[int] = [proc.pid]
            n = 0
            while not stop.is_set():
                if n % 5 == 0:  # the process tree changes rarely: walk /proc every 2.5 s, read VmHWM every 0.5 s
                    kids = _children_map()
                    todo, seen = [proc.pid], []
                    while todo:
                        p = todo.pop()
                        seen.append(p)
                        todo += kids.get(p, [])
                n += 1
                if stop_when is not None and stop_when.exists() and proc.poll() is None:
                    time.sleep(1.0)  # let the writer finish its folder
                    stopped.append(time.time() - t0)
                    proc.terminate()
                rss = max((_rss(p) for p in seen if roles.get(p, "main") not in ("", "launcher")), default=0)
                series.append((round(time.time() - t0, 1), rss))
                for p in seen:
                    h = _hwm(p)
                    if h:
                        peaks[p] = max(peaks.get(p, 0), h)
                        if p not in roles or roles[p] == "?":
                            roles[p] = _role(p)
                stop.wait(0.5)

        th = threading.Thread(target=poll, daemon=True)
        th.start()
        try:
            _, status, _usage = os.wait4(proc.pid, 0)
        finally:
            stop.set()
            th.join()
        proc.returncode = 0 if stopped else os.waitstatus_to_exitcode(status)
    secs = time.time() - t0
    by_role: dict[str, int] = {}
    for p, h in peaks.items():
        r = roles.get(p, "?")
        if r in ("?", ""):
            continue
        by_role[r] = max(by_role.get(r, 0), h)
    first = first_scalar_time(tb_dir) if tb_dir is not None else None
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
    step = max(1, len(series) // 300)
    return Measured(label, proc.returncode, secs, by_role, None if first is None else first - t0,
                    max(0, dir_bytes(run_dir) - before) if run_dir.exists() else 0, tail, series[::step])


def cli(*args: str) -> list[str]:
    return [PY, "-m", "tagi_ds.cli", *args]


def torchrun(nproc: int, *args: str) -> list[str]:
    return [PY, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(free_port()),
            "-m", "tagi_ds.cli", *args]


def save_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=str))
