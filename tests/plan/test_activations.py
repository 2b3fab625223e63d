"""The activation formula (tagi_ds/plan/activations.py) against the bytes autograd really saves on tiny models:
an upper bound within 20% (eval mode, T5 in train mode with dropout, LLaMA eager / sdpa, fp32 / bf16)."""
from __future__ import annotations

import pytest
import torch

from tagi_ds.plan.activations import activation_bytes
from tagi_ds.plan.shapes import backbone_shape


def _saved_activation_bytes(model: torch.nn.Module, fn, exclude: frozenset = frozenset()) -> int:
    """Bytes of distinct storages autograd saves during fn(), parameters (and the `exclude` storages) excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()} | set(exclude)
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("train_mode", [False, True])
def test_activation_formula_bounds_real_t5(dtype, train_mode):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    c = T5Config(d_model=64, d_ff=128, d_kv=16, num_heads=4, num_layers=2, vocab_size=100,
                 feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.1)
    m = T5ForConditionalGeneration(c).to(dtype).train(train_mode)  # every weight trainable: the worst case
    B, s_in, s_t = 4, 64, 32
    emb = m.shared(torch.randint(0, 100, (B, s_in))).detach().requires_grad_(True)
    dem = m.shared(torch.randint(0, 100, (B, s_t))).detach()

    am = torch.ones(B, s_in, dtype=torch.long)
    am[0, -5:] = 0  # padded, as every stage's batch is (the bias mask then comes in the compute dtype)

    def run():
        enc = m.encoder(inputs_embeds=emb, attention_mask=am).last_hidden_state
        return m.decoder(inputs_embeds=dem, encoder_hidden_states=enc, encoder_attention_mask=am).last_hidden_state

    measured = _saved_activation_bytes(m, run)
    elem = 4 if dtype == torch.float32 else 2
    impl = m.config._attn_implementation  # transformers 5: sdpa (CPU: the fp32 math path with T5's float bias)
    predicted = activation_bytes(backbone_shape(c, "t5"), B, 0, s_in, s_t, False, impl, elem,
                                 dropout=train_mode, cuda=False)["layers_no_ckpt"]
    assert 0.8 * predicted <= measured <= predicted  # an upper bound, and a tight one


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_activation_formula_bounds_real_llama(dtype, impl):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    c = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=100)
    m = LlamaForCausalLM(c).eval().to(dtype)
    m.config._attn_implementation = impl
    B, s_in, s_t = 4, 64, 32
    x = m.model.embed_tokens(torch.randint(0, 100, (B, s_in + s_t))).detach().requires_grad_(True)
    measured = _saved_activation_bytes(m, lambda: m.model(inputs_embeds=x).last_hidden_state)
    elem = 4 if dtype == torch.float32 else 2
    predicted = activation_bytes(backbone_shape(c, "llama"), B, 0, s_in, s_t, False, impl, elem,
                                 cuda=False)["layers_no_ckpt"]
    assert 0.8 * predicted <= measured <= predicted


def test_dropout_costs_masks_only_in_train_mode():
    from tagi_ds.modeling.tiny import tiny_t5_config

    sh = backbone_shape(tiny_t5_config(dropout_rate=0.1), "t5")
    for cuda in (False, True):
        off = activation_bytes(sh, 2, 0, 32, 8, False, "sdpa", 2, cuda=cuda)["layers_no_ckpt"]
        on = activation_bytes(sh, 2, 0, 32, 8, False, "sdpa", 2, dropout=True, cuda=cuda)["layers_no_ckpt"]
        assert on > off
    cpu = activation_bytes(sh, 2, 0, 32, 8, False, "sdpa", 2, dropout=True, cuda=False)["layers_no_ckpt"]
    assert on < cpu  # CUDA keeps bool masks and no probabilities; CPU's math path keeps both in fp32
    sh0 = backbone_shape(tiny_t5_config(dropout_rate=0.0), "t5")
    assert activation_bytes(sh0, 2, 0, 32, 8, False, "sdpa", 2, dropout=True)["layers_no_ckpt"] == \
        activation_bytes(sh0, 2, 0, 32, 8, False, "sdpa", 2)["layers_no_ckpt"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", ["t5", "llama"])
def test_frozen_backbone_with_lora_hooks(arch, dtype):
    """What the stages run: a frozen backbone, per-row LoRA on q and v through `BatchedLoraHooks`, padded inputs.
    The per-row A / B copies are `structures.per_row_lora_bytes`; the rest is the frozen formula."""
    from tagi_ds.modeling.backbone import target_specs
    from tagi_ds.modeling.lora import BatchedLoraHooks
    from tagi_ds.modeling.tiny import build_from_config, tiny_llama_config, tiny_t5_config
    from tagi_ds.plan.activations import Lora
    from tagi_ds.plan.structures import per_row_lora_bytes

    torch.manual_seed(0)
    c = (tiny_t5_config(vocab_size=100, d_model=64, num_layers=2, num_heads=4, d_ff=128, feed_forward_proj="gated-gelu")
         if arch == "t5" else
         tiny_llama_config(vocab_size=100, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                           intermediate_size=128))
    m = build_from_config(c, frozen=True).to(dtype)
    specs = target_specs(c, ["q", "v"])
    r, B, s_in, s_t = 8, 4, 64, 16
    hooks = BatchedLoraHooks(m, specs, 2.0, backend="reference")
    adapters = {}
    for s in specs:
        adapters.setdefault(s.module_type, (
            torch.randn(2, sum(x.module_type == s.module_type for x in specs), r, s.d_in, dtype=dtype,
                        requires_grad=True),
            torch.randn(2, sum(x.module_type == s.module_type for x in specs), s.d_out, r, dtype=dtype,
                        requires_grad=True)))
    frozen = {t.untyped_storage().data_ptr() for ab in adapters.values() for t in ab}
    ids = torch.randint(3, 100, (B, s_in))
    mask = torch.ones(B, s_in, dtype=torch.long)
    mask[0, -10:] = 0

    def run():
        with hooks.apply(adapters, torch.tensor([0, 1, 0, 1])):
            if arch == "t5":
                return m(input_ids=ids, attention_mask=mask, decoder_input_ids=torch.randint(3, 100, (B, s_t)),
                         use_cache=False).logits
            return m.model(input_ids=ids, attention_mask=mask).last_hidden_state

    measured = _saved_activation_bytes(m, run, frozenset(frozen))
    elem = 4 if dtype == torch.float32 else 2
    sh = backbone_shape(c, arch)
    s_src, s_tgt = (s_in, s_t) if arch == "t5" else (s_in, 0)
    predicted = activation_bytes(sh, B, 0, s_src, s_tgt, False, "sdpa", elem, cuda=False,
                                 lora=Lora(frozenset({"q", "v"}), r))["layers_no_ckpt"]
    lora_params = sum(r * (s.d_in + s.d_out) for s in specs)
    predicted += per_row_lora_bytes(B, lora_params, 0, r, len(specs), elem, False)
    assert 0.8 * predicted <= measured <= 1.05 * predicted, (measured, predicted)
