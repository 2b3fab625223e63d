"""The TAGI student: frozen backbone + hypernetwork-generated per-task LoRA + instruction fusion.

    instruction ─► frozen backbone (once per task; callers cache the TaskEncoding) ─► pooled ─► hypernetwork ─► LoRA
    input ─► backbone with each row's task LoRA (batched hooks) + instruction K/V (T5 cross-attention, LLaMA
             prefix) ─► logits / tokens

Rows of one batch may belong to different tasks: `task_ids[i]` indexes the encoding's tasks.

T5 fusion: the instruction's keys/values in every decoder cross-attention are projected once per task and shared by
the task's rows and decode steps (`instruction_kv`, fusion.py). When the cross-attention k or v is a LoRA target,
the instruction K/V carry that task's LoRA, so "once per task" means once per task per `instruction_kv` call: a
forward / generate call computes them for the distinct tasks of its batch, unless the caller passes an InstructionKV
it computed once for its tasks and reuses across batches (what the FLOPs model counts).
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import CausalLMOutput, Seq2SeqLMOutput

from ..data.collate import bucket_width
from ..errors import ConfigError, TagiError
from .backbone import TargetSpec, target_specs
from .checkpointing import enable_block_checkpointing, hf_checkpointing_on
from .fusion import (InstructionKV, PrefixKV, cross_fusion_kwargs, expand_prefix, fuse_encoder_states,
                     install_cached_cross_attention, lazy_prefix_cache, llama_instruction_pass, positions_from_mask,
                     prefix_mask_and_positions, select_prefix, t5_instruction_kv)
from .hf_compat import cache_kwargs, output_cache
from .hypernet import HyperNetwork, masked_mean_pool
from .lora import Adapters, BatchedLoraHooks
from .prefix_attention import install_prefix_attention, prefix_fusion, split_pays, supports_prefix_attention


@dataclass
class TaskEncoding:
    """The instructions of n_tasks tasks, as the frozen backbone sees them."""

    pooled: torch.Tensor  # (n_tasks, d): the hypernetwork's input
    hidden: torch.Tensor  # (n_tasks, Li, d): last hidden states (T5 fusion)
    mask: torch.Tensor  # (n_tasks, Li): 1 on real instruction tokens
    prefix: PrefixKV | None = None  # LLaMA fusion: per layer (K, V), each (n_tasks, kv_heads, Li, head_dim)

    @property
    def n_tasks(self) -> int:
        return self.pooled.shape[0]

    def select(self, index: Sequence[int] | torch.Tensor) -> "TaskEncoding":
        """The encoding of a subset of tasks, in the given order."""
        idx = torch.as_tensor(index, dtype=torch.long, device=self.pooled.device)
        return TaskEncoding(self.pooled.index_select(0, idx), self.hidden.index_select(0, idx),
                            self.mask.index_select(0, idx), select_prefix(self.prefix, idx))

    def to(self, device: torch.device | str) -> "TaskEncoding":
        prefix = None if self.prefix is None else tuple((k.to(device), v.to(device)) for k, v in self.prefix)
        return TaskEncoding(self.pooled.to(device), self.hidden.to(device), self.mask.to(device), prefix)


def masked_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over label tokens != -100, in float32. logits (N, T, V), labels (N, T)."""
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)


def _eos_ids(config) -> list[int]:
    eos = config.eos_token_id
    if eos is None:
        return []
    return list(eos) if isinstance(eos, (list, tuple)) else [int(eos)]


def _all_done(done: torch.Tensor, synced_gpus: bool) -> bool:
    """True when every row has finished; with synced_gpus, only when every rank's rows have (ZeRO-3: all ranks
    must run the same number of forwards, or the parameter gathers hang)."""
    flag = (~done).any().to(torch.float32).reshape(1)
    if synced_gpus and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(flag)
    return flag.item() == 0.0


