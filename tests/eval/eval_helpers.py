"""Tiny word-level tokenizers and tiny T5 / LLaMA models with random weights, for the evaluation tests."""
from __future__ import annotations

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, processors

WORDS = ["yes", "no", "maybe", "question", "answer", "is", "it", "true", "the", "sky", "blue", "green"] + [
    f"w{i}" for i in range(20)]
SPECIALS = ["<pad>", "</s>", "<unk>", "<s>"]  # ids 0..3
VOCAB = {t: i for i, t in enumerate(SPECIALS + WORDS)}
V = 64  # model vocab (≥ len(VOCAB); the rest are never produced by the tokenizer)


def word_tokenizer(arch: str) -> transformers.PreTrainedTokenizerFast:
    """T5 style appends </s>; llama style prepends <s>. Both split on whitespace."""
    tok = Tokenizer(models.WordLevel(vocab=VOCAB, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if arch == "t5":
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
        return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                                    unk_token="<unk>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 3)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                                bos_token="<s>", unk_token="<unk>")


def tiny_t5(seed: int = 0, **kw) -> transformers.T5ForConditionalGeneration:
    cfg = dict(vocab_size=V, d_model=32, d_kv=8, num_heads=4, num_layers=2, num_decoder_layers=2, d_ff=64,
               feed_forward_proj="gated-gelu", decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
               dropout_rate=0.0)
    cfg.update(kw)
    torch.manual_seed(seed)
    # eager attention: CPU SDPA kernels have no FlopCounterMode formula, eager matmuls do
    return transformers.AutoModelForSeq2SeqLM.from_config(transformers.T5Config(**cfg),
                                                          attn_implementation="eager").eval()


def tiny_llama(seed: int = 0, **kw) -> transformers.LlamaForCausalLM:
    cfg = dict(vocab_size=V, hidden_size=32, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, pad_token_id=0, eos_token_id=1, bos_token_id=3)
    cfg.update(kw)
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**cfg),
                                                         attn_implementation="eager").eval()
