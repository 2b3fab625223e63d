"""The two cheap multitask baselines (Tk-Instruct style and no-instruction) and the small harness they share with
the tiny backbone's copy pretraining: encode (prompt, answer) pairs with the loss on answer tokens only, a flat
time-boxed AdamW loop, and greedy batched prediction.

- mode="tk_instruct": the model reads the full Tk-Instruct source (definition + 2 positive examples + input).
- mode="no_instruction": the model reads the instance part alone (`prompts.no_instruction_input`).
Training follows the measured recipe (../shared/OFFLINE_DEMO_EVIDENCE.md): AdamW betas (0.9, 0.98), weight decay
0.01, 50 warmup steps, linear decay to 0 (by steps or by the time budget, whichever ends first), clip 1.0.
Decoder-only (LLaMA-style) and encoder-decoder (T5) backbones both work; the demo uses the former.
"""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Optional, Sequence

import torch

from ..data.prompts import build_source, no_instruction_input
from ..data.tasks import Instance, Task
from ..errors import ConfigError, DataError
from ..io_utils import atomic_dir, atomic_write_json
from .schedule import lr_multiplier

Mode = Literal["tk_instruct", "no_instruction"]
IGNORE = -100


# ------------------------------------------------------------------------------------------------ encoding
@dataclass(frozen=True)
class Encoded:
    """One training sequence. Decoder-only: input_ids = prompt + answer + eos, labels mask the prompt.
    Encoder-decoder: input_ids = prompt, labels = answer + eos."""

    input_ids: list[int]
    labels: list[int]


def prompt_for(task: Task, inst: Instance, mode: Mode, num_pos: int = 2) -> str:
    if mode == "tk_instruct":
        return build_source(task, inst, num_pos=num_pos)
    if mode == "no_instruction":
        return no_instruction_input(inst)
    raise ConfigError(f"multitask mode must be 'tk_instruct' or 'no_instruction', got {mode!r}")


def encode_prompt(tokenizer, prompt: str, is_encoder_decoder: bool, max_len: int) -> list[int]:
    """Prompt ids. The trailing space of 'Output: ' is dropped: the answer's first piece carries its own '▁', so
    keeping it would put a lone space token between prompt and answer. Over-long prompts keep their end."""
    if is_encoder_decoder:
        ids = tokenizer(prompt.rstrip(), add_special_tokens=True)["input_ids"]
    else:
        ids = [tokenizer.bos_token_id] + tokenizer(prompt.rstrip(), add_special_tokens=False)["input_ids"]
    return ids[-max_len:]


def encode_pair(tokenizer, prompt: str, answer: str, is_encoder_decoder: bool, max_len: int = 512,
                max_answer_len: int = 128) -> Encoded:
    ans = tokenizer(answer.strip(), add_special_tokens=False)["input_ids"][:max_answer_len] + [tokenizer.eos_token_id]
    src = encode_prompt(tokenizer, prompt, is_encoder_decoder, max_len)
    if is_encoder_decoder:
        return Encoded(src, ans)
    src = src[-max(1, max_len - len(ans)):]
    return Encoded(src + ans, [IGNORE] * len(src) + ans)


def collate(batch: Sequence[Encoded], pad_id: int, is_encoder_decoder: bool) -> dict[str, torch.Tensor]:
    """Right-padded tensors: input_ids / attention_mask (B, T), labels (B, T) or (B, T_ans) for T5."""
    T = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), T), dtype=torch.long)
    for i, e in enumerate(batch):
        ids[i, :len(e.input_ids)] = torch.tensor(e.input_ids)
        mask[i, :len(e.input_ids)] = 1
    La = max(len(e.labels) for e in batch)
    labels = torch.full((len(batch), La), IGNORE, dtype=torch.long)
    for i, e in enumerate(batch):
        labels[i, :len(e.labels)] = torch.tensor(e.labels)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# ------------------------------------------------------------------------------------------------ training loop
@dataclass
class LoopResult:
    steps: int
    seconds: float
    losses: list[float]  # one per step


