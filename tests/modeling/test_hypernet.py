"""Hypernetwork: pooling, zero-ΔW init with live B gradients, head layout, export round trip."""
from __future__ import annotations

import json

import pytest
import torch

from tagi_ds.errors import ArtifactMismatchError
from tagi_ds.kernels import reference
from tagi_ds.modeling.backbone import target_specs
from tagi_ds.modeling.hypernet import HyperNetwork, masked_mean_pool
from tagi_ds.modeling.tiny import tiny_llama_config, tiny_t5_config


def _hypernet(seed: int = 0) -> HyperNetwork:
    torch.manual_seed(seed)
    specs = target_specs(tiny_t5_config(d_model=32, num_heads=4, d_ff=48), ["q", "v", "ffn_in"])
    return HyperNetwork(specs, input_dim=24, r=3, hidden=16, trunk_layers=2, embed_dim=8)


def test_masked_mean_pool_ignores_padding():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 4, 5, generator=g)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    pooled = masked_mean_pool(h, mask)
    torch.testing.assert_close(pooled[0], h[0, :3].mean(0))
    torch.testing.assert_close(pooled[1], h[1, 0])
    # changing padded states or adding more padding changes nothing
    h2 = torch.cat([h.clone(), torch.randn(2, 3, 5, generator=g)], dim=1)
    h2[0, 3] = 1e4
    mask2 = torch.cat([mask, torch.zeros(2, 3, dtype=torch.long)], dim=1)
    torch.testing.assert_close(masked_mean_pool(h2, mask2), pooled)
    assert torch.equal(masked_mean_pool(h, torch.zeros(2, 4)), torch.zeros(2, 5))  # no NaN on an empty row


def test_shapes_and_zero_delta_at_init():
    hn = _hypernet()
    out = hn(torch.randn(5, 24))
    assert set(out) == {"enc_self.q", "enc_self.v", "enc_ffn.ffn_in", "dec_self.q", "dec_self.v", "dec_cross.q",
                        "dec_cross.v", "dec_ffn.ffn_in"}
    A, B = out["enc_ffn.ffn_in"]
    assert A.shape == (5, 2, 3, 32) and B.shape == (5, 2, 48, 3)
    for A, B in out.values():
        assert torch.equal(B, torch.zeros_like(B))  # ΔW = s·B·A = 0 exactly
        assert 0.02 < A.std() < 1.0  # about PEFT's 1/sqrt(d_in) scale, not vanishing
    # different tasks get different A; different layers get different A
    A, _ = out["enc_self.q"]
    assert not torch.allclose(A[0], A[1]) and not torch.allclose(A[0, 0], A[0, 1])


def test_gradient_reaches_b_heads_at_zero_init():
    hn = _hypernet()
    x = torch.randn(2, 24)
    out = hn(x)
    # a loss of the kind a student produces: depends on B only through B·A·v
    loss = sum(((B @ A) @ torch.ones(A.shape[-1])).pow(2).sum() + (B @ A).sum() for A, B in out.values())
    loss.backward()
    for i, mt in enumerate(hn.types):
        n_a = hn.r * hn.shapes[mt][1]
        w = hn.head_weight[str(i)]
        assert w.grad[n_a:].abs().sum() > 0, mt  # B rows of the head get a gradient
        assert hn.head_bias[str(i)].grad[n_a:].abs().sum() > 0, mt
    assert hn.pooler[0].weight.grad is not None


def test_head_layout_matches_reference():
    hn = _hypernet()
    with torch.no_grad():
        for p in hn.head_weight.values():
            p.normal_()
    x = torch.randn(3, 24)
    out = hn(x)
    # recompute one type by hand: trunk features for the (task, layer) pairs, then the reference head
    i = hn.types.index("dec_cross.v")
    n_layers, d_in, d_out = hn.shapes["dec_cross.v"]
    task = hn.pooler(x)
    emb = torch.cat([hn.layer_embed(torch.arange(n_layers)), hn.type_embed(torch.full((n_layers,), i))], -1)
    h = hn.trunk(torch.cat([task[:, None].expand(3, n_layers, -1), emb[None].expand(3, -1, -1)], -1))
    A, B = reference.hyper_head(h, hn.head_weight[str(i)], hn.head_bias[str(i)], hn.r, d_in, d_out)
    torch.testing.assert_close(out["dec_cross.v"][0], A)
    torch.testing.assert_close(out["dec_cross.v"][1], B)


def test_config_dict_round_trip():
    hn = _hypernet()
    d = json.loads(json.dumps(hn.config_dict()))  # JSON-serialisable
    rebuilt = HyperNetwork.from_config_dict(d)
    rebuilt.load_state_dict(hn.state_dict())
    x = torch.randn(2, 24)
    for mt, (A, B) in hn(x).items():
        A2, B2 = rebuilt(x)[mt]
        assert torch.equal(A, A2) and torch.equal(B, B2)
    assert rebuilt.specs == hn.specs
    with pytest.raises(ArtifactMismatchError, match="hypernetwork config"):
        HyperNetwork.from_config_dict({"specs": []})


def test_llama_gqa_shapes():
    specs = target_specs(tiny_llama_config(hidden_size=32, num_heads=4, num_kv_heads=1, intermediate_size=40),
                         ["k", "ffn_in"])
    out = HyperNetwork(specs, input_dim=32, r=2, hidden=16, trunk_layers=1, embed_dim=4)(torch.randn(1, 32))
    assert out["self.k"][0].shape == (1, 2, 2, 32) and out["self.k"][1].shape == (1, 2, 8, 2)
    assert out["ffn.ffn_in"][0].shape == (1, 4, 2, 32)  # gate_proj + up_proj per layer
