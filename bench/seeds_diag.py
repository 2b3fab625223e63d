"""What distillation did, per finished run (bench/seeds.py --diagnose): for every hypernetwork method, against the
teachers, on the seen tasks' held-back instances and on the unseen PARAPHRASES (an unseen paraphrase asks for the
same operation as a seen primitive, so that primitive's teacher is a teacher of the unseen task too; the unseen
compositions have none and are left out):

  kl        mean over label tokens of KL(teacher ‖ student) at T = 1, the student reading instruction + input and the
            teacher its own prompt (teacher.prompt / teacher.base): how close the student's answers are to the
            teacher's distribution
  l_ins     mean over (module, layer) of ‖ΔW_gen − ΔW_teacher‖²_F / ‖ΔW_teacher‖²_F (the L_ins term's own value)
  cos       mean over (module, layer) of the cosine between ΔW_gen and ΔW_teacher (Frobenius inner product)
  norm      mean over (module, layer) of ‖ΔW_gen‖_F / ‖ΔW_teacher‖_F

Written to <run>/diagnosis.json; bench/seeds.py averages it over seeds.
"""
from __future__ import annotations

import json
import math
from typing import Callable, Optional

import torch

from tagi_ds.data.collate import collate_full, collate_student
from tagi_ds.distill.l_ins import delta_w_distance
from tagi_ds.eval.evaluate import method_for
from tagi_ds.eval.scoring import eval_splits
from tagi_ds.modeling.label_logits import label_positions
from tagi_ds.run.backbone import load_run_backbone
from tagi_ds.run.paths import RunPaths
from tagi_ds.run.peft_io import read_peft_adapter
from tagi_ds.run.prompts import prompt_settings, teacher_reads_instruction
from tagi_ds.run.units import teacher_unit
from tagi_ds.train.cache_writer import teacher_base
from tagi_ds.train.losses import student_label_logits

KEYS = ("kl", "l_ins", "cos", "norm")


def _pairs(splits: dict, train_names: set[str]) -> dict[str, list[tuple]]:
    """split → [(task, name of the training task whose teacher answers it)]."""
    seen = [(t, t.name) for t in splits.get("seen", []) if t.name in train_names]
    by_op = {}
    for t in splits.get("seen", []):
        by_op[(tuple(t.meta.get("ops", ())), t.meta.get("x"))] = t.name
    para = []
    for t in splits.get("unseen_paraphrase", []):
        src = by_op.get((tuple(t.meta.get("ops", ())), t.meta.get("x")))
        if src is not None:  # 'contains X' with another X is another function: no teacher
            para.append((t, src))
    return {"seen": seen, "unseen_paraphrase": para}


def _delta_stats(gen: dict, s_g: float, teacher: dict, s_t: float, i: int) -> dict[str, float]:
    """l_ins, cos and norm ratio of generated task i against one teacher, averaged over (module type, layer)."""
    l_ins, cos, norm = [], [], []
    for mt, (A_g, B_g) in gen.items():
        A_t, B_t = teacher[mt]
        a, b = A_g[i].double(), B_g[i].double()  # (L, r, d_in), (L, d_out, r)
        at, bt = A_t.double(), B_t.double()
        d = delta_w_distance(a, b, s_g, at, bt, s_t, normalize=False)  # (L,)
        g2 = delta_w_distance(a, b, s_g, at * 0, bt, s_t, normalize=False)
        t2 = delta_w_distance(a * 0, b, s_g, at, bt, s_t, normalize=False)
        l_ins += (d / t2).tolist()
        cos += ((g2 + t2 - d) / (2 * (g2 * t2).sqrt().clamp_min(1e-30))).tolist()
        norm += (g2 / t2).sqrt().tolist()
    return {"l_ins": sum(l_ins) / len(l_ins), "cos": sum(cos) / len(cos), "norm": sum(norm) / len(norm)}


@torch.no_grad()
def diagnose(cfg, methods: Optional[list[str]] = None, log: Callable[[str], None] = print,
             max_instances: int = 30) -> dict:
    """The table of the module docstring for each hypernetwork method of the run (cached in <run>/diagnosis.json)."""
    from tagi_ds.data.registry import load_run_tasks_from_config

    path = cfg.run_dir / "diagnosis.json"
    if path.is_file():
        return json.loads(path.read_text())
    paths = RunPaths.of(cfg)
    bb = load_run_backbone(cfg)
    splits = eval_splits(cfg)
    train = {t.name: t for t in load_run_tasks_from_config(cfg)["train"]}
    groups = _pairs(splits, set(train))
    settings = prompt_settings(cfg, bb.arch)
    tok = bb.tokenizer
    methods = [m for m in (methods or cfg.eval.methods) if m in ("hint", "tagi") or m.startswith("tagi_")]
    out: dict = {"methods": {}, "tasks": {k: [f"{t.name}<-{s}" for t, s in v] for k, v in groups.items()}}
    for name in methods:
        m = method_for(cfg, name, splits, bb, log)
        if m is None:
            continue
        res: dict = {}
        with m.session():
            st = m.student
            for split, pairs in groups.items():
                acc = {k: [] for k in KEYS}
                for task, src in pairs:
                    insts = [(task, inst) for inst in task.instances[:max_instances]]
                    sb = collate_student(insts, tok, settings).to(bb.device)
                    enc = st.encode_instructions(sb.instr_ids, sb.instr_mask)
                    gen = st.generate_adapters(enc)
                    s_lg, _, mask = student_label_logits(st, enc, sb, gen)
                    ad, s_t, _ = read_peft_adapter(paths.teacher(teacher_unit(train[src], cfg.teacher.group_by)),
                                                   bb.specs, device=bb.device)
                    one = {k: (a[None], b[None] * (s_t / st.lora_scale)) for k, (a, b) in ad.items()}
                    full = collate_full(insts, tok, settings, with_instruction=teacher_reads_instruction(cfg))
                    full = full.to(bb.device)
                    with teacher_base(cfg, bb), st.hooks.apply(one, torch.zeros_like(full.task_ids)):
                        t_out = bb.model(input_ids=full.input_ids, attention_mask=full.attention_mask,
                                         use_cache=False) if bb.arch == "llama" else bb.model(
                            input_ids=full.input_ids, attention_mask=full.attention_mask,
                            decoder_input_ids=bb.model._shift_right(full.labels), use_cache=False)
                    t_lg, _, t_mask = label_positions(t_out.logits, full.labels, bb.arch)
                    t_lp = torch.log_softmax(t_lg.double(), -1)
                    s_lp = torch.log_softmax(s_lg.double(), -1)
                    kl = ((t_lp.exp() * (t_lp - s_lp)).sum(-1) * mask).sum() / mask.sum()
                    acc["kl"].append(float(kl))
                    for k, v in _delta_stats(gen, st.lora_scale, ad, s_t, 0).items():
                        acc[k].append(v)
                res[split] = {k: (sum(v) / len(v) if v else math.nan) for k, v in acc.items()}
                res[split]["tasks"] = len(pairs)
        out["methods"][name] = res
        log(f"diagnose {name}: " + "; ".join(f"{sp} " + ", ".join(f"{k} {v[k]:.3f}" for k in KEYS)
                                              for sp, v in res.items()))
    from tagi_ds.io_utils import atomic_write_json

    atomic_write_json(path, out)
    return out
