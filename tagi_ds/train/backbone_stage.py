"""Stage `backbone`: the offline demo's frozen backbone — a sentencepiece tokenizer trained on the suite's wording
and a tiny LLaMA-style decoder taught to copy (`tagi-ds backbone --config configs/tiny.yaml`).

Why copy pretraining: a random-init model cannot copy words from its prompt within CPU minutes, and most of the
suite's answers are words of the input. Batches alternate between full-format identity prompts (random definition
words, identity demonstrations) and input-only prompts; the lr decays linearly to 0 at the time budget.

What made it copy (step-bounded probes: 300 steps, batch 32, lr 2e-3, copy EM on 128 held-out prompts; the evidence,
../shared/OFFLINE_DEMO_EVIDENCE.md, reports ~90% after 400 steps):
- init scale: transformers' default initializer_range 0.02 is sized for hidden ~1000; at hidden 128 every projection
  shrinks its input ~4x, attention starts uniform and the model sits on a long plateau where it copies the first
  word and guesses the rest (0.8% EM at 300 steps, 36.7% after 550; lr 1e-3: 3.9%; no clipping/decay: 0.8%).
  INIT_STD = 0.08 (≈ 1/sqrt(128), projections keep their input's scale): 59% at 300 steps (0.12: 45%).
- loss on the demonstrations' outputs too (`encode_copy`): they are copies as well, so a full-format sequence teaches
  three copies instead of one for the same compute: 72% at 300 steps.
- the tokenizer was not the cause: every suite word is one piece ('▁apple'), and prompt and answer join on word
  boundaries ('Output', ':', '▁apple', ..., '</s>').
With both, the stage reaches copy EM 97.7% after 741 steps / 300 s on 2 loaded cores (the committed asset); 90 s on
the same loaded cores gave 222 steps and 25%, hence the 300 s default budget (a quiet machine does ~550 steps / 90 s).

Mode `backbone.pretrain_corpus: sni` (configs/sni-small.yaml): the tokenizer is trained on the SNI train tasks'
text and the model is pretrained with a causal-LM loss on plain-text documents of those tasks (one per task: the
definition, then "input\noutput" pairs; never the Tk-Instruct prompt, so the no-FT baseline is not already instruction
tuned), cut into windows of LM_SEQ_LEN tokens; `copy_pretrain_seconds` bounds the whole stage (tokenizer included) and
the lr decays to 0 when it ends. 2% of the train tasks are held out: their LM loss before and after is recorded.
The copy objective is not mixed in: SNI's "input\noutput" pairs already hold extraction/copy tasks, and there was no
time to measure a mix (see the sni-small header).

Output `<run_dir>/backbone/` (atomic): model (safetensors) + tokenizer + recipe.json (config, seed, recipe hash, copy
EM, steps, seconds). The stage skips when that folder (or the committed asset) holds the same recipe hash; a killed
run leaves nothing published and simply starts over.
"""
from __future__ import annotations

import argparse
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from ..data.collate import pad_rows
from ..data.prompts import build_source, no_instruction_input
from ..data.synthetic import OPS, WORDS, all_wording, build_suite
from ..data.tasks import Example, Instance, Task
from ..io_utils import atomic_dir, atomic_write_json
from ..run.backbone import resolve_device, run_backbone_identity
from ..run.backbone_recipe import (ASSET_DIR, INIT_STD, LM_HELDOUT_FRACTION, LM_SEQ_LEN, RECIPE_FILE,
                                   TOKENIZER_INSTANCES, recipe, recipe_hash_at, resolve_backbone_path, sni_dirs,
                                   sni_init_std)
from ..run.decode import decode_prompts
from ..run.dist import barrier, rank, world_size
from ..run.paths import RunPaths
from .loop import train_loop

EXTRA_KEYS = ("use_asset",)
LM_EVAL_WINDOWS = 64  # held-out windows scored before and after pretraining (sni mode)
IGNORE = -100


def identity(cfg, sub: Optional[str] = None) -> dict:
    """The backbone this config resolves to: a given name_or_path, or the tiny recipe's hash."""
    return {"backbone_id": run_backbone_identity(cfg)}


