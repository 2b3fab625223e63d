"""The on-disk adapter cache: keys, exact round trip, corrupt entries, and no hypernetwork forward on a hit."""
from __future__ import annotations

import torch

from tagi_ds.adapters.adapter_cache import AdapterCache, cache_key
from tagi_ds.adapters.generate import adapters_for_instructions
from tagi_ds.run.peft_io import ADAPTER_WEIGHTS

from tests.adapters.adapters_helpers import ALPHA, R, make_student, tiny_backbone


class _Tok:
    """A character-level stand-in tokenizer (ids 3..), with the two attributes the code reads."""

    pad_token_id, eos_token_id = 0, 1

    def __call__(self, text, truncation=False, max_length=None, add_special_tokens=True):
        ids = [3 + (ord(c) % 200) for c in text][: (max_length or 10 ** 9)]
        return {"input_ids": ids}


def _count_forwards(module):
    calls = []
    module.register_forward_hook(lambda *a: calls.append(1))
    return calls


def test_key_depends_on_every_part():
    k = cache_key("e" * 64, "Say yes.", "bb")
    assert len({k, cache_key("f" * 64, "Say yes.", "bb"), cache_key("e" * 64, "Say no.", "bb"),
                cache_key("e" * 64, "Say yes.", "bb2")}) == 4
    assert cache_key("ab", "c", "d") != cache_key("a", "bc", "d")  # no concatenation collisions
    assert k == cache_key("e" * 64, "Say yes.", "bb")


def test_second_request_runs_no_hypernetwork_forward(tmp_path):
    student = make_student(tiny_backbone("llama"), "llama", fusion=False)
    hyper_calls, backbone_calls = _count_forwards(student.hypernet), _count_forwards(student.backbone.model)
    cache = AdapterCache(tmp_path / "cache", "e" * 64, "tiny-llama")
    texts = ["Copy the input.", "Reverse the words."]
    first = adapters_for_instructions(student, _Tok(), texts, cache=cache, r=R, alpha=ALPHA)
    assert first.n_generated == 2 and len(hyper_calls) == 1 and len(backbone_calls) == 1
    assert cache.path(texts[0]).is_dir() and cache.path(texts[1]).is_dir()

    second = adapters_for_instructions(student, _Tok(), texts, cache=cache, r=R, alpha=ALPHA)
    assert second.n_generated == 0
    assert len(hyper_calls) == 1 and len(backbone_calls) == 1  # neither the hypernetwork nor the encoder ran
    for mt, (a, b) in first.adapters.items():
        assert torch.equal(second.adapters[mt][0], a) and torch.equal(second.adapters[mt][1], b)

    # A partial hit: only the new instruction goes through the hypernetwork, and the order is kept.
    third = adapters_for_instructions(student, _Tok(), [texts[1], "New task.", texts[0]], cache=cache, r=R, alpha=ALPHA)
    assert third.n_generated == 1 and len(hyper_calls) == 2
    mt = next(iter(first.adapters))
    assert torch.equal(third.adapters[mt][0][0], first.adapters[mt][0][1])
    assert torch.equal(third.adapters[mt][0][2], first.adapters[mt][0][0])


def test_fusion_still_encodes_but_does_not_regenerate(tmp_path):
    student = make_student(tiny_backbone("t5"), "t5", fusion=True)
    hyper_calls = _count_forwards(student.hypernet)
    cache = AdapterCache(tmp_path, "e" * 64, "tiny-t5")
    adapters_for_instructions(student, _Tok(), ["Copy."], cache=cache, need_encoding=True)
    again = adapters_for_instructions(student, _Tok(), ["Copy."], cache=cache, need_encoding=True)
    assert len(hyper_calls) == 1 and again.n_generated == 0
    assert again.encoding is not None and again.encoding.hidden.shape[0] == 1


def test_corrupt_entry_is_a_miss_and_is_rewritten(tmp_path):
    student = make_student(tiny_backbone("t5"), "t5", fusion=False)
    hyper_calls = _count_forwards(student.hypernet)
    cache = AdapterCache(tmp_path, "e" * 64, "tiny-t5")
    first = adapters_for_instructions(student, _Tok(), ["Copy."], cache=cache)
    weights = cache.path("Copy.") / ADAPTER_WEIGHTS
    weights.write_bytes(weights.read_bytes()[:100])  # truncated file
    assert cache.load("Copy.", student.specs) is None
    again = adapters_for_instructions(student, _Tok(), ["Copy."], cache=cache)
    assert again.n_generated == 1 and len(hyper_calls) == 2
    assert cache.load("Copy.", student.specs) is not None
    mt = next(iter(first.adapters))
    assert torch.equal(again.adapters[mt][1], first.adapters[mt][1])
    # Another export (new fingerprint) never sees this entry.
    assert AdapterCache(tmp_path, "f" * 64, "tiny-t5").load("Copy.", student.specs) is None
