"""Benchmark: how close each logit-cache mode's KL comes to the full-vocabulary KL, on a finished run's real
teachers and students, side by side in one run.

    PYTHONPATH=. python bench/kd_signal.py --run runs/tiny        # the demo's finished run (make demo)
    PYTHONPATH=. python bench/kd_signal.py --run runs/kdbench --tasks 4 --draws 4  # quicker

For a fixed set of training rows (tasks x instances, micro batches of 4 tasks x 8 instances as the finetune draws
them) the teachers' full logits at the label positions are computed live (backbone + each task's teacher LoRA, full
prompt), and so are the logits of two students: "fresh" (the finetune's starting point: the pretrain export, or a
hypernetwork at init) and "trained" (finetune/<variant>/export). Every mode then encodes the teacher rows exactly as
a shard stores them (`teacher_rows.encode_rows`: float16 log-probs, seeded draws) and computes the loss the finetune
would (`losses.signal_kl`), against the dense T^2 KL_T(teacher || student):

  B/tok       bytes per label position on disk (the row arrays; offsets and manifest excluded)
  bias%       100 * (mean estimate - dense) / dense over all rows; sampled modes: mean over --draws independent
              caches, +- 2 standard errors of that mean (an unbiased mode has 0 inside the interval)
  mb rms%     root mean square over micro batches (and draws) of the micro batch's relative KL error: what one step
              of the finetune sees
  tok sd%     standard deviation over label positions of (estimate - dense), relative to the mean dense KL
  cos mb      cosine between the estimator's and the dense gradient w.r.t. the student logits of a micro batch,
              mean over micro batches and draws
  cos all     the same over all rows at once
  cos mean    cosine of the gradient averaged over the draws (all rows): a biased mode stays below 1 however many
              caches are averaged, an unbiased one approaches 1 as draws grow (top-k: the single cache's value)

Loss options: top-k `missing_mass` (bucket | renormalize); sampled `estimator` (counts = RS-KD's count / N, distinct
= Horvitz-Thompson over the distinct ids); sampled / priority control variate c (0 = off, 1 = the k3 form, auto =
leave-one-out regression over the other positions; sampled_kl.weighted_kl).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from tagi_ds.distill import sampled_kl, sparse_kl  # noqa: E402
from tagi_ds.distill.losses import signal_kl  # noqa: E402
from tagi_ds.distill.signal import SampledTeacher, TopKTeacher, stack_rows  # noqa: E402
from tagi_ds.distill.teacher_rows import CacheMode, decode_rows, encode_rows, instance_generator  # noqa: E402


@dataclass(frozen=True)
class Estimator:
    label: str
    mode: CacheMode
    missing_mass: str = "bucket"  # top-k
    estimator: str = "counts"  # sampled
    control: float | str = 0.0  # sampled / priority: the control variate's coefficient (sampled_kl.weighted_kl)

    @property
    def random(self) -> bool:
        return self.mode.name != "topk"

    def bytes_per_token(self, vocab_size: int) -> int:
        return sum(dt.itemsize * cols for dt, cols in self.mode.layout(vocab_size).values())


def estimators(seed: int) -> list[Estimator]:
    out = []
    for k in (32, 64, 128):
        out.append(Estimator(f"topk k={k} bucket", CacheMode.make("topk", k=k)))
    out.append(Estimator("topk k=32 renormalize", CacheMode.make("topk", k=32), missing_mass="renormalize"))
    for n in (12, 32, 64):
        mode = CacheMode.make("sampled", num_samples=n, seed=seed)
        out.append(Estimator(f"sampled N={n} counts c=0", mode, estimator="counts", control=0.0))  # RS-KD (paper)
        out.append(Estimator(f"sampled N={n} distinct auto", mode, estimator="distinct", control="auto"))
    for k in (12, 31, 63):
        mode = CacheMode.make("priority", k=k, seed=seed)
        for c in (0.0, 1.0, "auto"):
            out.append(Estimator(f"priority k={k} {'auto' if c == 'auto' else f'c={c:g}'}", mode, control=c))
    return out


# ------------------------------------------------------------------------------------------------ the run
def load_run(run: Path, allow_unfinished: bool = False):
    from tagi_ds.config import load_config
    from tagi_ds.data.registry import load_run_tasks_from_config
    from tagi_ds.train.teacher import load_run_backbone, prompt_settings

    if not (run / "report.md").is_file() and not allow_unfinished:
        raise SystemExit(f"{run}: no report.md, the run is not finished (or give another --run)")
    cfg = load_config(run / "config.yaml", [f"runs_dir={run.parent}", f"name={run.name}", "device=cpu"])
    bb = load_run_backbone(cfg)
    tasks = load_run_tasks_from_config(cfg)["train"]
    return cfg, bb, tasks, prompt_settings(cfg, bb.arch)


def pick_rows(tasks, n_tasks: int, n_inst: int, per_block: int = 8):
    """Rows as the finetune's sampler lays them out: blocks of `per_block` instances of one task, 4 tasks a batch."""
    chosen = tasks[:n_tasks]
    pairs = []
    for start in range(0, n_inst, per_block):
        for t in chosen:
            pairs += [(t, inst) for inst in t.instances[start:start + per_block]]
    return pairs


