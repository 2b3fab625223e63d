"""Everything tiny the tests build, in one place: models from configs, backbone folders (a sentencepiece tokenizer
trained on the synthetic suite's wording + seeded weights, what `from_pretrained` and the stages read), small
tokenizers, TAGI students and token ids. Offline: nothing comes from a hub.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch
import transformers

from tagi_ds.modeling.backbone import KINDS
from tagi_ds.modeling.tagi import TagiStudent, build_student
from tagi_ds.modeling.tiny import build_from_config, tiny_llama_config, tiny_t5_config

ALL_KINDS = list(KINDS)


# ------------------------------------------------------------------------------------------------ models
def tiny_backbone(arch: str, *, d_model: int = 32, vocab_size: int = 256, heads: int = 4, kv_heads: Optional[int] = 2,
                  ffn: int = 64, wide_init: bool = False, seed: int = 0, **special):
    """A seeded, frozen 2-layer T5 or LLaMA. `wide_init`: a wider init than HF's default, so a random model's greedy
    output depends on its input (HF's init gives near-uniform logits: every row predicts the same token, and
    prediction comparisons would prove nothing)."""
    if arch == "t5":
        cfg = tiny_t5_config(vocab_size=vocab_size, d_model=d_model, num_layers=2, num_heads=heads, d_ff=ffn, **special)
    else:
        cfg = tiny_llama_config(vocab_size=vocab_size, hidden_size=d_model, num_layers=2, num_heads=heads,
                                num_kv_heads=kv_heads, intermediate_size=ffn, **special)
    if wide_init:
        cfg.initializer_range, cfg.initializer_factor = 0.3, 8.0
    return build_from_config(cfg, seed=seed, frozen=True)


def make_student(arch: str, backbone=None, *, fusion: bool = True, train_encoder: bool = False,
                 kinds: Optional[Sequence[str]] = None, r: int = 4, alpha: float = 8.0,
                 backend: str = "auto") -> TagiStudent:
    """A TAGI student (hidden 32) on `backbone` (default: `tiny_backbone(arch)`), hypernetwork seeded with 1."""
    backbone = backbone if backbone is not None else tiny_backbone(arch)
    torch.manual_seed(1)
    return build_student(backbone, arch, list(kinds or ALL_KINDS), r=r, alpha=alpha, hidden=32, trunk_layers=2,
                         embed_dim=8, fusion=fusion, train_encoder=train_encoder, backend=backend)


def randomize_b_heads(student: TagiStudent, std: float = 0.05, seed: int = 2) -> None:
    """Non-zero B half of every hypernetwork head (weight rows and bias), so generated adapters change the backbone
    (ΔW ≠ 0); a fresh head's B half is exactly zero."""
    g = torch.Generator().manual_seed(seed)
    hn = student.hypernet
    with torch.no_grad():
        for i, mt in enumerate(hn.types):
            n_a = hn.r * hn.shapes[mt][1]
            for p in (hn.head_weight[str(i)], hn.head_bias[str(i)]):
                p[n_a:] = torch.randn(p[n_a:].shape, generator=g) * std


def rand_ids(shape, seed: int, low: int = 3, high: int = 250) -> torch.Tensor:
    return torch.randint(low, high, shape, generator=torch.Generator().manual_seed(seed))


def eager_t5(seed: int = 0, **kw) -> transformers.T5ForConditionalGeneration:
    """A T5 on `WORD_VOCAB`'s ids with eager attention: CPU SDPA kernels have no FlopCounterMode formula."""
    cfg = dict(vocab_size=WORD_V, d_model=32, d_kv=8, num_heads=4, num_layers=2, num_decoder_layers=2, d_ff=64,
               feed_forward_proj="gated-gelu", decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
               dropout_rate=0.0)
    cfg.update(kw)
    torch.manual_seed(seed)
    return transformers.AutoModelForSeq2SeqLM.from_config(transformers.T5Config(**cfg),
                                                          attn_implementation="eager").eval()


def eager_llama(seed: int = 0, **kw) -> transformers.LlamaForCausalLM:
    """A LLaMA (GQA: 4 query heads, 2 KV heads) on `WORD_VOCAB`'s ids with eager attention."""
    cfg = dict(vocab_size=WORD_V, hidden_size=32, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, pad_token_id=0, eos_token_id=1, bos_token_id=3)
    cfg.update(kw)
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**cfg),
                                                         attn_implementation="eager").eval()


