"""Fixtures for tests/data: small real tokenizers built offline with `tokenizers` (never from a hub)."""
from __future__ import annotations

import pytest

# Text the tokenizers are trained on: prompt scaffolding plus ordinary English, so words get real merges.
_CORPUS = [
    "Definition: You are given a sentence from a conversation between a human and a virtual assistant.",
    "Your task is to identify whether the sentence is a question or not. Answer with Yes or No.",
    " Positive Example 1 -\nInput: I am feeling hungry so I would like to find a place to eat.\n Output: No.\n\n",
    "Now complete the following example -\nInput: Which city should I search?\nOutput: Yes",
    "The cat sat on the mat. A farmer crossed the long road to the market in the morning.",
] * 20


def _bpe_tokenizer(template: str, bos: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # Byte-level: every string encodes and decoding is lossless, as with real LLaMA/T5 byte fallback.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "</s>", "<s>", "<unk>"]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS, trainer)
    ids = {s: tok.token_to_id(s) for s in specials}
    tok.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[("</s>", ids["</s>"]), ("<s>", ids["<s>"])])
    kw = dict(eos_token="</s>", unk_token="<unk>", bos_token="<s>")
    if not bos:
        kw["pad_token"] = "<pad>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kw)


@pytest.fixture(scope="session")
def t5_tokenizer():
    """T5-like: `text </s>` on encode, a pad token."""
    return _bpe_tokenizer("$A </s>", bos=False)


@pytest.fixture(scope="session")
def llama_tokenizer():
    """LLaMA-like: `<s> text` on encode, no pad token (padding falls back to eos)."""
    return _bpe_tokenizer("<s> $A", bos=True)
