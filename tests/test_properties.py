"""Property-based checks (hypothesis): any shape, dtype and E / r / k give valid routing and the
reference output."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lmoe import LMoEConfig, MoLoRALinear

DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


@st.composite
def layer_cases(draw):
    E = draw(st.integers(1, 9))
    return dict(
        E=E,
        r=draw(st.integers(1, 5)),
        k=draw(st.integers(1, E)),
        d_in=draw(st.integers(1, 12)),
        d_out=draw(st.integers(1, 12)),
        lead=draw(st.lists(st.integers(1, 4), min_size=0, max_size=3)),
        router=draw(st.sampled_from(["softmax", "topk", "dynamic"])),
        composition=draw(st.sampled_from(["params", "outputs"])),
        dtype=draw(st.sampled_from(sorted(DTYPES))),
        scale=draw(st.sampled_from([1e-3, 1.0, 30.0])),
        seed=draw(st.integers(0, 2**16)),
    )


def reference(layer, x, g):
    """float64 per-token explicit composition (independent of the layer's stacked GEMMs)."""
    x, g = x.double().reshape(-1, layer.in_features), g.double()
    A, B = layer.lora_A.double(), layer.lora_B.double()
    if layer.composition == "params":
        At, Bt = torch.einsum("te,erd->trd", g, A), torch.einsum("te,eor->tor", g, B)
        delta = torch.einsum("tor,trd,td->to", Bt, At, x)
    else:
        delta = torch.einsum("te,eor,erd,td->to", g, B, A, x)
    return layer.base(x.to(layer.base.weight.dtype)).double() + layer.scaling * delta


@settings(max_examples=60, deadline=None)
@given(layer_cases())
def test_any_layer_case_routes_on_the_simplex_and_matches_reference(case):
    torch.manual_seed(case["seed"])
    dtype = DTYPES[case["dtype"]]
    cfg = LMoEConfig(
        num_experts=case["E"],
        rank=case["r"],
        top_k=case["k"],
        router=case["router"],
        composition=case["composition"],
        target_modules=["x"],
    )
    layer = MoLoRALinear(nn.Linear(case["d_in"], case["d_out"], dtype=dtype), cfg)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.5)
    x = (case["scale"] * torch.randn(*case["lead"], case["d_in"])).to(dtype)
    routing = layer.router.route(x.reshape(-1, case["d_in"]))
    g = routing.weights
    assert torch.isfinite(g).all() and (g >= 0).all()
    torch.testing.assert_close(
        g.double().sum(-1), torch.ones(g.shape[0], dtype=torch.float64), rtol=0, atol=1e-5
    )
    assert ((g > 0).sum(-1) >= 1).all()
    if case["router"] == "topk":
        assert ((g > 0).sum(-1) <= case["k"]).all()
    out = layer(x)
    assert out.shape == (*case["lead"], case["d_out"]) and out.dtype == dtype
    ref = reference(layer, x, g)
    tol = 1e-9 if dtype == torch.float64 else 1e-4 if dtype == torch.float32 else 3e-2
    assert ((out.double().reshape(ref.shape) - ref).abs() <= tol * (1 + ref.abs().max())).all()