class TagiStudent(nn.Module):
    def __init__(self, backbone: nn.Module, arch: str, specs: Sequence[TargetSpec], hypernet: HyperNetwork,
                 lora_scale: float, fusion: bool = True, train_encoder: bool = False, backend: str = "auto",
                 cache_cross_kv: bool = True, split_prefix: bool = True):
        super().__init__()
        if arch not in ("t5", "llama"):
            raise ConfigError(f"backbone.arch: expected t5 or llama, got {arch!r}")
        self.arch, self.fusion, self.train_encoder = arch, fusion, train_encoder
        # T5: instruction K/V once per task (True) or [instruction ; input] states concatenated per row (False: the
        # pre-issue-18 path, same numbers, kept for benchmarks). No effect on LLaMA (its prefix is always reused).
        self.cache_cross_kv = bool(cache_cross_kv)
        # LLaMA teacher-forced forwards: attention over [task prefix ; own row] split in two (prefix_attention.py),
        # the prefix never copied per row (True, when the backbone's attention has LLaMA's layout, for inputs short
        # enough: `split_pays`), or the per-layer expanded prefix cache + SDPA (False: the pre-issue-20 path, same
        # numbers, kept for benchmarks and long inputs).
        self.split_prefix = bool(split_prefix and arch == "llama" and fusion and supports_prefix_attention(backbone))
        self.specs = list(specs)
        self.lora_scale = float(lora_scale)
        # HINT-style trainable instruction encoder: a copy made BEFORE the hooks exist, so it carries none.
        self.instruction_encoder: nn.Module | None = None
        if train_encoder:
            src = backbone.encoder if arch == "t5" else backbone.base_model
            self.instruction_encoder = copy.deepcopy(src)
            for p in self.instruction_encoder.parameters():
                p.requires_grad_(True)
        self.backbone = backbone
        self.hypernet = hypernet
        self.hooks = BatchedLoraHooks(backbone, self.specs, self.lora_scale, backend=backend)
        self._cross_lora = any(s.module_type in ("dec_cross.k", "dec_cross.v") for s in self.specs)
        if arch == "t5" and fusion and self.cache_cross_kv:
            install_cached_cross_attention(backbone)
        if self.split_prefix:
            install_prefix_attention(backbone)
        # hypernet.encoder=multitask: a fixed LoRA (the multitask model's) applied while the instruction is read;
        # plain attributes, not buffers: never in a state dict or an export (the config names it).
        self.instruction_adapter: Adapters | None = None  # module type → (A (1, L, r, d_in), B (1, L, d_out, r))

    def set_instruction_adapter(self, adapters: Adapters | None, scale: float = 1.0) -> None:
        """Read every instruction through backbone + this LoRA (A (L, r, d_in), B (L, d_out, r) per module type, its
        own scale `scale`; None = the plain backbone). The student's hooks carry it, B rescaled to their scale, during
        `encode_instructions` only: the input path keeps the generated adapters. T5 and LLaMA alike (on T5 the
        encoder's targets take it, so the instruction states fused into the decoder are the multitask encoder's)."""
        if adapters is None:
            self.instruction_adapter = None
            return
        if self.train_encoder:
            raise ConfigError("hypernet.encoder=multitask reads the instruction through the backbone's hooks; a "
                              "trained encoder copy (hypernet.train_encoder) has none: use one or the other")
        self.hooks.check_adapters({mt: (a[None], b[None]) for mt, (a, b) in adapters.items()}, 1)
        ratio = float(scale) / self.lora_scale
        self.instruction_adapter = {mt: (a[None].detach().clone(), (b * ratio)[None].detach().clone())
                                    for mt, (a, b) in adapters.items()}

    def _instruction_lora(self, n_tasks: int, device: torch.device) -> contextlib.AbstractContextManager:
        if self.instruction_adapter is None:
            return contextlib.nullcontext()
        dtype = next(self.backbone.parameters()).dtype
        ad = {mt: (a.to(device, dtype), b.to(device, dtype)) for mt, (a, b) in self.instruction_adapter.items()}
        return self.hooks.apply(ad, torch.zeros(n_tasks, dtype=torch.long, device=device))

    def train(self, mode: bool = True) -> "TagiStudent":
        super().train(mode)
        self.backbone.eval()  # the frozen backbone never uses dropout
        return self

    def enable_activation_checkpointing(self, enabled: bool = True) -> None:
        """Checkpoint the frozen backbone's blocks (non-reentrant) keeping the LoRA terms and the LLaMA prefix in
        the recompute (modeling/checkpointing.py); what backbone.gradient_checkpointing=true switches on."""
        enable_block_checkpointing(self.backbone, self.arch, self.hooks, enabled)

    def _check_no_checkpointing(self) -> None:
        # HF's own layer checkpointing drops past_key_values (the LLaMA instruction prefix) and would recompute the
        # layers in backward, outside `hooks.apply` (LoRA off): refuse it; ours is enable_activation_checkpointing.
        if hf_checkpointing_on(self.backbone):
            raise ConfigError("backbone.gradient_checkpointing: HF gradient checkpointing is not supported by the "
                              "TAGI student (it drops the instruction prefix and recomputes without the LoRA hooks); "
                              "use TagiStudent.enable_activation_checkpointing() instead")

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights that training changes (hypernetwork, and the instruction encoder if trained)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("backbone.")}

    # ------------------------------------------------------------------------------------------- instructions
    def encode_instructions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TaskEncoding:
        """Encode n_tasks instructions (n_tasks, Li) once; the generated adapters are inactive here (the plain
        backbone, or the backbone + the instruction adapter: `set_instruction_adapter`)."""
        if self.hooks._state is not None:
            raise TagiError("encode_instructions called inside hooks.apply: instructions must see the plain backbone")
        grad = contextlib.nullcontext() if self.train_encoder else torch.no_grad()
        prefix = None
        lora = self._instruction_lora(input_ids.shape[0], input_ids.device)
        if self.arch == "t5":
            enc = self.instruction_encoder if self.train_encoder else self.backbone.encoder
            with grad, lora:
                hidden = enc(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        else:
            if self.fusion or not self.train_encoder:
                with lora:
                    hidden, prefix = llama_instruction_pass(self.backbone, input_ids, attention_mask)
            if self.train_encoder:
                hidden = self.instruction_encoder(input_ids=input_ids, attention_mask=attention_mask,
                                                  position_ids=positions_from_mask(attention_mask)).last_hidden_state
            if not self.fusion:
                prefix = None
        with grad:
            pooled = masked_mean_pool(hidden, attention_mask)  # (n_tasks, d)
        return TaskEncoding(pooled, hidden, attention_mask, prefix)

    def encode_instruction_rows(self, rows: Sequence[Sequence[int]], pad_id: int, device: torch.device | str,
                                chunk: int = 16, width_multiple: int = 1) -> TaskEncoding:
        """Encode token rows of instructions once, in fixed chunks of one common width (every rank runs the same
        forwards: ZeRO-3 gathers stay in step): the longest row rounded up to a multiple of `width_multiple`
        (masked padding; few distinct shapes, see collate.WIDTH_BUCKET). Returns a CPU TaskEncoding of len(rows)
        tasks."""
        if not rows:
            raise TagiError("no instructions to encode: the stage has no tasks")
        width = bucket_width(max(len(r) for r in rows), width_multiple)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(list(r), dtype=torch.long)
            mask[i, :len(r)] = 1
        parts = [self.encode_instructions(ids[s:s + chunk].to(device), mask[s:s + chunk].to(device)).to("cpu")
                 for s in range(0, len(rows), chunk)]
        prefix = None
        if parts[0].prefix is not None:
            prefix = tuple((torch.cat([p.prefix[layer][0] for p in parts]),
                            torch.cat([p.prefix[layer][1] for p in parts])) for layer in range(len(parts[0].prefix)))
        return TaskEncoding(torch.cat([p.pooled for p in parts]), torch.cat([p.hidden for p in parts]),
                            torch.cat([p.mask for p in parts]), prefix)

    def generate_adapters(self, encoding: TaskEncoding) -> Adapters:
        return self.hypernet(encoding.pooled)

    def instruction_kv(self, encoding: TaskEncoding, adapters: Adapters | None = None,
                       tasks: Sequence[int] | torch.Tensor | None = None) -> InstructionKV:
        """T5: every decoder cross-attention's K/V over the instruction states of `tasks` (default: all of the
        encoding's), each task once. With LoRA on the cross-attention k/v, task t's K/V carry task t's adapter
        (from `adapters`, generated when not given): exactly what the task's rows computed when they projected the
        concatenated states themselves. Call outside `hooks.apply`."""
        if self.arch != "t5":
            raise TagiError("instruction_kv is the T5 cross-attention cache; LLaMA reuses its TaskEncoding.prefix")
        device = encoding.hidden.device
        tasks = (torch.arange(encoding.n_tasks, device=device) if tasks is None
                 else torch.as_tensor(tasks, dtype=torch.long, device=device))
        everything = tasks.numel() == encoding.n_tasks and bool((tasks == torch.arange(tasks.numel(),
                                                                                         device=device)).all())
        hidden = encoding.hidden if everything else encoding.hidden.index_select(0, tasks)  # (n, Li, d)
        mask = encoding.mask if everything else encoding.mask.index_select(0, tasks)  # (n, Li)
        lora = contextlib.nullcontext()
        if self._cross_lora:
            lora = self.hooks.apply(adapters if adapters is not None else self.generate_adapters(encoding), tasks)
        install_cached_cross_attention(self.backbone)
        with lora:
            return t5_instruction_kv(self.backbone, hidden, mask, tasks)

    def _t5_cross_kwargs(self, encoding: TaskEncoding, task_ids: torch.Tensor, attention_mask: torch.Tensor,
                         adapters: Adapters, instruction_kv: InstructionKV | None) -> dict:
        """The backbone keyword of the cached cross-attention path ({} on the concatenation path or without fusion);
        the instruction K/V of the batch's tasks are computed here, once each, unless given."""
        if not (self.fusion and self.cache_cross_kv):
            return {}
        if instruction_kv is None:
            instruction_kv = self.instruction_kv(encoding, adapters, torch.unique(task_ids))
        return cross_fusion_kwargs(instruction_kv, task_ids, encoding.n_tasks, attention_mask)

    # ------------------------------------------------------------------------------------------- forward
    def forward(self, encoding: TaskEncoding, task_ids: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor, labels: torch.Tensor | None = None,
                decoder_input_ids: torch.Tensor | None = None, adapters: Adapters | None = None,
                instruction_kv: InstructionKV | None = None, logits_to_keep: torch.Tensor | None = None):
        """Logits of the batch (and mean CE over labels != -100). T5: labels = target ids. LLaMA: input_ids =
        prompt+target (right- or left-padded), labels aligned with input_ids, -100 on prompt/pad.
        instruction_kv (T5): the batch's tasks' instruction K/V, if the caller computed them already.
        logits_to_keep (LLaMA, no labels): 1-D positions whose logits are computed (transformers' argument): the
        LM head runs over those alone."""
        self._check_no_checkpointing()
        task_ids = task_ids.to(input_ids.device).long()
        if adapters is None:
            adapters = self.generate_adapters(encoding)
        cross = (self._t5_cross_kwargs(encoding, task_ids, attention_mask, adapters, instruction_kv)
                 if self.arch == "t5" else {})
        keep = {} if logits_to_keep is None else {"logits_to_keep": logits_to_keep}
        with self.hooks.apply(adapters, task_ids):
            if self.arch == "t5":
                if decoder_input_ids is None:
                    if labels is None:
                        raise TagiError("T5 forward needs labels or decoder_input_ids")
                    decoder_input_ids = self.backbone._shift_right(labels)
                states, mask = self._t5_encode_inputs(encoding, task_ids, input_ids, attention_mask)
                out = self.backbone(encoder_outputs=(states,), attention_mask=mask,
                                    decoder_input_ids=decoder_input_ids, use_cache=False, **cross)
                loss = None if labels is None else masked_lm_loss(out.logits, labels)
                return Seq2SeqLMOutput(loss=loss, logits=out.logits)
            split = (self.fusion and self.split_prefix and encoding.prefix is not None
                     and split_pays(self.backbone.config, input_ids.shape[1]))
            if split:  # no HF mask: the keyword's bias is the mask
                _, positions = prefix_mask_and_positions(encoding.mask, attention_mask, task_ids)
                state = self.hooks.current_state()
                fused = prefix_fusion(encoding.prefix, encoding.mask, attention_mask, task_ids, state.groups)
                out = self.backbone(input_ids=input_ids, position_ids=positions, use_cache=False, **fused, **keep)
            else:
                mask, positions, cache = self._llama_prefix(encoding, task_ids, attention_mask, lazy=True)
                out = self.backbone(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                                    use_cache=False, **cache_kwargs(self.backbone, cache), **keep)
            loss = None if labels is None else masked_lm_loss(out.logits[:, :-1], labels[:, 1:])
            return CausalLMOutput(loss=loss, logits=out.logits)

    def _t5_encode_inputs(self, encoding: TaskEncoding, task_ids: torch.Tensor, input_ids: torch.Tensor,
                          attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder over the inputs (with LoRA, hooks active); on the concatenation path, fused with the instruction
        states (the cached path reads the instruction's K/V instead: see _t5_cross_kwargs)."""
        states = self.backbone.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if not self.fusion or self.cache_cross_kv:
            return states, attention_mask
        return fuse_encoder_states(encoding.hidden, encoding.mask, states, attention_mask, task_ids)

    def _llama_prefix(self, encoding: TaskEncoding, task_ids: torch.Tensor, attention_mask: torch.Tensor,
                      lazy: bool = False):
        """(attention mask, position ids, cache) for the input rows, with the instruction prefix when fusing.
        `lazy`: one teacher-forced forward (the prefix stays per task, expanded per layer: fusion.lazy_prefix_cache);
        otherwise a per-row cache that generation grows step by step."""
        if self.fusion and encoding.prefix is not None:
            mask, positions = prefix_mask_and_positions(encoding.mask, attention_mask, task_ids)
            make = lazy_prefix_cache if lazy else expand_prefix
            return mask, positions, make(encoding.prefix, task_ids, self.backbone.config)
        if self.fusion:
            raise TagiError("fusion is on but the TaskEncoding has no prefix (encode_instructions with fusion=True)")
        return attention_mask, positions_from_mask(attention_mask), None

    # ------------------------------------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(self, encoding: TaskEncoding, task_ids: torch.Tensor, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor, max_new_tokens: int, synced_gpus: bool = False,
                 adapters: Adapters | None = None, instruction_kv: InstructionKV | None = None) -> torch.Tensor:
        """Greedy decoding, batched across tasks → new tokens (N, max_new_tokens): EOS kept, pad after it.
        LLaMA inputs must be left-padded (the last column is each row's last prompt token). T5: the instruction
        K/V are computed once for the call (or given) and read at every step; the input's at the first step."""
        cfg = self.backbone.config
        eos = torch.tensor(_eos_ids(cfg), device=input_ids.device, dtype=torch.long)
        pad = cfg.pad_token_id if cfg.pad_token_id is not None else (int(eos[0]) if eos.numel() else 0)
        task_ids = task_ids.to(input_ids.device).long()
        n = input_ids.shape[0]
        if adapters is None:
            adapters = self.generate_adapters(encoding)
        out_tokens = torch.full((n, max_new_tokens), pad, dtype=torch.long, device=input_ids.device)
        done = torch.zeros(n, dtype=torch.bool, device=input_ids.device)
        cross = (self._t5_cross_kwargs(encoding, task_ids, attention_mask, adapters, instruction_kv)
                 if self.arch == "t5" else {})
        with self.hooks.apply(adapters, task_ids):
            if self.arch == "t5":
                states, enc_mask = self._t5_encode_inputs(encoding, task_ids, input_ids, attention_mask)
                step_in = torch.full((n, 1), cfg.decoder_start_token_id, dtype=torch.long, device=input_ids.device)
                kwargs = dict(encoder_outputs=(states,), attention_mask=enc_mask, **cross)
                cache = None  # created by the decoder on the first step
            else:
                mask, positions, cache = self._llama_prefix(encoding, task_ids, attention_mask)
                step_in = input_ids
                kwargs = dict(attention_mask=mask, position_ids=positions)
            for step in range(max_new_tokens):
                if self.arch == "t5":
                    out = self.backbone(decoder_input_ids=step_in, use_cache=True,
                                        **cache_kwargs(self.backbone, cache), **kwargs)
                else:  # logits of the last position only: the prompt's other logits are never read
                    out = self.backbone(input_ids=step_in, use_cache=True, logits_to_keep=1,
                                        **cache_kwargs(self.backbone, cache), **kwargs)
                cache = output_cache(out)
                nxt = out.logits[:, -1].argmax(dim=-1)  # (N,)
                nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
                out_tokens[:, step] = nxt
                done = done | torch.isin(nxt, eos)
                if _all_done(done, synced_gpus):
                    break
                step_in = nxt[:, None]
                if self.arch == "llama":  # the new token: mask 1, position one after the row's last
                    kwargs["attention_mask"] = torch.cat([kwargs["attention_mask"], torch.ones_like(step_in)], dim=1)
                    kwargs["position_ids"] = kwargs["position_ids"][:, -1:] + 1
        return out_tokens


def build_student(backbone: nn.Module, arch: str, target_kinds: Sequence[str], r: int, alpha: float,
                  hidden: int = 256, trunk_layers: int = 2, embed_dim: int = 64, fusion: bool = True,
                  train_encoder: bool = False, backend: str = "auto", cache_cross_kv: bool = True,
                  split_prefix: bool = True) -> TagiStudent:
    """Specs from the backbone's config, a fresh hypernetwork (ΔW = 0 at init), LoRA scale alpha / r.
    cache_cross_kv=False: T5's old concatenation path; split_prefix=False: LLaMA's expanded prefix cache (benchmarks
    only)."""
    if r <= 0:
        raise ConfigError(f"hypernet.r: expected a positive rank, got {r}")
    specs = target_specs(backbone.config, list(target_kinds))
    d_model = backbone.config.d_model if arch == "t5" else backbone.config.hidden_size
    hypernet = HyperNetwork(specs, d_model, r, hidden=hidden, trunk_layers=trunk_layers, embed_dim=embed_dim,
                            backend=backend)
    return TagiStudent(backbone, arch, specs, hypernet, alpha / r, fusion=fusion, train_encoder=train_encoder,
                       backend=backend, cache_cross_kv=cache_cross_kv, split_prefix=split_prefix)
