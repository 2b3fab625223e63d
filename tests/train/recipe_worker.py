"""Recipe test helpers and the launched worker.

Helpers (imported by the tests): a tiny tokenizer + T5/LLaMA backbone, random PEFT teachers and a logit cache built
for a run config, written once per session.

Worker (run under torchrun, or as one plain process): each `--phase` JSON runs one stage in the same processes:
  {"stage": "pretrain"|"finetune", "config": yaml, "set": [key=value...], "variant": "tagi",
   "stall_after_save": step (record pids, then sleep until killed), "dump_adapters": path (rank 0 saves the trained
   hypernetwork's adapters for the first two tasks), "reload_export": [export_dir, dump_path, out_path]}
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from tests.tiny import small_backbone_dir


def build_backbone(arch: str, out_dir: Path, seed: int = 0) -> Path:
    """The recipes' tiny backbone folder (tests.tiny.small_backbone_dir)."""
    return small_backbone_dir(out_dir, arch, seed)


TINY_FINETUNE_YAML = (
    "seed: 0\ndevice: cpu\ndata: {source: synthetic, max_tasks: 2, max_source_length: 96, max_input_length: 24,\n"
    "  max_target_length: 8, num_pos_examples: 1, pretrain_text: offline,\n"
    "  synthetic: {instances_per_task: 6, held_back_per_task: 2}}\n"
    "lora: {r: 4, alpha: 8.0}\nhypernet: {hidden: 16, trunk_layers: 1, embed_dim: 8, kernel: reference}\n"
    "cache: {top_k: 8, temperature: 2.0}\n"
    "finetune: {steps: 3, lr: 0.003, warmup_steps: 1, tasks_per_batch: 2, instances_per_task: 4, log_every: 1,\n"
    "  checkpoint_every: 0, lambda_kl: 1.0, lambda_ins: 0.0, temperature: 2.0}\n"
    "distributed: {use_deepspeed: false}\n")


def tiny_finetune_run(root: Path, *extra: str) -> tuple[Path, list[str]]:
    """A one-process, 3-step finetune on 2 synthetic tasks with a tiny LLaMA and random teachers + cache (in the
    cache mode `extra` may set), all under `root`. Returns (config YAML, overrides) for `load_config`."""
    from tagi_ds.config import load_config

    bb = build_backbone("llama", root / "bb")
    yaml = root / "c.yaml"
    yaml.write_text(TINY_FINETUNE_YAML)
    sets = [f"runs_dir={root / 'runs'}", "name=r", f"backbone.name_or_path={bb}", *extra]
    write_teachers_and_cache(load_config(yaml, sets))
    return yaml, sets


def write_teachers_and_cache(cfg, seed: int = 0) -> list[str]:
    """A random PEFT teacher per training task under <run>/teachers/, and its logit-cache shard (random teacher
    logits at the student's label positions) under <run>/logit_cache/, with the manifests the finetune expects."""
    from transformers import AutoConfig, AutoTokenizer

    from tagi_ds.data.collate import encode_target
    from tagi_ds.data.registry import load_run_tasks_from_config
    from tagi_ds.distill.logit_cache import CacheShardWriter, tokenizer_hash
    from tagi_ds.modeling.backbone import detect_arch, target_specs
    from tagi_ds.run.artifacts import record_teacher_stat, shard_fields
    from tagi_ds.run.backbone import backbone_identity
    from tagi_ds.run.paths import RunPaths
    from tagi_ds.run.peft_io import write_peft_adapter
    from tagi_ds.run.prompts import prompt_settings

    paths = RunPaths.of(cfg)
    path = cfg.backbone.name_or_path
    tok = AutoTokenizer.from_pretrained(path)
    mconf = AutoConfig.from_pretrained(path)
    arch = detect_arch(mconf)
    specs = target_specs(mconf, cfg.backbone.target_modules)
    settings = prompt_settings(cfg, arch)
    tasks = load_run_tasks_from_config(cfg)["train"]
    g = torch.Generator().manual_seed(seed)
    r = cfg.lora.r
    for task in tasks:
        adapters = {}
        for s in specs:
            n_layers = max(x.layer for x in specs if x.module_type == s.module_type) + 1
            if s.module_type not in adapters:
                adapters[s.module_type] = (torch.randn(n_layers, r, s.d_in, generator=g) * 0.2,
                                           torch.randn(n_layers, s.d_out, r, generator=g) * 0.2)
        write_peft_adapter(paths.teacher(task.name), specs, adapters, r=r, alpha=cfg.lora.alpha, base_model=str(path),
                           task_type="SEQ_2_SEQ_LM" if arch == "t5" else "CAUSAL_LM",
                           extra_files={"manifest.json": {"unit": task.name, "test": True}})
        fields = shard_fields(cfg, task, arch=arch, tokenizer_hash=tokenizer_hash(tok), backbone_id=backbone_identity(path),
                              teacher_dir=paths.teacher(task.name), vocab_size=mconf.vocab_size, settings=settings)
        with CacheShardWriter(paths.logit_cache, task.name, fields) as w:
            for inst in task.instances:
                L = len(encode_target(tok, inst.label, settings.max_target_length))
                w.add(inst.id, torch.randn(L, mconf.vocab_size, generator=g) * 3.0)
        record_teacher_stat(paths.cache_shard(task.name), paths.teacher(task.name) / "adapter_model.safetensors")
    return [t.name for t in tasks]