# ------------------------------------------------------------------------------------------------ tokenizers
WORDS = ["yes", "no", "maybe", "question", "answer", "is", "it", "true", "the", "sky", "blue", "green"] + [
    f"w{i}" for i in range(20)]
WORD_SPECIALS = ["<pad>", "</s>", "<unk>", "<s>"]  # ids 0..3
WORD_VOCAB = {t: i for i, t in enumerate(WORD_SPECIALS + WORDS)}
WORD_V = 64  # model vocab of the eager models (≥ len(WORD_VOCAB); the rest are never produced by the tokenizer)


def word_tokenizer(arch: str, words: Optional[Sequence[str]] = None) -> transformers.PreTrainedTokenizerFast:
    """Whitespace word-level tokenizer: T5 style appends </s>; llama style prepends <s>; arch None: no framing."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = WORD_VOCAB if words is None else {t: i for i, t in enumerate(WORD_SPECIALS + list(words))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    kw = dict(pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    if arch == "t5":
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    elif arch == "llama":
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 3)])
        kw["bos_token"] = "<s>"
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, **kw)


_BPE_CORPUS = [
    "Definition: You are given a sentence from a conversation between a human and a virtual assistant.",
    "Your task is to identify whether the sentence is a question or not. Answer with Yes or No.",
    " Positive Example 1 -\nInput: I am feeling hungry so I would like to find a place to eat.\n Output: No.\n\n",
    "Now complete the following example -\nInput: Which city should I search?\nOutput: Yes",
    "The cat sat on the mat. A farmer crossed the long road to the market in the morning.",
] * 20


def bpe_tokenizer(arch: str) -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE (every string encodes, decoding is lossless) trained on prompt scaffolding and English.
    T5-like: `text </s>` and a pad token; LLaMA-like: `<s> text` and NO pad token (padding falls back to eos)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "</s>", "<s>", "<unk>"]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_BPE_CORPUS, trainer)
    ids = {s: tok.token_to_id(s) for s in specials}
    template = "$A </s>" if arch == "t5" else "<s> $A"
    tok.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[("</s>", ids["</s>"]), ("<s>", ids["<s>"])])
    kw = dict(eos_token="</s>", unk_token="<unk>", bos_token="<s>")
    if arch == "t5":
        kw["pad_token"] = "<pad>"
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, **kw)


# ------------------------------------------------------------------------------------------------ folders
def backbone_dir(out: Path, arch: str = "llama", *, hidden: int = 64, heads: int = 4, kv_heads: Optional[int] = None,
                 ffn: int = 128, vocab: int = 600, suite_size: tuple[int, int] = (20, 5), wide_init: bool = False,
                 seed: int = 0) -> Path:
    """A backbone folder: a sentencepiece tokenizer trained on the synthetic suite's wording (`suite_size` =
    instances per task, held back) + a seeded random 2-layer `arch` model, saved together."""
    from tagi_ds.data.synthetic import all_wording, build_suite
    from tagi_ds.data.tokenizer import train_sentencepiece_tokenizer

    texts = all_wording(build_suite(instances_per_task=suite_size[0], held_back_per_task=suite_size[1]))
    tok = train_sentencepiece_tokenizer(texts, out, vocab_size=vocab, kind="llama" if arch == "llama" else "t5")
    if arch == "llama":
        special = dict(pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    else:
        special = dict(pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                       decoder_start_token_id=tok.pad_token_id)
    model = tiny_backbone(arch, d_model=hidden, vocab_size=len(tok), heads=heads, kv_heads=kv_heads or heads,
                          ffn=ffn, wide_init=wide_init, seed=seed, **special)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    return out


def small_backbone_dir(out: Path, arch: str = "llama", seed: int = 0) -> Path:
    """The recipes' and reliability tests' backbone: hidden 32, 2 heads, vocab 400 (fast enough for DeepSpeed runs)."""
    return backbone_dir(out, arch, hidden=32, heads=2, ffn=64, vocab=400, suite_size=(12, 2), seed=seed)


def nopad_llama_dir(out: Path, hidden: int = 32) -> Path:
    """A LLaMA backbone folder whose tokenizer has NO pad token (as Llama-2's): bpe_tokenizer("llama") + a seeded
    2-layer model with pad_token_id None."""
    tok = bpe_tokenizer("llama")
    assert tok.pad_token_id is None
    cfg = tiny_llama_config(vocab_size=len(tok), hidden_size=hidden, num_layers=2, num_heads=2, intermediate_size=64,
                            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    cfg.pad_token_id = None
    model = build_from_config(cfg, seed=0)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