def train_loop(model: torch.nn.Module, next_batch: Callable[[int], dict[str, torch.Tensor]], *, steps: int,
               lr: float, time_budget_s: Optional[float] = None, warmup_steps: int = 50, weight_decay: float = 0.01,
               betas: tuple[float, float] = (0.9, 0.98), grad_clip: float = 1.0, device: str = "cpu",
               logger=None, log_every: int = 10, anneal_to_budget: bool = True) -> LoopResult:
    """AdamW on the trainable parameters; lr = peak × warmup × linear decay. With `anneal_to_budget` the decay's
    progress is the larger of step/steps and elapsed/time_budget_s, so the lr reaches 0 exactly when the budget
    ends (a time-bounded stage: the backbone's copy pretraining). Without it the schedule is by steps alone and the
    budget only stops a run that is too slow: the same steps give the same model whatever the machine's load."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("train_loop: the model has no trainable parameters")
    opt = torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)
    model.train()
    losses: list[float] = []
    t0 = time.perf_counter()
    step = 0
    while step < steps:
        elapsed = time.perf_counter() - t0
        if time_budget_s is not None and elapsed >= time_budget_s:
            break
        mult = lr_multiplier(step, warmup_steps=warmup_steps, total_steps=steps, schedule="linear")
        if anneal_to_budget and time_budget_s is not None and step >= warmup_steps:
            mult = min(mult, max(0.0, 1.0 - elapsed / time_budget_s))
        for g in opt.param_groups:
            g["lr"] = lr * mult
        batch = {k: v.to(device) for k, v in next_batch(step).items()}
        loss = model(**batch).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"train_loop: loss became {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        losses.append(loss.item())
        step += 1
        if logger is not None:
            logger.advance()
            if step % log_every == 0 or step == 1:
                logger.log_scalars(step, {"loss": sum(losses[-log_every:]) / len(losses[-log_every:]),
                                          "lr": lr * mult, "seconds": time.perf_counter() - t0})
    model.eval()
    return LoopResult(steps=step, seconds=time.perf_counter() - t0, losses=losses)


# ------------------------------------------------------------------------------------------------ generation
@torch.no_grad()
def generate_greedy(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 32, batch_size: int = 64,
                    max_len: int = 512, device: str = "cpu") -> list[str]:
    """Greedy answers, decoded without special tokens and stripped. Decoder-only prompts are left-padded."""
    is_ed = bool(getattr(model.config, "is_encoder_decoder", False))
    pad = tokenizer.pad_token_id
    model.eval()
    out: list[str] = []
    for b in range(0, len(prompts), batch_size):
        enc = [encode_prompt(tokenizer, p, is_ed, max_len) for p in prompts[b:b + batch_size]]
        T = max(map(len, enc))
        ids = torch.full((len(enc), T), pad, dtype=torch.long)
        mask = torch.zeros((len(enc), T), dtype=torch.long)
        for i, e in enumerate(enc):
            if is_ed:
                ids[i, :len(e)], mask[i, :len(e)] = torch.tensor(e), 1
            else:
                ids[i, T - len(e):], mask[i, T - len(e):] = torch.tensor(e), 1
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                             do_sample=False, num_beams=1, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
        new = gen if is_ed else gen[:, T:]
        out += [s.strip() for s in tokenizer.batch_decode(new, skip_special_tokens=True)]
    return out


# ------------------------------------------------------------------------------------------------ the baselines
def _device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_model_and_tokenizer(path: str | Path, device: str = "cpu"):
    """A backbone / full fine-tune folder (model + tokenizer), or a PEFT adapter folder (base recorded inside)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: model folder not found")
    if (path / "adapter_config.json").exists():
        from peft import PeftModel

        base_path = json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"]
        base, tok = load_model_and_tokenizer(base_path, device)
        model = PeftModel.from_pretrained(base, str(path)).to(device)
        return model.eval(), tok
    cfg = AutoConfig.from_pretrained(path)
    cls = AutoModelForSeq2SeqLM if cfg.is_encoder_decoder else AutoModelForCausalLM
    model = cls.from_pretrained(path).to(device)
    return model.eval(), AutoTokenizer.from_pretrained(path)


def _sampler(tasks: Sequence[Task], weights: Optional[Sequence[float]], rng: random.Random):
    pool = [(t, inst) for t in tasks for inst in t.instances]
    if not pool:
        raise DataError("train_multitask: the given tasks hold no instances")
    if weights is None:  # uniform over instances
        return lambda: pool[rng.randrange(len(pool))]
    if len(weights) != len(tasks):
        raise ConfigError(f"train_multitask: {len(weights)} task weights for {len(tasks)} tasks")
    live = [(t, w) for t, w in zip(tasks, weights) if t.instances and w > 0]
    ts, ws = [t for t, _ in live], [w for _, w in live]

    def draw():
        t = rng.choices(ts, weights=ws)[0]
        return t, t.instances[rng.randrange(len(t.instances))]
    return draw


