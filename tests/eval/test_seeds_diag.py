"""bench/seeds_diag.py on the micro run (2 trained tasks, random teachers, a 3-step TAGI): each unseen paraphrase is
paired with the seen primitive of the same operation, and its numbers equal independent computations: the KL from a
merged copy of the backbone, L_ins from distill.l_ins.l_ins_per_task."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

from tests.train import recipe_worker as W
from tagi_ds.config import load_config
from tagi_ds.data.collate import collate_full, collate_student
from tagi_ds.distill.l_ins import l_ins_per_task
from tagi_ds.eval.scoring import eval_splits
from tagi_ds.modeling.label_logits import label_positions
from tagi_ds.modeling.lora import merge_into_copy
from tagi_ds.run.export_io import load_student_from_export
from tagi_ds.run.paths import RunPaths
from tagi_ds.run.peft_io import read_peft_adapter
from tagi_ds.run.prompts import prompt_settings
from tagi_ds.train import finetune
from tagi_ds.train.losses import student_label_logits

REPO = Path(__file__).resolve().parents[2]


def _diag_module():
    sys.path.insert(0, str(REPO / "bench"))
    spec = importlib.util.spec_from_file_location("seeds_diag", REPO / "bench" / "seeds_diag.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["seeds_diag"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_diagnosis_pairs_paraphrases_and_matches_hand_computations(tmp_path):
    yaml, sets = W.tiny_finetune_run(tmp_path)
    cfg = load_config(yaml, sets + ["eval.methods=[tagi]", "data.max_eval_instances_per_task=3"])
    finetune.run(cfg, "tagi", progress=False)
    out = _diag_module().diagnose(cfg, log=lambda _m: None, max_instances=3)
    assert out["tasks"]["seen"] == ["synth_first<-synth_first", "synth_second<-synth_second"]
    assert out["tasks"]["unseen_paraphrase"] == ["synth_para_first<-synth_first", "synth_para_second<-synth_second"]
    got = out["methods"]["tagi"]
    assert got["unseen_paraphrase"]["tasks"] == 2 and (cfg.run_dir / "diagnosis.json").is_file()

    # by hand, the unseen paraphrases: student from the export, teacher merged into a copy of the backbone
    paths = RunPaths.of(cfg)
    st = load_student_from_export(paths.finetune_export("tagi")).eval()
    tok_path = cfg.backbone.tokenizer or cfg.backbone.name_or_path
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_path)
    settings = prompt_settings(cfg, "llama")
    para = {t.name: t for t in eval_splits(cfg)["unseen_paraphrase"]}
    kls, lins = [], []
    for name, src in (("synth_para_first", "synth_first"), ("synth_para_second", "synth_second")):
        task = para[name]
        pairs = [(task, i) for i in task.instances[:3]]
        sb = collate_student(pairs, tok, settings)
        with torch.no_grad():
            enc = st.encode_instructions(sb.instr_ids, sb.instr_mask)
            gen = st.generate_adapters(enc)
            s_lg, _, mask = student_label_logits(st, enc, sb, gen)
            ad, s_t, _ = read_peft_adapter(paths.teacher(src), st.specs)
            merged = merge_into_copy(st.backbone, st.specs, {k: (a[None], b[None]) for k, (a, b) in ad.items()}, 0,
                                     s_t)
            full = collate_full(pairs, tok, settings)
            t_lg, _, _ = label_positions(merged(input_ids=full.input_ids, attention_mask=full.attention_mask).logits,
                                         full.labels, "llama")
        p_t, lp_s = torch.softmax(t_lg.double(), -1), torch.log_softmax(s_lg.double(), -1)
        kls.append(float(((p_t * (p_t.log() - lp_s)).sum(-1) * mask).sum() / mask.sum()))
        lins.append(float(l_ins_per_task(gen, st.lora_scale, [(ad, s_t)])[0]))
    assert abs(got["unseen_paraphrase"]["kl"] - sum(kls) / 2) < 1e-4 * max(1.0, abs(sum(kls)))
    assert abs(got["unseen_paraphrase"]["l_ins"] - sum(lins) / 2) < 1e-4 * max(1.0, sum(lins))
    assert -1.0 <= got["unseen_paraphrase"]["cos"] <= 1.0 and got["unseen_paraphrase"]["norm"] > 0
