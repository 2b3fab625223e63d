"""Real multi-process DeepSpeed runs of the engine on CPU (gloo): ZeRO-3 partitioning, kill + resume, ZeRO-2 / ZeRO-3 /
one-process loss agreement, export reload without DeepSpeed, and a peer's death.

Five launches (each 15-60 s here): the reference ZeRO-3 run, a run SIGKILLed after a checkpoint, its resume (plus a
ZeRO-2 LLaMA phase and a ZeRO-3 T5 phase in the same processes), an srun-like pair where one rank dies, and one
plain process. The first distributed start on a machine compiles DeepSpeed's shm comm op (~1 min, cached).
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.train import engine_standin as S
from tests.proc_helpers import free_port, sigkill_when_ready, start_launcher, worker_env
from tagi_ds.errors import ArtifactMismatchError
from tagi_ds.train.checkpoint import read_latest, verify_checkpoint

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
WORKER = ["-m", "tests.train.ds_worker"]  # run as a module of the tests package (cwd = the repository)
Z2, Z3 = str(REPO / "ds_configs/zero2.json"), str(REPO / "ds_configs/zero3.json")
STEPS, EVERY, KILL_AT = 20, 5, 10


def _torchrun(events: Path, phases: list[dict], timeout_s: float = 60) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           *WORKER, "--events", str(events), "--coll-timeout", str(timeout_s)]
    for ph in phases:
        cmd += ["--phase", json.dumps(ph)]
    return cmd


def _events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _losses(events: list[dict], phase: str) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in events if e["event"] == "step" and e.get("phase") == phase}


def _run(cmd: list[str], timeout: float = 400, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, env=worker_env(), capture_output=True, text=True, timeout=timeout, **kw)
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return r


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("engine_dist")
    for arch in ("llama", "t5"):
        S.save_backbone(arch, root / f"bb_{arch}")
    return root


def _llama(work: Path, name: str, out: str, **kw) -> dict:
    return {"name": name, "arch": "llama", "backbone_dir": str(work / "bb_llama"), "ds_config": Z3, "persistence": 0,
            "steps": STEPS, "save_every": EVERY, "out": str(work / out), **kw}


@pytest.fixture(scope="module")
def reference(work: Path) -> list[dict]:
    """Uninterrupted ZeRO-3 LLaMA run, 2 ranks: partition facts, 20 losses, checkpoints, export."""
    ev = work / "ref.jsonl"
    _run(_torchrun(ev, [_llama(work, "ref", "ref", check_partition=True, export=str(work / "export" / "ref"))]))
    return _events(ev)


@pytest.fixture(scope="module")
def resumed(work: Path, reference) -> dict:
    """Same run SIGKILLed (launcher and workers) after the step-10 checkpoint, then resumed in a second launch that
    also runs a ZeRO-2 LLaMA phase (first-step loss) and a ZeRO-3 T5 phase."""
    ev_kill, out = work / "kill.jsonl", work / "killed"
    out.mkdir()
    launcher = start_launcher(_torchrun(ev_kill, [_llama(work, "killed", "killed", kill_after_save=KILL_AT)]))
    assert sigkill_when_ready(launcher, [out / f"pid_rank{r}" for r in (0, 1)]) == -signal.SIGKILL
    latest_after_kill = read_latest(out / "checkpoints")

    ev = work / "resume.jsonl"
    z2 = {"name": "z2", "arch": "llama", "backbone_dir": str(work / "bb_llama"), "ds_config": Z2, "steps": 1,
          "out": str(work / "z2")}
    t5 = {"name": "t5", "arch": "t5", "backbone_dir": str(work / "bb_t5"), "ds_config": Z3, "persistence": 0,
          "steps": STEPS, "lr": 3e-3, "out": str(work / "t5"), "check_partition": True}
    _run(_torchrun(ev, [_llama(work, "killed", "killed", resume=True), z2, t5]))
    return {"latest_after_kill": latest_after_kill, "kill_events": _events(ev_kill), "events": _events(ev)}


def _assert_partitioned(fact: dict) -> None:
    assert fact["all_empty"] and fact["ds_numel_positive"] and fact["shards_ok"], fact
    ex = fact["example"]
    assert ex["numel"] == 0 and ex["shard"] == -(-ex["ds_numel"] // 2) and "NOT_AVAILABLE" in ex["status"], ex


def _assert_falls(losses: dict[int, float]) -> None:
    first = sum(losses[s] for s in range(1, 6)) / 5
    last = sum(losses[s] for s in range(STEPS - 4, STEPS + 1)) / 5
    assert last < first - 0.1, (first, last, losses)


def test_zero3_llama_partitioned_learns_and_checkpoints_trainable_only(reference, work):
    _assert_partitioned(next(e for e in reference if e["event"] == "partition"))
    losses = _losses(reference, "ref")
    assert sorted(losses) == list(range(1, STEPS + 1))
    _assert_falls(losses)
    ckpts = work / "ref" / "checkpoints"
    assert read_latest(ckpts) == "step00000020"
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == ["step00000015", "step00000020"]  # keep 2
    man = verify_checkpoint(ckpts / "step00000020")
    assert man["world_size"] == 2 and "zero_pp_rank_1_mp_rank_00_optim_states.pt" in man["files"]
    states = torch.load(ckpts / "step00000020" / "zero_pp_rank_0_mp_rank_00_model_states.pt", weights_only=False)
    assert states["module"] and all(k.startswith("hyper.") for k in states["module"]), list(states["module"])[:5]


def test_corrupted_deepspeed_checkpoint_is_refused(reference, work, tmp_path):
    import shutil

    bad = tmp_path / "step00000020"
    shutil.copytree(work / "ref" / "checkpoints" / "step00000020", bad)
    victim = bad / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    with pytest.raises(ArtifactMismatchError, match="zero_pp_rank_1_mp_rank_00_optim_states.pt"):
        verify_checkpoint(bad)


def test_export_reloads_without_deepspeed(reference, work):
    ref = torch.load(work / "export" / "export_reference.pt", weights_only=False)
    code = ("import sys, json, torch\n"
            "from tests.train import engine_standin as S\n"
            "from tagi_ds.run.export_io import load_trainable\n"
            "bb = S.model_class('llama').from_pretrained(sys.argv[3])\n"
            "m = S.StandIn('llama', bb, hyper_seed=123)\n"
            "cfg = load_trainable(sys.argv[4], m)\n"
            "ab = m.hyper(torch.arange(S.N_TASKS)); ls, _ = m(S.make_batch('llama', 0, 0, 1)); ls = ls.detach()\n"
            "assert 'deepspeed' not in sys.modules, 'export loading imported deepspeed'\n"
            "torch.save({'ab': ab, 'loss_sum': ls, 'cfg': cfg}, sys.argv[5])\n")
    out = work / "reloaded.pt"
    _run([sys.executable, "-c", code, "-", "-", str(work / "bb_llama"), str(work / "export" / "ref"), str(out)],
         timeout=120)
    got = torch.load(out, weights_only=False)
    assert got["cfg"]["arch"] == "llama"
    for (a, b), (ra, rb) in zip(got["ab"], ref["ab"]):
        torch.testing.assert_close(a, ra, rtol=0, atol=1e-6)
        torch.testing.assert_close(b, rb, rtol=0, atol=1e-6)
    print("export reload: loss_sum", float(got["loss_sum"]), "vs", ref["loss_sum_step0"])
    assert abs(float(got["loss_sum"]) - ref["loss_sum_step0"]) < 1e-3 * max(1.0, ref["loss_sum_step0"])


def test_sigkill_after_checkpoint_then_resume_matches_uninterrupted(reference, resumed):
    assert resumed["latest_after_kill"] == f"step{KILL_AT:08d}"
    assert max(_losses(resumed["kill_events"], "killed")) == KILL_AT  # it really stopped at the checkpoint
    ev = resumed["events"]
    assert next(e for e in ev if e["event"] == "resumed") == {"event": "resumed", "step": KILL_AT,
                                                               "global_step": KILL_AT}
    ref, res = _losses(reference, "ref"), _losses(ev, "killed")
    assert sorted(res) == list(range(KILL_AT + 1, STEPS + 1))
    print("resume: max |loss - uninterrupted| over steps 11-20:", max(abs(res[s] - ref[s]) for s in res))
    for s in res:
        assert abs(res[s] - ref[s]) < 1e-6, (s, res[s], ref[s])


def test_zero3_t5_partitioned_and_learns(resumed):
    ev = resumed["events"]
    _assert_partitioned(next(e for e in ev if e["event"] == "partition"))
    _assert_falls(_losses(ev, "t5"))


def test_single_process_and_zero2_zero3_first_loss_agree(reference, resumed, work):
    """One process with no launcher (plain torch loop; DeepSpeed ZeRO-3 with world 1 and a client AdamW; DeepSpeed
    with the optimizer from the ds config) vs 2-rank ZeRO-2 / ZeRO-3: same first loss; the one-process variants
    also agree on the second loss (same AdamW, warmup and clipping after one update)."""
    ev = work / "single.jsonl"
    ds_opt = work / "zero2_config_optimizer.json"
    cfg = json.loads(Path(Z2).read_text())
    cfg["optimizer"] = {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto", "torch_adam": True}}
    ds_opt.write_text(json.dumps(cfg))
    plain = {"name": "plain", "arch": "llama", "backbone_dir": str(work / "bb_llama"), "ds_config": None,
             "steps": 2, "out": str(work / "plain")}
    ds1 = {**plain, "name": "ds1", "ds_config": Z3, "persistence": 0, "out": str(work / "ds1")}
    dsopt = {**plain, "name": "dsopt", "ds_config": str(ds_opt), "out": str(work / "dsopt")}
    _run([sys.executable, *WORKER, "--events", str(ev)] + [a for ph in (plain, ds1, dsopt)
                                                                for a in ("--phase", json.dumps(ph))], timeout=300)
    single = _events(ev)
    firsts = {"zero3_2ranks": _losses(reference, "ref")[1], "zero2_2ranks": _losses(resumed["events"], "z2")[1],
              "plain_1proc": _losses(single, "plain")[1], "zero3_1proc": _losses(single, "ds1")[1],
              "ds_config_optimizer_1proc": _losses(single, "dsopt")[1]}
    worlds = {e["phase"]: e["world"] for e in single + resumed["events"] if e["event"] == "step"}
    assert worlds["plain"] == 1 and worlds["ds1"] == 1 and worlds["dsopt"] == 1 and worlds["z2"] == 2
    base = firsts["plain_1proc"]
    print("first-step losses:", firsts)
    assert all(abs(v - base) < 1e-5 for v in firsts.values()), firsts
    seconds = {ph: _losses(single, ph)[2] for ph in ("plain", "ds1", "dsopt")}
    seconds["zero3_2ranks"] = _losses(reference, "ref")[2]
    print("second-step losses:", seconds)
    assert all(abs(v - seconds["plain"]) < 1e-5 for v in seconds.values()), seconds


def test_dead_rank_makes_peer_exit_with_clear_error(work):
    """srun-like launch (SLURM_* variables, no torchrun): rank 1 SIGKILLs itself; rank 0 must fail fast, not hang."""
    timeout_s = 20
    out = work / "die"
    out.mkdir()
    ph = {"name": "die", "arch": "llama", "backbone_dir": str(work / "bb_llama"), "ds_config": Z3, "persistence": 0,
          "steps": STEPS, "out": str(out), "die_at": 3, "die_rank": 1}
    port = str(free_port())
    procs = []
    for r in (0, 1):
        env = worker_env(SLURM_PROCID=str(r), SLURM_LOCALID=str(r), SLURM_STEP_NUM_TASKS="2", SLURM_NTASKS="2",
                   SLURM_JOB_ID="4242", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, *WORKER, "--events", str(out / "ev.jsonl"),
                                       "--coll-timeout", str(timeout_s), "--phase", json.dumps(ph)],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        _, err0 = procs[0].communicate(timeout=400)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    procs[1].wait(timeout=30)
    died = json.loads((out / "died.json").read_text())
    ended = time.time()
    assert procs[1].returncode == -signal.SIGKILL
    assert procs[0].returncode == 3, err0[-3000:]
    assert "another rank most likely died" in err0 and "rank 0/2" in err0, err0[-3000:]
    print(f"peer death: rank 0 exited {ended - died['time']:.1f} s after rank 1 was killed")
    assert ended - died["time"] < timeout_s + 10, ended - died["time"]
    assert max(_losses(_events(out / "ev.jsonl"), "die")) == 3