@torch.no_grad()
def teacher_logits(cfg, bb, pairs, settings, chunk: int = 32) -> list[torch.Tensor]:
    """Per row, the teacher's logits (L_i, V) at its label positions (full prompt, its task's teacher LoRA)."""
    from tagi_ds.run.peft_io import read_peft_adapter
    from tagi_ds.data.collate import collate_full
    from tagi_ds.modeling.lora import BatchedLoraHooks
    from tagi_ds.modeling.label_logits import label_positions
    from tagi_ds.run.paths import RunPaths
    from tagi_ds.run.units import teacher_unit

    paths = RunPaths.of(cfg)
    cache: dict[str, tuple[dict, float]] = {}
    hooks, out = None, []
    try:
        for s in range(0, len(pairs), chunk):
            full = collate_full(pairs[s:s + chunk], bb.tokenizer, settings)
            per_task = []
            for name in full.task_names:
                task = next(t for t, _ in pairs if t.name == name)
                unit = teacher_unit(task, cfg.teacher.group_by)
                if unit not in cache:
                    ad, scale, _ = read_peft_adapter(paths.teacher(unit), bb.specs)
                    cache[unit] = (ad, scale)
                per_task.append(cache[unit])
            scale = per_task[0][1]
            if hooks is None:
                hooks = BatchedLoraHooks(bb.model, bb.specs, scale, backend="reference")
            stacked = {mt: (torch.stack([a[mt][0] for a, _ in per_task]),
                            torch.stack([a[mt][1] * (sc / scale) for a, sc in per_task])) for mt in per_task[0][0]}
            with hooks.apply(stacked, full.task_ids):
                logits = bb.model(input_ids=full.input_ids, attention_mask=full.attention_mask, use_cache=False).logits
            lg, _, mask = label_positions(logits, full.labels, bb.arch)
            out += [lg[i, :int(mask[i].sum())].float() for i in range(lg.shape[0])]
    finally:
        if hooks is not None:
            hooks.remove()
    return out


@torch.no_grad()
def student_logits(cfg, bb, student, pairs, settings, chunk: int = 32) -> list[torch.Tensor]:
    from tagi_ds.data.collate import collate_student
    from tagi_ds.train.losses import student_label_logits

    out = []
    for s in range(0, len(pairs), chunk):
        sb = collate_student(pairs[s:s + chunk], bb.tokenizer, settings)
        enc = student.encode_instructions(sb.instr_ids, sb.instr_mask)
        lg, _, mask = student_label_logits(student, enc, sb)
        out += [lg[i, :int(mask[i].sum())].float() for i in range(lg.shape[0])]
    return out


