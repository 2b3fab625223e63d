"""DeepSpeed config filling, ZeRO-3 model construction and the token-weighted loss of the training engine.

The process group itself (rank, barrier, init, collective guards) lives in run/dist.py, below train and eval.
DeepSpeed is imported lazily so a plain torch run (use_deepspeed=False) and export loading never need it.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist

from ..errors import ConfigError
from ..run.dist import collective_guard, world_size


# ----------------------------------------------------------------------------------------------- DS config
_INT_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")


def _is_auto(v: Any) -> bool:
    return isinstance(v, str) and v == "auto"


def _fill(cfg: dict, dotted: str, value: Any, where: str, kind: type | tuple) -> None:
    """Set `dotted` to `value` when it is "auto" or absent; an explicit value must have type `kind` and equal it.

    Why strict: a ds config that silently disagrees with the recipe (another batch size, lr or dtype) makes the run
    something other than what its resolved config says.
    """
    *parents, leaf = dotted.split(".")
    node = cfg
    for p in parents:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{where}: key '{p}' must be a JSON object, got {child!r}")
        node = child
    if leaf not in node or _is_auto(node[leaf]):
        node[leaf] = value
        return
    got = node[leaf]
    ok_type = isinstance(got, bool) if kind is bool else isinstance(got, kind) and not isinstance(got, bool)
    if not ok_type:
        raise ConfigError(f"{where}: key '{dotted}' must be \"auto\" or a {getattr(kind, '__name__', 'number')}, "
                          f"got {got!r}")
    if got != value:
        raise ConfigError(f"{where}: key '{dotted}' is {got!r} but the recipe gives {value!r}; "
                          f"set it to \"auto\" (filled from the recipe) or to {value!r}")


def _find_auto(node: Any, prefix: str = "") -> Optional[str]:
    if _is_auto(node):
        return prefix or "<root>"
    if isinstance(node, dict):
        for k, v in node.items():
            hit = _find_auto(v, f"{prefix}.{k}" if prefix else k)
            if hit:
                return hit
    if isinstance(node, list):
        for i, v in enumerate(node):
            hit = _find_auto(v, f"{prefix}[{i}]")
            if hit:
                return hit
    return None


@dataclass(frozen=True)
class ModelSizes:
    """What ZeRO-3's bucket and threshold sizes are derived from (counted on the meta device: no weights)."""

    hidden: int          # d_model / hidden_size
    total: int           # parameters of the whole backbone
    largest: int         # parameters of its largest single tensor

    def zero3_values(self) -> dict[str, int]:
        """ZeRO-3 sizes that keep a rank's backbone near its shard (measured: bench/zero3_partition.py).

        - persistence threshold 10 x hidden (transformers' "auto"): norms and biases stay whole (cheap), every
          weight matrix is partitioned; DeepSpeed's fixed 1e5 left 37 of a tiny model's 38 tensors whole.
        - prefetch bucket 0.9 x hidden^2 and reduce bucket hidden^2 (transformers' "auto").
        - at most total / 64 parameters gathered at once (never below the largest tensor, which must fit, nor above
          DeepSpeed's 1e9): with the fixed 1e9 a model under 1e9 parameters was gathered whole in every step.
        """
        live = int(min(max(self.total // 64, self.largest), 10 ** 9))
        return {"stage3_param_persistence_threshold": 10 * self.hidden,
                "stage3_prefetch_bucket_size": int(0.9 * self.hidden ** 2),
                "reduce_bucket_size": self.hidden ** 2,
                "stage3_max_live_parameters": live, "stage3_max_reuse_distance": live}


def model_sizes(model_config, arch: str) -> ModelSizes:
    """The backbone's sizes from its config alone: the model is built on the meta device (no memory, no init)."""
    from transformers import AutoModelForCausalLM, T5ForConditionalGeneration

    with torch.device("meta"):
        model = (T5ForConditionalGeneration(model_config) if arch == "t5"
                 else AutoModelForCausalLM.from_config(model_config))
    numels = [p.numel() for p in model.parameters()]  # shared (tied) tensors once: parameters() dedups
    hidden = getattr(model_config, "d_model", None) or model_config.hidden_size
    return ModelSizes(hidden=int(hidden), total=int(sum(numels)), largest=int(max(numels)))


def _fill_zero3_sizes(zero: dict, sizes: Optional[ModelSizes]) -> None:
    """ZeRO-3 size keys that are "auto" (or absent) get the model's values; explicit numbers are kept (the user's
    tuning wins). Without sizes an "auto" key is dropped: DeepSpeed's default applies."""
    values = sizes.zero3_values() if sizes is not None else {}
    for key in ModelSizes(1, 1, 1).zero3_values():
        if key not in zero or _is_auto(zero[key]):
            if key in values:
                zero[key] = values[key]
            else:
                zero.pop(key, None)


def ds_config_from_file(path: str | os.PathLike, *, micro_batch: int, grad_accum: int, lr: float,
                        weight_decay: float, grad_clip: float, dtype: str, zero_stage: Optional[int] = None,
                        param_persistence_threshold: Optional[int] = None, world_size: int,
                        sizes: Optional[ModelSizes] = None) -> dict:
    """Load a DeepSpeed JSON config and fill every "auto" from the recipe's values.

    Filled: train_micro_batch_size_per_gpu, gradient_accumulation_steps, train_batch_size (= micro · accum · world),
    optimizer.params.lr / weight_decay (only when the file has an optimizer section), gradient_clipping,
    bf16.enabled, fp16.enabled, zero_optimization.stage; `zero_stage` and `param_persistence_threshold` override.
    Under ZeRO-3 the bucket / threshold sizes that are "auto" come from the backbone's `sizes` (ModelSizes).
    Raises ConfigError naming the file and key for malformed JSON, wrong types, values that contradict the recipe,
    a "scheduler" section (the engine owns the schedule) or an "auto" nothing fills.
    """
    path = Path(path)
    where = str(path)
    if not path.is_file():
        raise ConfigError(f"{where}: DeepSpeed config file not found")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{where}: line {e.lineno}, column {e.colno}: malformed JSON: {e.msg}") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{where}: expected a JSON object at the top level, got {type(cfg).__name__}")
    for name, v in (("micro_batch", micro_batch), ("grad_accum", grad_accum), ("world_size", world_size)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ConfigError(f"{where}: recipe value {name} must be a positive integer, got {v!r}")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"{where}: dtype must be float32, bfloat16 or float16, got {dtype!r}")
    if "scheduler" in cfg:
        raise ConfigError(f"{where}: key 'scheduler' is not allowed: the engine owns the lr schedule "
                          f"(train.schedule / warmup_steps); remove the section")
    cfg = copy.deepcopy(cfg)
    _fill(cfg, "train_micro_batch_size_per_gpu", micro_batch, where, int)
    _fill(cfg, "gradient_accumulation_steps", grad_accum, where, int)
    _fill(cfg, "train_batch_size", micro_batch * grad_accum * world_size, where, int)
    _fill(cfg, "gradient_clipping", float(grad_clip), where, (int, float))
    _fill(cfg, "bf16.enabled", dtype == "bfloat16", where, bool)
    _fill(cfg, "fp16.enabled", dtype == "float16", where, bool)
    if "optimizer" in cfg:
        _fill(cfg, "optimizer.params.lr", float(lr), where, (int, float))
        _fill(cfg, "optimizer.params.weight_decay", float(weight_decay), where, (int, float))
    zero = cfg.setdefault("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ConfigError(f"{where}: key 'zero_optimization' must be a JSON object, got {zero!r}")
    if zero_stage is not None:
        zero["stage"] = zero_stage
    stage = zero.get("stage", 0)
    if _is_auto(stage):
        raise ConfigError(f"{where}: key 'zero_optimization.stage' is \"auto\"; give 0-3 in the file or set "
                          f"distributed.zero_stage")
    if not isinstance(stage, int) or isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise ConfigError(f"{where}: key 'zero_optimization.stage' must be 0, 1, 2 or 3, got {stage!r}")
    _fill_zero3_sizes(zero, sizes if stage == 3 else None)
    if param_persistence_threshold is not None:
        zero["stage3_param_persistence_threshold"] = int(param_persistence_threshold)
    left = _find_auto(cfg)
    if left:
        raise ConfigError(f"{where}: key '{left}' is \"auto\" but the engine does not fill it; give a value")
    return cfg


# ------------------------------------------------------------------------------------------------ ZeRO-3
_LIVE_HF_DS_CONFIG: list = []  # transformers keeps only a weakref; this keeps the object alive


@contextlib.contextmanager
def zero3_model_context(ds_config: dict, *, keep_alive: bool = True) -> Iterator[Any]:
    """Build models inside this context so transformers partitions them at construction under ZeRO-3.

    Uses transformers' own route (`HfDeepSpeedConfig` + `from_pretrained` / `from_config`), which wraps
    construction in `deepspeed.zero.Init` correctly; wrapping `LlamaForCausalLM(config)` in zero.Init by hand
    crashes in `_init_weights`. With `keep_alive` the config stays registered after the block, because
    generation and embedding resizing also ask transformers whether ZeRO-3 is on. A non-ZeRO-3 config makes
    this a no-op for construction. Needs the process group (init_distributed) first.
    """
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    hf_cfg = HfDeepSpeedConfig(ds_config)  # registers itself (weakly) with transformers
    _LIVE_HF_DS_CONFIG[:] = [hf_cfg]
    try:
        yield hf_cfg
    finally:
        if not keep_alive:
            _LIVE_HF_DS_CONFIG.clear()
            unset_hf_deepspeed_config()


def release_zero3_context() -> None:
    """Forget the ZeRO-3 config a stage registered (at its end): a later stage of the same process (the pipeline's
    evaluation, a baseline) must load its models whole, not partitioned by a training stage that is over."""
    if _LIVE_HF_DS_CONFIG:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        _LIVE_HF_DS_CONFIG.clear()
        unset_hf_deepspeed_config()


# ---------------------------------------------------------------------------------------------- losses
def global_token_mean(loss_sum: torch.Tensor, n_tokens: int | torch.Tensor, *,
                      grads_averaged_over_ranks: bool = True) -> torch.Tensor:
    """The loss to backward so that the update equals that of (sum of token losses) / (tokens in the global batch).

    loss_sum: scalar, this rank's summed token loss for its micro batch; n_tokens: this rank's token count.
    The count is all-reduced; DeepSpeed then averages gradients over the W ranks, so each rank returns
    W · loss_sum / N_global and the average of the ranks' values is exactly the global token mean. ZeRO-2,
    ZeRO-3 and one process (W=1) thus give the same loss and update for the same global batch, whatever the
    split of tokens between ranks. Use `all_reduce_mean` on the detached value to log it. (With gradient
    accumulation each micro batch is normalised on its own, then DeepSpeed averages the micro batches.)
    """
    n = torch.as_tensor(n_tokens, dtype=torch.float32, device=loss_sum.device).reshape(())
    w = world_size()
    if w > 1:
        n = n.clone()
        with collective_guard("token count all-reduce"):
            dist.all_reduce(n)
    scale = float(w) if grads_averaged_over_ranks else 1.0
    return loss_sum * (scale / n.clamp_min(1.0))
