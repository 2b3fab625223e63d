"""Train a small sentencepiece tokenizer on a corpus and publish it as a `transformers` tokenizer.

The offline demo's backbone has no pretrained vocabulary, so we train one on every text the suite can show
(`synthetic.all_wording`). Details that matter:
- identity normalisation and no whitespace collapsing, so newlines of the Tk-Instruct prompt survive a round trip;
- byte fallback, so text outside the corpus still encodes (as bytes) instead of collapsing to <unk>;
- transformers 5's `LlamaTokenizer` is a BPE `tokenizers` backend, so kind="llama" needs model_type="bpe";
  `T5Tokenizer` is Unigram-based and takes either (a BPE model is converted, as upstream does). BPE is the default
  for both: on a corpus as small and repetitive as the suite's, sentencepiece's unigram trainer keeps few whole
  words (most pieces come out as characters), while BPE learns one piece per word.
Special ids: llama <unk>=0 <s>=1 </s>=2 <pad>=3 (bos added on encode); t5 <pad>=0 </s>=1 <unk>=2 (eos appended).
"""
from __future__ import annotations

import io
import tempfile
from pathlib import Path
from typing import Iterable, Literal

from ..errors import DataError
from ..io_utils import atomic_dir

# sentencepiece refuses sentences longer than this (bytes); a Tk-Instruct prompt is far shorter, SNI's can be longer.
_MAX_SENTENCE_BYTES = 1 << 14


def _train_sentencepiece(texts: Iterable[str], vocab_size: int, model_type: str, kind: str) -> bytes:
    import sentencepiece as spm

    specials = (dict(unk_id=0, bos_id=1, eos_id=2, pad_id=3) if kind == "llama"
                else dict(pad_id=0, eos_id=1, unk_id=2, bos_id=-1))
    corpus = [t for t in texts if t and t.strip()]
    if not corpus:
        raise DataError("tokenizer corpus is empty: give at least one non-blank text")
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(corpus), model_writer=buf, vocab_size=vocab_size, model_type=model_type,
            hard_vocab_limit=False,  # a small corpus may hold fewer pieces than asked for: take what it has
            normalization_rule_name="identity", remove_extra_whitespaces=False, byte_fallback=True,
            character_coverage=1.0, max_sentence_length=_MAX_SENTENCE_BYTES, train_extremely_large_corpus=False,
            minloglevel=2, num_threads=1, **specials)
    except RuntimeError as e:
        raise DataError(f"sentencepiece training failed (vocab_size={vocab_size}, model_type={model_type}): {e}. "
                        "Byte fallback needs vocab_size >= ~300 plus the corpus characters.") from None
    return buf.getvalue()


def train_sentencepiece_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 1000,
                                  model_type: Literal["unigram", "bpe"] | None = None,
                                  kind: Literal["llama", "t5"] = "llama", extra_ids: int = 0):
    """Train sentencepiece on `texts` and save a transformers tokenizer to `out_dir` (atomically).

    model_type defaults to "bpe" (see the module docstring). `extra_ids` adds T5 sentinels <extra_id_N>.
    Returns the tokenizer, loaded back from `out_dir` (so what you get is what `from_pretrained` gives).
    """
    from transformers import AutoTokenizer, LlamaTokenizer, T5Tokenizer

    if kind not in ("llama", "t5"):
        raise DataError(f"tokenizer kind must be 'llama' or 't5', got {kind!r}")
    model_type = model_type or "bpe"
    if model_type not in ("unigram", "bpe"):
        raise DataError(f"tokenizer model_type must be 'unigram' or 'bpe', got {model_type!r}")
    if kind == "llama" and model_type != "bpe":
        raise DataError("kind='llama' needs model_type='bpe': transformers 5's LlamaTokenizer is a BPE backend "
                        "and would re-read a unigram model as characters")
    proto = _train_sentencepiece(texts, vocab_size, model_type, kind)
    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory() as raw, atomic_dir(out_dir) as tmp:
        (Path(raw) / "tokenizer.model").write_bytes(proto)
        if kind == "llama":
            tok = LlamaTokenizer.from_pretrained(raw, pad_token="<pad>", add_bos_token=True, add_eos_token=False)
        else:
            tok = T5Tokenizer.from_pretrained(raw, extra_ids=extra_ids)
        tok.save_pretrained(tmp)
        (tmp / "sentencepiece.model").write_bytes(proto)  # the raw model, for tools that want sentencepiece itself
    return AutoTokenizer.from_pretrained(out_dir)
