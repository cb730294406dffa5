"""The router started from the experts (lmoe.modular.prototypes) against float64 SVDs and
hand-built Arrow scores."""

import pytest
import torch
from conftest import VOCAB, tiny_model

from lmoe import LMoEConfig, inject, lmoe_layers, record_routing
from lmoe.inject import get_config
from lmoe.modular.prototypes import (
    init_router_from_experts,
    projection_moments,
    top_right_singular_vectors,
)


def random_experts(E=3, r=4, d_in=12, d_out=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(E, r, d_in, generator=g), torch.randn(E, d_out, r, generator=g)


def test_top_right_singular_vector_matches_a_full_float64_svd():
    A, B = random_experts()
    v = top_right_singular_vectors(A, B)
    for i in range(A.shape[0]):
        _, _, Vh = torch.linalg.svd(B[i].double() @ A[i].double())
        assert abs(float(v[i] @ Vh[0])) == pytest.approx(
            1.0, abs=1e-9
        )  # the same direction, up to its sign
        assert float(v[i].norm()) == pytest.approx(1.0, abs=1e-9)


def test_untrained_expert_gets_a_zero_row():
    A, B = random_experts()
    B[1] = 0
    v = top_right_singular_vectors(A, B)
    assert torch.equal(v[1], torch.zeros_like(v[1]))
    assert float(v[0].norm()) == pytest.approx(1.0)


def mixture(seed=0):
    model = inject(
        tiny_model("llama"),
        LMoEConfig(
            num_experts=3, rank=2, target_modules=["q_proj", "v_proj"], composition="outputs"
        ),
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lmoe_layers(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g))
    return model


def batches():
    ids = torch.randint(0, VOCAB, (3, 7), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0  # padding must not enter the mean
    return [{"input_ids": ids, "attention_mask": mask}]


def layer_inputs(model, layer, batch):
    """The layer's inputs at the batch's real tokens (tokens, d_in), float64, captured by a hook."""
    seen = []
    handle = layer.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    with torch.no_grad():
        model(**batch)
    handle.remove()
    B, T = batch["input_ids"].shape
    return seen[0].reshape(B, T, -1)[batch["attention_mask"].bool()].double()


def test_projection_moments_leave_padding_out():
    model = mixture()
    name, layer = next(iter(lmoe_layers(model)))
    v = top_right_singular_vectors(layer.lora_A, layer.lora_B)
    mean, sd = projection_moments(
        model,
        batches(),
        {n: top_right_singular_vectors(m.lora_A, m.lora_B) for n, m in lmoe_layers(model)},
    )[name]
    p = layer_inputs(model, layer, batches()[0]) @ v.T  # (real tokens, E)
    torch.testing.assert_close(mean, p.mean(0))
    torch.testing.assert_close(sd, p.std(0))


def test_router_starts_at_each_experts_signed_standardised_arrow_score():
    """u_i = sign(mu_i) (<v_i, x> - mu_i) / sd_i; where a token's projection has the mean's sign,
    the score before centring is Arrow's |<v_i, x>|; the routing is softmax of u."""
    model = mixture()
    name, layer = next(iter(lmoe_layers(model)))
    x = layer_inputs(
        model, layer, batches()[0]
    )  # before the router changes: the experts decide the inputs
    init_router_from_experts(model, batches())
    v = top_right_singular_vectors(layer.lora_A, layer.lora_B)
    proj = x @ v.T  # (tokens, E)
    sign = torch.where(proj.mean(0) < 0, -1.0, 1.0).double()
    u = sign * (proj - proj.mean(0)) / proj.std(0)
    agrees = torch.sign(proj) == sign
    torch.testing.assert_close((sign * proj)[agrees], proj.abs()[agrees])
    with torch.no_grad(), record_routing(model) as rec:
        model(**batches()[0])
    torch.testing.assert_close(rec[name].double(), torch.softmax(u, -1), rtol=0, atol=1e-5)
    assert u.std(0).tolist() == pytest.approx(
        [1.0] * 3
    )  # standardised: not the near-uniform raw scale
    assert get_config(model).router_bias and layer.router.bias is not None