def train_multitask(backbone_path: str | Path, tasks: Sequence[Task], out_dir: str | Path, *,
                    mode: Mode = "tk_instruct", steps: int = 600, lr: float = 1e-3, batch: int = 32,
                    time_budget_s: Optional[float] = None, seed: int = 0,
                    lora: Optional[tuple[int, float, Sequence[str]]] = (32, 64.0, ("q_proj", "v_proj")),
                    full: bool = False, task_weights: Optional[Sequence[float]] = None, num_pos: int = 2,
                    warmup_steps: int = 50, max_len: int = 512, device: str = "auto",
                    tb_dir: Optional[str | Path] = None, progress: bool = True) -> Path:
    """Train one multitask baseline on `tasks` and save it to `out_dir` atomically; returns `out_dir`.

    `full=True` fine-tunes every weight and saves a full model; otherwise a PEFT LoRA adapter (r, alpha, targets)
    on the frozen backbone. `train.json` beside it records mode, steps, seconds and the loss curve.
    """
    from .logging import TrainLogger

    if not full and lora is None:
        raise ConfigError("train_multitask: give lora=(r, alpha, targets) or full=True")
    dev = _device(device)
    torch.manual_seed(seed)
    model, tok = load_model_and_tokenizer(backbone_path, dev)
    is_ed = bool(model.config.is_encoder_decoder)
    if full:
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        from peft import LoraConfig, get_peft_model

        r, alpha, targets = lora  # type: ignore[misc]
        model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets),
                                                 lora_dropout=0.0, bias="none"))
    rng = random.Random(f"{seed}:multitask:{mode}")
    draw = _sampler(tasks, task_weights, rng)
    cache: dict[tuple[str, str], Encoded] = {}

    def next_batch(step: int) -> dict[str, torch.Tensor]:
        items = []
        for _ in range(batch):
            t, inst = draw()
            key = (t.name, inst.id)
            if key not in cache:
                cache[key] = encode_pair(tok, prompt_for(t, inst, mode, num_pos), inst.label, is_ed, max_len)
            items.append(cache[key])
        return collate(items, tok.pad_token_id, is_ed)

    logger = TrainLogger(tb_dir, total_steps=steps, enabled=True, show_progress=progress, desc=f"multitask:{mode}")
    try:
        res = train_loop(model, next_batch, steps=steps, lr=lr, time_budget_s=time_budget_s, device=dev,
                         warmup_steps=warmup_steps, logger=logger, anneal_to_budget=False)
    finally:
        logger.close()
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        if full:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
        else:
            model.save_pretrained(tmp)
            cfg_path = tmp / "adapter_config.json"  # point the adapter at the absolute backbone path
            acfg = json.loads(cfg_path.read_text())
            acfg["base_model_name_or_path"] = str(Path(backbone_path).resolve())
            cfg_path.write_text(json.dumps(acfg, indent=2))
        atomic_write_json(tmp / "train.json", {
            "mode": mode, "full": full, "lora": None if full else list(lora[:2]) + [list(lora[2])],  # type: ignore[index]
            "steps": res.steps, "seconds": round(res.seconds, 2), "batch": batch, "lr": lr, "seed": seed,
            "loss_first10": _mean(res.losses[:10]), "loss_last10": _mean(res.losses[-10:]), "losses": res.losses,
            "num_tasks": len(tasks), "backbone": str(backbone_path)})
    return out_dir


def _mean(xs: Sequence[float]) -> float:
    return float(sum(xs) / len(xs)) if xs else math.nan


def predict_multitask(model_dir: str | Path, tasks: Sequence[Task], *, mode: Mode = "tk_instruct",
                      max_instances_per_task: Optional[int] = None, max_new_tokens: int = 32, batch_size: int = 64,
                      num_pos: int = 2, device: str = "auto") -> dict[str, list[str]]:
    """Greedy predictions per task name, for the first `max_instances_per_task` instances of each task."""
    dev = _device(device)
    model, tok = load_model_and_tokenizer(model_dir, dev)
    out = {}
    for t in tasks:
        insts = t.instances[:max_instances_per_task]
        out[t.name] = generate_greedy(model, tok, [prompt_for(t, i, mode, num_pos) for i in insts],
                                      max_new_tokens=max_new_tokens, batch_size=batch_size, device=dev)
    return out


def score_predictions(tasks: Sequence[Task], predictions: dict[str, list[str]]) -> dict[str, float]:
    """SNI ROUGE-L / exact match over all predicted instances of `tasks` (×100)."""
    from ..eval.metrics import compute_metrics

    preds, refs = [], []
    for t in tasks:
        p = predictions[t.name]
        preds += p
        refs += [list(i.references) for i in t.instances[:len(p)]]
    return compute_metrics(preds, refs)