# ------------------------------------------------------------------------------------------------ worker
def _stall(step_wanted: int, pid_dir: Path):
    def cb(step: int) -> None:
        if step == step_wanted:
            from tagi_ds.run.dist import rank

            pid_dir.mkdir(parents=True, exist_ok=True)
            (pid_dir / f"pid_rank{rank()}").write_text(str(os.getpid()))
            while True:  # the test SIGKILLs us here, right after a complete checkpoint
                time.sleep(1)
    return cb


def run_phase(ph: dict) -> None:
    from tagi_ds.config import load_config
    from tagi_ds.run.identity import check_stage_record
    from tagi_ds.run.paths import RunPaths
    from tagi_ds.train import finetune, pretrain
    from tagi_ds.run.dist import rank
    from tagi_ds.train.engine_stage import train_stage
    from tagi_ds.train.hypernet_loop import setup_student

    if ph.get("reload_export"):
        reload_export(*ph["reload_export"])
        return
    cfg = load_config(ph["config"], ph.get("set", []))
    cb = _stall(ph["stall_after_save"], Path(ph["pid_dir"])) if ph.get("stall_after_save") else None
    if ph["stage"] == "pretrain":
        loop, micro = cfg.pretrain, cfg.pretrain.micro_batch_size
        record = check_stage_record(RunPaths.of(cfg).pretrain, "pretrain", pretrain.identity(cfg))
        setup = setup_student(cfg, micro_batch=micro, loop=loop)
        spec = pretrain.build_stage(cfg, setup, record)
    else:
        variant = ph.get("variant", "tagi")
        loop, micro = cfg.finetune, cfg.finetune.tasks_per_batch * cfg.finetune.instances_per_task
        finetune.check_config(cfg, variant)
        record = check_stage_record(RunPaths.of(cfg).finetune(variant), "finetune", finetune.identity(cfg))
        setup = setup_student(cfg, micro_batch=micro, loop=loop)
        spec = finetune.build_stage(cfg, variant, setup, record)
    train_stage(setup, spec, on_checkpoint=cb, show_progress=False)
    if ph.get("dump_adapters"):
        with torch.no_grad():  # collective under ZeRO-3: every rank runs the backbone and the hypernetwork
            b = spec.batches.batch(0).to(setup.device)
            enc = setup.student.encode_instructions(b.instr_ids, b.instr_mask).select([0, 1])
            ad = setup.student.generate_adapters(enc)
        if rank() == 0:
            torch.save({"pooled": enc.pooled, "adapters": {k: (a.cpu(), b.cpu()) for k, (a, b) in ad.items()}},
                       ph["dump_adapters"])


def reload_export(export_dir: str, dump_path: str, out_path: str) -> None:
    """Load the export with no DeepSpeed and regenerate the adapters of the dumped task vectors."""
    from tagi_ds.run.export_io import load_hypernet_from_export, load_student_from_export

    student = load_student_from_export(export_dir, backend="reference")
    hyper, cfg = load_hypernet_from_export(export_dir, backend="reference")
    dump = torch.load(dump_path, weights_only=False)
    with torch.no_grad():
        got = student.hypernet(dump["pooled"])
        got2 = hyper(dump["pooled"])
    diff = max(max(float((got[k][i] - dump["adapters"][k][i]).abs().max()) for i in (0, 1)) for k in got)
    diff2 = max(max(float((got2[k][i] - dump["adapters"][k][i]).abs().max()) for i in (0, 1)) for k in got2)
    Path(out_path).write_text(json.dumps({"max_abs_diff": diff, "max_abs_diff_hypernet_only": diff2,
                                          "deepspeed_imported": "deepspeed" in sys.modules,
                                          "backbone_id": cfg["backbone_id"], "fusion": cfg["fusion"],
                                          "n_specs": len(cfg["hypernet"]["specs"])}))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--phase", action="append", default=[])
    args = p.parse_args()
    torch.set_num_threads(1)
    for ph in args.phase:
        run_phase(json.loads(ph))
    return 0


if __name__ == "__main__":
    sys.exit(main())