def load_students(cfg, bb, run: Path, variant: str):
    from tagi_ds.modeling.backbone import load_backbone
    from tagi_ds.train.hypernet_loop import config_student
    from tagi_ds.train.engine import seed_everything
    from tagi_ds.run.export_io import load_student_from_export

    def backbone():
        return load_backbone(bb.path, bb.arch, cfg.backbone.dtype, cfg.backbone.attn_implementation)[0]

    pre = run / "pretrain" / "export"
    if (pre / "config.json").is_file():
        fresh, fresh_name = load_student_from_export(pre, backbone=backbone(), backend="reference"), "pretrain export"
    else:
        seed_everything(cfg.seed)
        fresh = config_student(cfg, backbone(), bb.arch, backend="reference")[0].eval()
        fresh_name = "hypernetwork at init"
    trained = load_student_from_export(run / "finetune" / variant / "export", backbone=backbone(), backend="reference")
    return [(f"fresh ({fresh_name})", fresh), (f"trained (finetune/{variant})", trained)]


# ------------------------------------------------------------------------------------------------ measuring
def pad(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (L_i, V) -> (N, L, V) zero-padded, and the (N, L) left-aligned mask."""
    L = max(r.shape[0] for r in rows)
    out = torch.zeros(len(rows), L, rows[0].shape[1])
    mask = torch.zeros(len(rows), L, dtype=torch.bool)
    for i, r in enumerate(rows):
        out[i, :r.shape[0]], mask[i, :r.shape[0]] = r, True
    return out, mask


def teacher_batch(est: Estimator, t_rows, keys, T: float, draw: int):
    rows = []
    for logits, (task, iid) in zip(t_rows, keys):
        gen = instance_generator(est.mode.seed + draw, task, iid) if est.random else None
        rows.append(decode_rows(encode_rows(logits, est.mode, T, gen)))
    return stack_rows(est.mode, rows, [r.shape[0] for r in t_rows])


def per_token(est: Estimator, z: torch.Tensor, tb, mask: torch.Tensor, T: float) -> torch.Tensor:
    """(M,) T^2 * per-position estimate over the valid positions."""
    sel = lambda x: x[mask]  # noqa: E731
    if isinstance(tb, TopKTeacher):
        v = sparse_kl.token_kl(sel(z), sel(tb.logprobs), sel(tb.ids), T, est.missing_mass)
    else:
        w = tb.weights(est.estimator) if isinstance(tb, SampledTeacher) else tb.weights()
        v = sampled_kl.token_kl(sel(z), sel(tb.logprobs), sel(tb.ids), sel(w), T, est.control)
    return v * T * T


def gradient(loss_fn, z: torch.Tensor) -> torch.Tensor:
    leaf = z.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(loss_fn(leaf), leaf)
    return g


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def measure(est: Estimator, z, t_logits, mask, t_rows, keys, T, draws, micro_rows):
    dense_tok = (torch.log_softmax(t_logits / T, -1).exp() * (torch.log_softmax(t_logits / T, -1)
                                                              - torch.log_softmax(z / T, -1))).sum(-1)[mask] * T * T
    g_dense = gradient(lambda s: sparse_kl.dense_kl(s, t_logits, mask, T), z)
    tok_row = mask.nonzero()[:, 0]  # (M,) row of each valid position
    mbs = [(s, min(s + micro_rows, z.shape[0])) for s in range(0, z.shape[0], micro_rows)]
    means, mb_err, tok_dev, cos_mb, cos_all, g_sum = [], [], [], [], [], torch.zeros_like(z)
    for d in range(draws if est.random else 1):
        tb = teacher_batch(est, t_rows, keys, T, d)
        tok = per_token(est, z, tb, mask, T)
        g = gradient(lambda s: signal_kl(s, mask, tb, T, missing_mass=est.missing_mass, estimator=est.estimator,
                                             control=est.control), z)
        means.append(float(tok.mean()))
        tok_dev.append(tok - dense_tok)
        cos_all.append(cosine(g[mask], g_dense[mask]))
        g_sum += g
        for s, e in mbs:
            sel = (tok_row >= s) & (tok_row < e)
            dm = float(dense_tok[sel].mean())
            mb_err.append((float(tok[sel].mean()) - dm) / dm)
            cos_mb.append(cosine(g[s:e][mask[s:e]], g_dense[s:e][mask[s:e]]))
    dense = float(dense_tok.mean())
    m = torch.tensor(means, dtype=torch.float64)
    bias = float(m.mean() - dense) / dense
    se = float(m.std() / math.sqrt(len(means))) / dense if len(means) > 1 else 0.0
    dev = torch.cat(tok_dev)
    return {"bias": 100 * bias, "se2": 200 * se, "mb_rms": 100 * math.sqrt(sum(x * x for x in mb_err) / len(mb_err)),
            "tok_sd": 100 * float(dev.std()) / dense, "cos_mb": sum(cos_mb) / len(cos_mb),
            "cos_all": sum(cos_all) / len(cos_all), "cos_mean": cosine(g_sum[mask], g_dense[mask]), "dense": dense}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, default=Path("runs/tiny"), help="a finished run folder (default: the demo's)")
    p.add_argument("--variant", default="tagi", help="finetune variant of the trained student")
    p.add_argument("--tasks", type=int, default=8, help="training tasks measured")
    p.add_argument("--instances", type=int, default=16, help="instances per task")
    p.add_argument("--draws", type=int, default=8, help="independent caches per sampled mode")
    p.add_argument("--micro-rows", type=int, default=32, help="rows per micro batch (finetune: 4 tasks x 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--allow-unfinished", action="store_true", help="use a run without report.md (its exports must "
                   "exist)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    cfg, bb, tasks, settings = load_run(a.run, a.allow_unfinished)
    T = float(cfg.finetune.temperature)
    pairs = pick_rows(tasks, a.tasks, a.instances)
    keys = [(t.name, inst.id) for t, inst in pairs]
    t_rows = teacher_logits(cfg, bb, pairs, settings)
    t_logits, mask = pad(t_rows)
    V = t_logits.shape[-1]
    kept = torch.topk(torch.log_softmax(t_logits[mask] / T, -1), 32).values.exp().sum(-1).mean()
    print(f"run {a.run} ({bb.arch}, V={V}, T={T}): {len(pairs)} rows of {a.tasks} tasks, {int(mask.sum())} label "
          f"positions; teachers' top-32 mass at T: {kept:.3f}; {a.draws} draws per sampled mode "
          f"(setup {time.perf_counter() - t0:.0f} s)")
    for name, student in load_students(cfg, bb, a.run, a.variant):
        s_rows = student_logits(cfg, bb, student, pairs, settings)
        if [r.shape[0] for r in s_rows] != [r.shape[0] for r in t_rows]:
            raise SystemExit("student and teacher label positions differ")
        z, _ = pad(s_rows)
        rows = [(est, measure(est, z, t_logits, mask, t_rows, keys, T, a.draws, a.micro_rows))
                for est in estimators(a.seed)]
        dense = rows[0][1]["dense"]
        print(f"\n{name}: dense T^2 KL = {dense:.4f} per label position")
        print(f"{'mode':<26}{'B/tok':>6}{'bias%':>9}{'+-2se':>7}{'mb rms%':>9}{'tok sd%':>9}{'cos mb':>8}"
              f"{'cos all':>9}{'cos mean':>9}")
        for est, r in rows:
            print(f"{est.label:<26}{est.bytes_per_token(V):>6}{r['bias']:>9.2f}{r['se2']:>7.2f}{r['mb_rms']:>9.2f}"
                  f"{r['tok_sd']:>9.1f}{r['cos_mb']:>8.4f}{r['cos_all']:>9.4f}{r['cos_mean']:>9.4f}")
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