# ------------------------------------------------------------------------------------------------ encoding
@dataclass(frozen=True)
class Encoded:
    """One decoder-only training sequence: input_ids = prompt + answer + eos, labels mask the prompt (-100)."""

    input_ids: list[int]
    labels: list[int]


def encode_source(tokenizer, prompt: str, max_len: int = 512) -> list[int]:
    """The copy data's prompt ids: bos + the prompt without its trailing space. The answer's first piece carries its
    own '▁', so keeping the space would put a lone space token between prompt and answer. (The committed asset was
    pretrained with this encoding; the run's stages use run/prompts.py's, the Tk-Instruct one.)"""
    return ([tokenizer.bos_token_id] + tokenizer(prompt.rstrip(), add_special_tokens=False)["input_ids"])[-max_len:]


def encode_pair(tokenizer, prompt: str, answer: str, max_len: int = 512, max_answer_len: int = 128) -> Encoded:
    ans = tokenizer(answer.strip(), add_special_tokens=False)["input_ids"][:max_answer_len] + [tokenizer.eos_token_id]
    src = encode_source(tokenizer, prompt, max_len)
    src = src[-max(1, max_len - len(ans)):]
    return Encoded(src + ans, [IGNORE] * len(src) + ans)


def collate(batch: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded tensors: input_ids / attention_mask / labels (B, T)."""
    return {"input_ids": pad_rows([e.input_ids for e in batch], pad_id),
            "attention_mask": pad_rows([[1] * len(e.input_ids) for e in batch], 0),
            "labels": pad_rows([e.labels for e in batch], IGNORE)}


# ------------------------------------------------------------------------------------------------ copy data
class CopyData:
    """Random identity prompts. Inputs follow the suite's distribution (3–6 distinct words of the shared list, 25%
    sorted), with some shorter and longer ones (1–8 words) so copying does not hinge on the length; definitions are
    random words of the suite's phrasings, so the model learns to look past the definition to the input.
    (A first version also drew inputs from every word the suite uses: after 571 steps / 90 s copy EM was 28%.)"""

    def __init__(self, seed: int):
        self.rng = random.Random(f"{seed}:copy")
        self.def_words = sorted({w.strip(",.") for o in OPS.values() for p in o.phrasings for w in p.split()} - {"{x}"})

    def words(self) -> str:
        r = self.rng
        n = r.randint(3, 6) if r.random() < 0.85 else r.choice((1, 2, 7, 8))
        w = r.sample(WORDS, n)
        return " ".join(sorted(w) if r.random() < 0.25 else w)

    def full_prompt(self) -> tuple[str, str]:
        r = self.rng
        definition = "You are given a list of words. " + " ".join(r.choice(self.def_words)
                                                                 for _ in range(r.randint(4, 16))) + "."
        demos = tuple(Example(x, x) for x in (self.words(), self.words()))
        x = self.words()
        task = Task("copy", definition, demos, (), ())
        return build_source(task, Instance("copy-0", x, (x,), x)), x

    def input_only_prompt(self) -> tuple[str, str]:
        x = self.words()
        return no_instruction_input(Instance("copy-0", x, (x,), x)), x

    def pair(self, full: bool) -> tuple[str, str]:
        return self.full_prompt() if full else self.input_only_prompt()


# A demonstration's output inside a Tk-Instruct prompt: ' Output: <words>.' then a newline (prompts.example_text);
# the final 'Output: ' of the instance has no leading space and no words, so it never matches.
_DEMO_OUTPUT = re.compile(r" Output: ([^\n]*)\.\n")


def encode_copy(tokenizer, prompt: str, answer: str) -> Encoded:
    """`encode_pair` (decoder-only, loss on the answer + eos) plus labels on the words of every demonstration output
    in `prompt`: in an identity prompt those are copies too, so one full-format sequence teaches three copies for the
    compute of one. Token i is labelled when its character span (with its leading '▁' space) lies inside an output."""
    enc = encode_pair(tokenizer, prompt, answer)
    body = prompt.rstrip()  # what encode_source tokenizes, after the bos
    spans = [(m.start(1) - 1, m.end(1)) for m in _DEMO_OUTPUT.finditer(body)]
    if not spans:
        return enc
    tok = tokenizer(body, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = tok["input_ids"], tok["offset_mapping"]
    if enc.input_ids[1:len(ids) + 1] != ids:  # a truncated prompt: keep the answer-only labels
        return enc
    labels = list(enc.labels)
    for i, (s0, s1) in enumerate(offsets):
        if s1 > s0 and any(a0 <= s0 and s1 <= a1 for a0, a1 in spans):
            labels[i + 1] = ids[i]  # +1: the bos
    return Encoded(enc.input_ids, labels)


def copy_exact_match(model, tok, seed: int, n: int = 128, device: str = "cpu") -> float:
    """% of fresh identity prompts (half full-format, half input-only) answered exactly."""
    data = CopyData(seed + 10_000)
    pairs = [data.pair(full=i % 2 == 0) for i in range(n)]
    preds = decode_prompts(model, tok, "llama", [encode_source(tok, p) for p, _ in pairs], device=device,
                           max_new_tokens=20, batch_size=64)
    return 100.0 * sum(p == a for p, (_, a) in zip(preds, pairs)) / n


# ------------------------------------------------------------------------------------------------ SNI text (sni mode)
def sni_task_document(task: Task) -> str:
    """One task as plain text: the definition, then "input\noutput" pairs (positive examples, then instances),
    separated by blank lines. No 'Definition:' / 'Input:' / 'Output:' markers: that is the Tk-Instruct format."""
    pairs = [(e.input, e.output) for e in task.positive_examples] + [(i.input, i.label) for i in task.instances]
    return "\n\n".join([task.definition.strip()] + [f"{x.strip()}\n{y.strip()}" for x, y in pairs])


def sni_tokenizer_texts(tasks: list[Task], max_instances: int = TOKENIZER_INSTANCES,
                        max_chars: int = 4000) -> list[str]:
    """The tokenizer corpus: every definition and positive example and the first `max_instances` instances of each
    task, one line per sentencepiece sentence (long lines cut: sentencepiece skips sentences over 16 KB)."""
    texts: list[str] = []
    for t in tasks:
        parts = [t.definition] + [s for e in t.positive_examples for s in (e.input, e.output)]
        parts += [s for i in t.instances[:max_instances] for s in (i.input, i.label)]
        texts += [line[:max_chars] for p in parts for line in p.split("\n") if line.strip()]
    return texts


def lm_windows(tok, docs: list[str], seq_len: int = LM_SEQ_LEN, min_len: int = 16) -> list[list[int]]:
    """Each document tokenized, closed by eos and cut into windows of `seq_len` tokens, each opened by bos
    (a document's tail shorter than `min_len` tokens is dropped)."""
    out: list[list[int]] = []
    body = seq_len - 1
    for ids in tok(docs, add_special_tokens=False)["input_ids"]:
        ids = ids + [tok.eos_token_id]
        out += [[tok.bos_token_id] + ids[i:i + body] for i in range(0, len(ids), body)
                if len(ids[i:i + body]) >= min_len]
    return out


def split_heldout(n_docs: int, seed: int, fraction: float = LM_HELDOUT_FRACTION) -> set[int]:
    """Indices of the documents (tasks) held out of LM pretraining: at least one, drawn with `seed`."""
    k = min(n_docs - 1, max(1, round(fraction * n_docs)))
    return set(random.Random(f"{seed}:sni-heldout").sample(range(n_docs), k))


@torch.no_grad()
def lm_loss(model, windows: list[list[int]], pad_id: int, batch: int = 16, device: str = "cpu") -> float:
    """Mean next-token cross-entropy per predicted token over `windows` (nats)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for b in range(0, len(windows), batch):
        enc = collate([Encoded(w, w) for w in windows[b:b + batch]], pad_id)
        n = int((enc["labels"][:, 1:] != -100).sum())  # tokens predicted (HF shifts the labels by one)
        total += model(**{k: v.to(device) for k, v in enc.items()}).loss.item() * n
        count += n
    model.train(was_training)
    return total / max(1, count)


# ------------------------------------------------------------------------------------------------ build
def _loss_record(res) -> dict:
    """The recipe record's loss curve: means of the first and last 10 steps, and every 10th step."""
    return {"loss_first10": sum(res.losses[:10]) / max(1, len(res.losses[:10])),
            "loss_last10": sum(res.losses[-10:]) / max(1, len(res.losses[-10:])), "losses_every10": res.losses[::10]}


def _train_and_evaluate(model, tok, next_batch, evaluate: Callable[[], float], metric: str, *, desc: str,
                        max_steps: int, lr: float, budget_s: float, max_warmup: int, device: str,
                        tb_dir: Optional[Path], progress: bool):
    """Both modes' training: `train_loop` with the lr annealed to 0 at the time budget, then `metric` = evaluate()
    logged. Returns (LoopResult, metric value); the caller saves the model inside its atomic folder."""
    from .logging import TrainLogger

    logger = TrainLogger(tb_dir, total_steps=max_steps if max_steps < 100_000 else None, enabled=True,
                         show_progress=progress, desc=desc)
    try:
        res = train_loop(model, next_batch, steps=max_steps, lr=lr, time_budget_s=budget_s,
                         warmup_steps=min(max_warmup, max(1, max_steps // 10)), device=device, logger=logger)
        value = evaluate()
        logger.log_scalars(res.steps, {metric: value})
    finally:
        logger.close()
    model.generation_config.pad_token_id = tok.pad_token_id
    return res, value


def _new_tiny_llama(tok, *, seed: int, hidden: int, layers: int, heads: int, ffn: int, init_std: float, device: str):
    """A random tiny LLaMA sized to `tok`, every weight trainable (tied embeddings, sdpa attention)."""
    from ..modeling.tiny import build_from_config, tiny_llama_config

    config = tiny_llama_config(vocab_size=len(tok), hidden_size=hidden, num_layers=layers, num_heads=heads,
                               intermediate_size=ffn, max_position_embeddings=1024,
                               pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                               eos_token_id=tok.eos_token_id, tie_word_embeddings=True, rope_theta=1e4)
    config._attn_implementation = "sdpa"
    config.initializer_range = init_std
    model = build_from_config(config, seed=seed).to(device)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def build_sni_backbone(out_dir: Path, tasks: list[Task], *, seed: int, hidden: int, layers: int, heads: int, ffn: int,
                       vocab: int, budget_seconds: float, lr: float, batch: int, max_steps: int = 100_000,
                       tb_dir: Optional[Path] = None, device: str = "cpu", extra_recipe: Optional[dict] = None,
                       progress: bool = True) -> dict:
    """Tokenizer on the SNI train tasks' text + random LLaMA + causal-LM pretraining on their documents, published
    atomically at `out_dir`; `budget_seconds` bounds the whole build (tokenizer and tokenization included)."""
    from ..data.tokenizer import train_sentencepiece_tokenizer

    t_start = time.perf_counter()
    init_std = sni_init_std(hidden)
    with atomic_dir(out_dir) as tmp:
        tok = train_sentencepiece_tokenizer(sni_tokenizer_texts(tasks), tmp, vocab_size=vocab, kind="llama")
        t_tok = time.perf_counter() - t_start
        docs = [sni_task_document(t) for t in tasks]
        held = split_heldout(len(docs), seed)
        train_w = lm_windows(tok, [d for i, d in enumerate(docs) if i not in held])
        held_w = lm_windows(tok, [d for i, d in enumerate(docs) if i in held])
        rng = random.Random(f"{seed}:sni-lm")
        eval_w = rng.sample(held_w, min(LM_EVAL_WINDOWS, len(held_w)))
        model = _new_tiny_llama(tok, seed=seed, hidden=hidden, layers=layers, heads=heads, ffn=ffn, init_std=init_std,
                                device=device)
        n_params = sum(p.numel() for p in model.parameters())
        loss_before = lm_loss(model, eval_w, tok.pad_token_id, device=device)
        order: list[int] = []
        seen = {"tokens": 0, "epochs": 0}

        def next_batch(step: int) -> dict[str, torch.Tensor]:
            while len(order) < batch:  # a fresh shuffle of every window per epoch
                perm = list(range(len(train_w)))
                rng.shuffle(perm)
                order.extend(perm)
                seen["epochs"] += 1
            items = [train_w[order.pop()] for _ in range(batch)]
            seen["tokens"] += sum(map(len, items))
            return collate([Encoded(w, w) for w in items], tok.pad_token_id)

        left = max(5.0, budget_seconds - (time.perf_counter() - t_start))
        res, loss_after = _train_and_evaluate(
            model, tok, next_batch, lambda: lm_loss(model, eval_w, tok.pad_token_id, device=device),
            "heldout_lm_loss", desc="backbone sni-lm", max_steps=max_steps, lr=lr, budget_s=left, max_warmup=200,
            device=device, tb_dir=tb_dir, progress=progress)
        model.save_pretrained(tmp, safe_serialization=True)
        record = {
            "recipe": extra_recipe or {}, "seed": seed, "params": n_params, "corpus": "sni",
            "docs": len(docs), "heldout_docs": sorted(tasks[i].name for i in held),
            "train_windows": len(train_w), "train_tokens": sum(map(len, train_w)), "heldout_windows": len(eval_w),
            "tokens_seen": seen["tokens"], "epochs_started": seen["epochs"], "seq_len": LM_SEQ_LEN, "batch": batch,
            "steps": res.steps, "train_seconds": round(res.seconds, 1), "tokenizer_seconds": round(t_tok, 1),
            "heldout_lm_loss_before": round(loss_before, 4), "heldout_lm_loss_after": round(loss_after, 4),
            "init_std": init_std, "total_seconds": round(time.perf_counter() - t_start, 1),
            "threads": torch.get_num_threads(),
            **_loss_record(res), "vocab_size": len(tok), "device": device,
        }
        atomic_write_json(tmp / RECIPE_FILE, record)
    return record


def build_tiny_backbone(out_dir: Path, *, seed: int, hidden: int, layers: int, heads: int, ffn: int, vocab: int,
                        copy_seconds: float, copy_lr: float, copy_batch: int, max_steps: int = 100_000,
                        tb_dir: Optional[Path] = None, device: str = "cpu", extra_recipe: Optional[dict] = None,
                        progress: bool = True, init_std: float = INIT_STD) -> dict:
    """Tokenizer + random LLaMA + copy pretraining, published atomically at `out_dir`. Returns the recipe record."""
    from ..data.tokenizer import train_sentencepiece_tokenizer

    t_start = time.perf_counter()
    with atomic_dir(out_dir) as tmp:
        tok = train_sentencepiece_tokenizer(all_wording(build_suite()), tmp, vocab_size=vocab, kind="llama")
        model = _new_tiny_llama(tok, seed=seed, hidden=hidden, layers=layers, heads=heads, ffn=ffn, init_std=init_std,
                                device=device)
        n_params = sum(p.numel() for p in model.parameters())
        data = CopyData(seed)

        def next_batch(step: int) -> dict[str, torch.Tensor]:
            full = step % 2 == 0  # alternate full-format identity prompts and input-only prompts
            return collate([encode_copy(tok, *data.pair(full)) for _ in range(copy_batch)], tok.pad_token_id)

        res, em = _train_and_evaluate(
            model, tok, next_batch, lambda: copy_exact_match(model, tok, seed, device=device), "copy_em",
            desc="backbone copy", max_steps=max_steps, lr=copy_lr, budget_s=copy_seconds, max_warmup=50,
            device=device, tb_dir=tb_dir, progress=progress)
        model.save_pretrained(tmp, safe_serialization=True)
        record = {
            "recipe": extra_recipe or {}, "seed": seed, "params": n_params, "copy_em": round(em, 2),
            "copy_steps": res.steps, "copy_seconds": round(res.seconds, 1), "init_std": init_std,
            "total_seconds": round(time.perf_counter() - t_start, 1), "threads": torch.get_num_threads(),
            **_loss_record(res), "vocab_size": len(tok), "device": device,
        }
        atomic_write_json(tmp / RECIPE_FILE, record)
    return record


def run(cfg, sub: Optional[str] = None, *, progress: bool = True, log: Callable[[str], None] = print,
        use_asset: bool = True, max_steps: int = 100_000) -> Path:
    """Build (or find) the backbone of this config; returns its folder. One process builds it (rank 0 under a
    launcher; the others wait for it at a barrier)."""
    if world_size() > 1:
        path = build(cfg, progress=progress, log=log, use_asset=use_asset, max_steps=max_steps) if rank() == 0 \
            else None
        barrier()
        return path if path is not None else resolve_backbone_path(cfg)
    return build(cfg, progress=progress, log=log, use_asset=use_asset, max_steps=max_steps)


def build(cfg, *, progress: bool = True, log: Callable[[str], None] = print, use_asset: bool = True,
          max_steps: int = 100_000) -> Path:
    """The backbone stage's work in this process."""
    rec = recipe(cfg)
    if cfg.backbone.name_or_path != "auto":
        log(f"backbone: name_or_path={cfg.backbone.name_or_path!r} is given; nothing to build")
        return Path(cfg.backbone.name_or_path)
    if use_asset and recipe_hash_at(ASSET_DIR) == rec["hash"]:
        log(f"backbone: using the committed tiny backbone at {ASSET_DIR} (recipe {rec['hash'][:12]})")
        return ASSET_DIR
    out = RunPaths.of(cfg).backbone
    if recipe_hash_at(out) == rec["hash"]:
        log(f"backbone: {out} already holds recipe {rec['hash'][:12]}; skipping")
        return out
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = str(resolve_device(cfg.device))
    b = cfg.backbone
    if b.pretrain_corpus == "sni":
        from ..data.sni import load_sni

        sni_dir, sdir = sni_dirs(cfg)
        # Train tasks only, every instance in their files (the test split is never read here).
        tasks = load_sni(sni_dir, "train", sdir, max_instances=None, seed=cfg.seed, max_tasks=cfg.data.max_tasks)
        record = build_sni_backbone(out, tasks, seed=cfg.seed, hidden=b.tiny_hidden, layers=b.tiny_layers,
                                    heads=b.tiny_heads, ffn=b.tiny_ffn, vocab=b.tiny_vocab,
                                    budget_seconds=b.copy_pretrain_seconds, lr=b.copy_pretrain_lr,
                                    batch=b.copy_pretrain_batch, max_steps=max_steps,
                                    tb_dir=RunPaths.of(cfg).tb("backbone"), device=device, extra_recipe=rec,
                                    progress=progress)
        log(f"backbone: {out}: {record['params']:,} params, SNI LM pretraining {record['steps']} steps / "
              f"{record['train_seconds']:.0f} s, {record['tokens_seen']:,} tokens; held-out LM loss "
              f"{record['heldout_lm_loss_before']:.3f} -> {record['heldout_lm_loss_after']:.3f}")
        return out
    record = build_tiny_backbone(out, seed=cfg.seed, hidden=b.tiny_hidden, layers=b.tiny_layers, heads=b.tiny_heads,
                                 ffn=b.tiny_ffn, vocab=b.tiny_vocab, copy_seconds=b.copy_pretrain_seconds,
                                 copy_lr=b.copy_pretrain_lr, copy_batch=b.copy_pretrain_batch, max_steps=max_steps,
                                 tb_dir=RunPaths.of(cfg).tb("backbone"), device=device, extra_recipe=rec,
                                 progress=progress)
    log(f"backbone: {out}: {record['params']:,} params, copy EM {record['copy_em']:.1f}% after "
          f"{record['copy_steps']} steps / {record['copy_seconds']:.0f} s")
    return out


def main(args: argparse.Namespace) -> int:
    use_asset = str(getattr(args, "extra", {}).get("use_asset", "true")).lower() not in ("false", "0", "no")
    run(args.cfg, use_asset=use_asset)
    return 0
