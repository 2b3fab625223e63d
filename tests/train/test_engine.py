"""In-process engine tests (no launcher, plain torch loop): schedule, DeepSpeed config filling, checkpoints and
resume, integrity errors, export reload, activation checkpointing, TensorBoard logs. Real DeepSpeed launches are in
test_engine_distributed.py."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.train import engine_standin as S
from tagi_ds.errors import ArtifactMismatchError, ConfigError
from tagi_ds.run.export_io import load_trainable
from tagi_ds.train.checkpoint import export_trainable, read_latest
from tagi_ds.train.distributed import ds_config_from_file, global_token_mean
from tagi_ds.modeling.backbone import enable_hf_checkpointing
from tagi_ds.train.engine import Engine
from tagi_ds.train.schedule import lr_multiplier, make_scheduler

REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------------ schedule
def test_lr_schedule_matches_hand_computed_values():
    kw = dict(warmup_steps=4, total_steps=12)
    assert [lr_multiplier(s, schedule="linear", **kw) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_multiplier(4, schedule="linear", **kw) == 1.0
    assert lr_multiplier(8, schedule="linear", **kw) == 0.5
    assert lr_multiplier(12, schedule="linear", **kw) == 0.0 and lr_multiplier(30, schedule="linear", **kw) == 0.0
    assert lr_multiplier(6, schedule="cosine", **kw) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_multiplier(8, schedule="cosine", **kw) == pytest.approx(0.5)
    assert lr_multiplier(11, schedule="constant", **kw) == 1.0
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    sched = make_scheduler(opt, schedule="linear", **kw)
    seen = []
    for _ in range(10):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.1 * lr_multiplier(s, schedule="linear", **kw) for s in range(10)])
    with pytest.raises(ConfigError, match="schedule"):
        make_scheduler(opt, schedule="exp", **kw)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- ds config
def _fill(path, **over):
    kw = dict(micro_batch=2, grad_accum=3, lr=1e-3, weight_decay=0.01, grad_clip=1.0, dtype="bfloat16",
              world_size=4)
    kw.update(over)
    return ds_config_from_file(path, **kw)


@pytest.mark.parametrize("name,stage", [("zero2.json", 2), ("zero3.json", 3), ("zero3_offload.json", 3)])
def test_shipped_ds_configs_fill_every_auto(name, stage):
    cfg = _fill(REPO / "ds_configs" / name)
    assert cfg["train_micro_batch_size_per_gpu"] == 2 and cfg["gradient_accumulation_steps"] == 3
    assert cfg["train_batch_size"] == 24 and cfg["gradient_clipping"] == 1.0
    assert cfg["bf16"]["enabled"] is True and cfg["fp16"]["enabled"] is False
    assert cfg["zero_optimization"]["stage"] == stage and cfg["zero_allow_untested_optimizer"] is True
    assert "auto" not in json.dumps(cfg)
    if stage == 3:
        assert cfg["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    if "offload" in name:
        zo = cfg["zero_optimization"]
        assert zo["offload_optimizer"]["device"] == "cpu" and zo["offload_param"]["device"] == "cpu"
        assert cfg["zero_force_ds_cpu_optimizer"] is False  # torch AdamW client optimizer, no cpu_adam build
    fp32 = _fill(REPO / "ds_configs" / name, dtype="float32", zero_stage=2, param_persistence_threshold=0)
    assert fp32["bf16"]["enabled"] is False and fp32["zero_optimization"]["stage"] == 2
    assert fp32["zero_optimization"]["stage3_param_persistence_threshold"] == 0


def test_ds_config_errors_name_file_and_key(tmp_path):
    def write(obj_or_text) -> Path:
        p = tmp_path / "ds.json"
        p.write_text(obj_or_text if isinstance(obj_or_text, str) else json.dumps(obj_or_text))
        return p

    with pytest.raises(ConfigError, match=r"ds\.json: line 2.*malformed JSON"):
        _fill(write('{"train_batch_size": "auto",\n  oops}'))
    with pytest.raises(ConfigError, match=r"ds\.json: key 'train_micro_batch_size_per_gpu' must be"):
        _fill(write({"train_micro_batch_size_per_gpu": "eight", "zero_optimization": {"stage": 2}}))
    with pytest.raises(ConfigError, match=r"key 'gradient_accumulation_steps' is 5 but the recipe gives 3"):
        _fill(write({"gradient_accumulation_steps": 5, "zero_optimization": {"stage": 2}}))
    with pytest.raises(ConfigError, match=r"key 'bf16.enabled' must be"):
        _fill(write({"bf16": {"enabled": "yes"}, "zero_optimization": {"stage": 2}}))
    with pytest.raises(ConfigError, match="key 'scheduler' is not allowed"):
        _fill(write({"scheduler": {"type": "WarmupLR"}, "zero_optimization": {"stage": 2}}))
    with pytest.raises(ConfigError, match=r"key 'zero_optimization.sub_group_size' is \"auto\""):
        _fill(write({"zero_optimization": {"stage": 2, "sub_group_size": "auto"}}))
    # a ZeRO-3 size key set to "auto" without a model to size it from: DeepSpeed's default (the key dropped)
    assert "reduce_bucket_size" not in _fill(write({"zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"}}))[
        "zero_optimization"]
    with pytest.raises(ConfigError, match=r"key 'zero_optimization.stage' must be 0, 1, 2 or 3"):
        _fill(write({"zero_optimization": {"stage": 4}}))
    with pytest.raises(ConfigError, match="not found"):
        _fill(tmp_path / "missing.json")
    cfg = _fill(write({"optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto",
                                                                 "torch_adam": True}},
                       "zero_optimization": {"stage": 2}}))
    assert cfg["optimizer"]["params"] == {"lr": 1e-3, "weight_decay": 0.01, "torch_adam": True}


def test_zero3_sizes_come_from_the_model_and_explicit_numbers_win(tmp_path):
    """Issue 20: the shipped 1e5 persistence threshold kept 37 of a tiny model's 38 tensors whole and the 1e9 live
    parameters let a small model be gathered whole. "auto" sizes now follow the backbone (transformers' rules for
    the threshold and buckets, at most 1/64 of the model gathered at once, never less than its largest tensor)."""
    from transformers import LlamaForCausalLM

    from tagi_ds.modeling.tiny import tiny_llama_config
    from tagi_ds.train.distributed import ModelSizes, model_sizes

    config = tiny_llama_config(vocab_size=400, hidden_size=64, intermediate_size=176)
    sizes = model_sizes(config, "llama")
    real = LlamaForCausalLM(config)
    assert sizes == ModelSizes(64, sum(p.numel() for p in real.parameters()),
                               max(p.numel() for p in real.parameters()))
    zo = _fill(REPO / "ds_configs" / "zero3.json", sizes=sizes)["zero_optimization"]
    assert zo["stage3_param_persistence_threshold"] == 640 and zo["stage3_prefetch_bucket_size"] == int(0.9 * 64 ** 2)
    assert zo["reduce_bucket_size"] == 64 ** 2
    assert zo["stage3_max_live_parameters"] == zo["stage3_max_reuse_distance"] == max(sizes.total // 64, sizes.largest)
    below = [n for n, p in real.named_parameters() if p.numel() < zo["stage3_param_persistence_threshold"]]
    assert below and all("norm" in n for n in below)  # only the norms stay whole
    big = ModelSizes(hidden=4096, total=6_738_415_616, largest=131_072_000)  # LLaMA-2-7B
    assert big.zero3_values()["stage3_max_live_parameters"] == 131_072_000  # the embedding: above 1/64 of 7B
    p = tmp_path / "mine.json"
    p.write_text(json.dumps({"zero_optimization": {"stage": 3, "stage3_max_live_parameters": 123}}))
    mine = _fill(p, sizes=sizes)["zero_optimization"]
    assert mine["stage3_max_live_parameters"] == 123  # the user's number kept; an absent key is sized like "auto"
    assert mine["stage3_prefetch_bucket_size"] == int(0.9 * 64 ** 2)


def test_global_token_mean_one_process():
    loss = global_token_mean(torch.tensor(6.0), torch.tensor(4))
    assert loss.item() == 1.5
    assert global_token_mean(torch.tensor(0.0), 0).item() == 0.0  # an empty batch does not divide by zero


# ------------------------------------------------------------------------------------------- plain engine
def _model(arch: str = "llama", hyper_seed: int = 0) -> S.StandIn:
    torch.manual_seed(0)
    return S.StandIn(arch, S.model_class(arch).from_config(S.tiny_config(arch)), hyper_seed=hyper_seed)


def _engine(model, out: Path, **kw) -> Engine:
    args = dict(lr=1e-2, warmup_steps=2, total_steps=8, schedule="linear", weight_decay=0.01, grad_clip=1.0,
                use_deepspeed=False, out_dir=out, seed=0, show_progress=False, keep_checkpoints=2)
    args.update(kw)
    return Engine(model, None, **args)


def _train(eng: Engine, steps: range, save_at: tuple = ()) -> list[float]:
    losses = []
    for step in steps:
        loss_sum, n = eng(S.make_batch("llama", step, 0, 1))
        loss = global_token_mean(loss_sum, n)
        eng.backward(loss)
        assert eng.step(tokens=int(n))
        losses.append(loss.item())
        if step + 1 in save_at:
            eng.save(step + 1, {"data_position": step + 1})
    return losses


def test_plain_engine_resume_reproduces_the_uninterrupted_run(tmp_path):
    eng = _engine(_model(), tmp_path / "a")
    frozen_before = {n: p.clone() for n, p in eng.module.backbone.named_parameters()}
    first = _train(eng, range(3), save_at=(3,))
    rng_after_save = torch.rand(3)
    rest = _train(eng, range(3, 6))
    assert all(torch.equal(p, frozen_before[n]) for n, p in eng.module.backbone.named_parameters())  # stays frozen

    eng2 = _engine(_model(hyper_seed=7), tmp_path / "a")  # other init: everything must come from the checkpoint
    progress = eng2.resume_latest()
    assert progress["data_position"] == 3 and progress["seed"] == 0 and eng2.global_step == 3
    assert torch.equal(torch.rand(3), rng_after_save)  # RNG states restored
    assert eng2.lr == pytest.approx(1e-2 * lr_multiplier(3, warmup_steps=2, total_steps=8, schedule="linear"))
    assert _train(eng2, range(3, 6)) == rest
    assert first[0] > 0
    saved = torch.load(tmp_path / "a" / "checkpoints" / "step00000003" / "trainable.pt")
    assert saved and all(k.startswith("hyper.") for k in saved)  # the frozen backbone is never checkpointed


def test_grad_accumulation_steps_only_at_the_boundary(tmp_path):
    eng = _engine(_model(), tmp_path, grad_accum=2)
    flags = []
    for step in range(4):
        loss_sum, n = eng(S.make_batch("llama", step, 0, 1))
        eng.backward(global_token_mean(loss_sum, n))
        flags.append(eng.step())
    assert flags == [False, True, False, True] and eng.global_step == 2


def test_checkpoint_rotation_and_integrity_errors(tmp_path):
    eng = _engine(_model(), tmp_path)
    _train(eng, range(4), save_at=(1, 2, 3, 4))
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["step00000003", "step00000004"]
    assert read_latest(root) == "step00000004"
    (root / "step00000005").mkdir()  # a save killed half-way: no manifest, `latest` never moved to it
    assert _engine(_model(), tmp_path).resume_latest()["data_position"] == 4

    victim = root / "step00000004" / "trainable.pt"
    victim.write_bytes(victim.read_bytes()[:100])
    with pytest.raises(ArtifactMismatchError, match=r"step00000004/trainable.pt: 100 bytes"):
        _engine(_model(), tmp_path).resume_latest()
    (root / "step00000004" / "manifest.json").unlink()
    with pytest.raises(ArtifactMismatchError, match=r"manifest.json: missing.*incomplete"):
        _engine(_model(), tmp_path).resume_latest()
    (root / "latest").write_text("../../etc\n")
    with pytest.raises(ArtifactMismatchError, match="latest: expected a tag"):
        _engine(_model(), tmp_path).resume_latest()
    assert _engine(_model(), tmp_path / "fresh").resume_latest() is None


def test_export_reload_gives_the_same_outputs_and_refuses_mismatches(tmp_path):
    eng = _engine(_model(), tmp_path / "run")
    _train(eng, range(3))
    out = export_trainable(tmp_path / "export", eng.module, {"arch": "llama"})
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "trainable.safetensors"]
    fresh = _model(hyper_seed=5)
    batch = S.make_batch("llama", 0, 0, 1)
    with torch.no_grad():
        assert not torch.equal(fresh(batch)[0], eng.module(batch)[0])
        assert load_trainable(out, fresh) == {"arch": "llama"}
        torch.testing.assert_close(fresh(batch)[0], eng.module(batch)[0], rtol=0, atol=0)
    with pytest.raises(ArtifactMismatchError, match="does not match the module"):
        load_trainable(out, _model("t5"))
    (out / "trainable.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(ArtifactMismatchError, match="trainable.safetensors: sha256 differs"):
        load_trainable(out, fresh)


def test_activation_checkpointing_same_gradients_with_recompute(tmp_path):
    batch = S.make_batch("llama", 1, 0, 1)

    def grads(checkpointing: bool) -> tuple[float, dict, int]:
        model = _model()
        model.train()
        if checkpointing:
            enable_hf_checkpointing(model.backbone)
        calls = []
        model.backbone.get_submodule(model.targets[0]).register_forward_hook(lambda *a: calls.append(1))
        loss_sum, n = model(batch)
        (loss_sum / n).backward()
        return loss_sum.item(), {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}, \
            len(calls)

    loss0, g0, calls0 = grads(False)
    loss1, g1, calls1 = grads(True)
    assert loss0 == pytest.approx(loss1, abs=1e-6)
    assert calls0 == 1 and calls1 == 2  # the checkpointed layer ran again in backward
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-5, atol=1e-6)


def test_tensorboard_scalars_written_on_rank0(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    eng = _engine(_model(), tmp_path / "run", log_dir=tmp_path / "tb")
    _train(eng, range(2))
    eng.log_scalars(2, {"loss": 1.25, "loss/kl": 0.5})
    eng.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "loss/kl", "train/lr", "train/step_time_s"} <= tags
    assert acc.Scalars("train/loss")[0].value == 1.25 and acc.Scalars("train/loss")[0].step == 2


def test_plain_engine_drops_an_update_whose_gradient_is_not_finite(tmp_path):
    eng = _engine(_model(), tmp_path)
    _train(eng, range(1))
    before = {n: p.detach().clone() for n, p in eng.module.named_parameters() if p.requires_grad}
    loss_sum, n = eng(S.make_batch("llama", 1, 0, 1))
    eng.backward(global_token_mean(loss_sum, n))
    next(p for p in eng.module.parameters() if p.requires_grad).grad.view(-1)[0] = float("inf")
    assert eng.step() is False and eng.skipped_updates == 1 and eng.global_step == 1
    assert all(torch.equal(p, before[n]) for n, p in eng.module.named_parameters() if p.requires_grad)
    _train(eng, range(1, 2))  # the next batch trains normally, from clean gradients
    assert eng.global_step == 2 and all(torch.isfinite(p).all() for p in eng.module.parameters())


def test_lr_scale_gives_matched_parameters_their_own_lr(tmp_path):
    # The hypernetwork heads train at lr × head_lr_scale (Adam would otherwise move a generated entry ~fan-in × lr):
    # after one step a scaled weight moves ~100x less than the same weight in an unscaled run.
    def heads(name: str) -> float:
        return 0.01 if name.startswith("hyper.heads.") and name.endswith("weight") else 1.0

    moved = {}
    for label, scale_of in (("plain", None), ("scaled", heads)):
        eng = _engine(_model(), tmp_path / label, warmup_steps=0, lr_scale_of=scale_of)
        assert eng.lr == pytest.approx(1e-2)  # the base lr is what the engine reports
        w = eng.module.hyper.heads[0].weight
        before, trunk_before = w.detach().clone(), eng.module.hyper.trunk[0].weight.detach().clone()
        _train(eng, range(1))
        moved[label] = ((w.detach() - before).abs().max().item(),
                        (eng.module.hyper.trunk[0].weight.detach() - trunk_before).abs().max().item())
        if scale_of is not None:
            lrs = sorted(g["lr"] for g in eng.optimizer.param_groups)
            assert lrs[0] == pytest.approx(0.01 * lrs[-1]) and lrs[-1] == pytest.approx(eng.lr)  # same schedule
    assert moved["scaled"][0] == pytest.approx(moved["plain"][0] * 0.01, rel=0.05)
    assert moved["scaled"][1] == pytest.approx(moved["plain"][1], rel=1e-6)  # other parameters: unchanged lr
