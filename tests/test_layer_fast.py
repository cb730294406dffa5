"""The fused mixture-LoRA autograd function against plain autograd on the per-token maths (float64)."""
import pytest
import torch

from lmoe import LMoEConfig, MoLoRALinear
from lmoe.kernels.dense import DenseMixture as _MixtureLoRA
from lmoe.kernels.input_gemm import InputProducts as _Projections

T, E, R, D_IN, D_OUT = 7, 4, 3, 5, 6


def brute_delta(x, A, B, g, scaling, params):
    """Per token, per expert loop: A (E, r, d_in), B (E, d_out, r); the docs/design.md formulas."""
    rows = []
    for t in range(x.shape[0]):
        if params:
            At = sum(g[t, i] * A[i] for i in range(E))
            Bt = sum(g[t, i] * B[i] for i in range(E))
            rows.append(scaling * Bt @ (At @ x[t]))
        else:
            rows.append(scaling * sum(g[t, i] * B[i] @ (A[i] @ x[t]) for i in range(E)))
    return torch.stack(rows)


def inputs(sparse: bool):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(T, D_IN, generator=gen, dtype=torch.float64)
    A = torch.randn(E, R, D_IN, generator=gen, dtype=torch.float64)
    B = torch.randn(E, D_OUT, R, generator=gen, dtype=torch.float64)
    g = torch.softmax(torch.randn(T, E, generator=gen, dtype=torch.float64), -1)
    if sparse:  # exact zeros, as top-k and sparsemax routing give
        g = torch.where(g < g.median(), torch.zeros_like(g), g)
        g = g / g.sum(-1, keepdim=True)
    return [t.requires_grad_() for t in (x, A, B, g)]


def fused(x, A, B, g, scaling, params):
    """The layer's two Functions with the routing g given (the router's logits are computed and unused)."""
    B_stacked = B.permute(1, 0, 2).reshape(D_OUT, E * R)
    router_weight = torch.zeros(E, D_IN, dtype=x.dtype)
    _, h, _ = _Projections.apply(x, None, None, None, A.reshape(E * R, D_IN), router_weight)
    y = torch.zeros(x.shape[0], D_OUT, dtype=x.dtype)
    return _MixtureLoRA.apply(y, h, B_stacked, g, scaling, params)


@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("dropout_input", [True, False])
def test_projections_gradients_match_autograd(with_base, dropout_input):
    """_Projections' one-GEMM input gradient against autograd on the separate products (float64), with and
    without the base product and a separate experts' input (dropout); gradcheck on top."""
    gen = torch.Generator().manual_seed(1)
    x, lora_x = (torch.randn(T, D_IN, generator=gen, dtype=torch.float64) for _ in range(2))
    W0, b0 = torch.randn(D_OUT, D_IN, generator=gen, dtype=torch.float64), torch.randn(D_OUT, generator=gen, dtype=torch.float64)
    A, Wg = torch.randn(E * R, D_IN, generator=gen, dtype=torch.float64), torch.randn(E, D_IN, generator=gen, dtype=torch.float64)
    lora_x = lora_x if dropout_input else None
    W0, b0 = (W0, b0) if with_base else (None, None)
    tensors = [t.requires_grad_() for t in (x, lora_x, W0, b0, A, Wg) if t is not None]

    def reference(x, lora_x, W0, b0, A, Wg):
        y = None if W0 is None else x @ W0.t() + b0
        return y, (x if lora_x is None else lora_x) @ A.t(), x @ Wg.t()

    def total(fn, *args):  # every output, weighted, so each gradient path is exercised
        y, h, w = fn(*args)
        return (0 if y is None else (y * torch.linspace(-1, 1, D_OUT, dtype=y.dtype)).sum()) + h.sin().sum() + w.cos().sum()

    args = (x, lora_x, W0, b0, A, Wg)
    got = torch.autograd.grad(total(_Projections.apply, *args), tensors)
    want = torch.autograd.grad(total(reference, *args), tensors)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda *t: tuple(o for o in _Projections.apply(*t) if o is not None), args)


@pytest.mark.parametrize("params", [True, False])
@pytest.mark.parametrize("sparse", [True, False])
def test_fused_forward_and_gradients_match_brute_force(params, sparse):
    x, A, B, g = inputs(sparse)
    got = fused(x, A, B, g, 1.5, params)
    want = brute_delta(x, A, B, g, 1.5, params)
    torch.testing.assert_close(got, want)
    grad_out = torch.randn_like(want)
    got_grads = torch.autograd.grad(got, (x, A, B, g), grad_out)
    want_grads = torch.autograd.grad(want, (x, A, B, g), grad_out)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("params", [True, False])
def test_fused_gradcheck(params):
    x, A, B, g = inputs(sparse=False)
    assert torch.autograd.gradcheck(lambda *t: fused(*t, 0.7, params), (x, A, B, g))


@pytest.mark.parametrize("router", ["softmax", "topk", "dynamic"])
@pytest.mark.parametrize("composition", ["params", "outputs"])
def test_layer_matches_brute_force(router, composition):
    torch.manual_seed(0)
    base = torch.nn.Linear(D_IN, D_OUT, dtype=torch.float64).requires_grad_(False)
    cfg = LMoEConfig(num_experts=E, rank=R, router=router, composition=composition, target_modules="all-linear")
    layer = MoLoRALinear(base, cfg).double()
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(2, T, D_IN, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    g = layer.router.route(x.reshape(-1, D_IN)).weights
    want = base(x) + brute_delta(x.reshape(-1, D_IN), layer.lora_A, layer.lora_B, g, layer.scaling,
                                 composition == "params").view(2, T, D_OUT)
    torch.testing.assert_close(y, want)
    grad_out = torch.randn_like(y)
    wrt = (x, *(p for p in layer.parameters() if p.requires_grad))  # the dynamic router's lambda head too
    for a, b in zip(torch.autograd.grad(y, wrt, grad_out), torch.autograd.grad(want, wrt, grad_out)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("composition", ["params", "outputs"])
def test_inference_path_equals_training_path(composition):
    """Without autograd the layer skips the Function and runs A and W_g as separate GEMMs (autograd: one GEMM on
    [A; W_g]); the same maths, equal to float32 rounding (how BLAS groups a GEMM differs between CPUs)."""
    torch.manual_seed(0)
    base = torch.nn.Linear(D_IN, D_OUT).requires_grad_(False)
    layer = MoLoRALinear(base, LMoEConfig(num_experts=E, rank=R, composition=composition,
                                          target_modules="all-linear")).eval()
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(3, T, D_IN)
    with torch.no_grad():
        fast = layer(x)
    torch.testing.assert_close(fast, layer(x))


@pytest.mark.parametrize("router", ["softmax", "topk", "dynamic"])
def test_layer_compiles_without_graph_breaks(router):
    """torch.compile captures forward + backward in one graph (fullgraph) and agrees with eager."""
    torch.manual_seed(0)
    base = torch.nn.Linear(D_IN, D_OUT).requires_grad_(False)
    layer = MoLoRALinear(base, LMoEConfig(num_experts=E, rank=R, router=router, target_modules="all-linear"))
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(2, T, D_IN, requires_grad=True)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    got = compiled(x)
    got_grads = torch.autograd.grad(got.sum(), (x, layer.lora_A, layer.lora_B))
    want = layer(x)
    want_grads = torch.autograd.grad(want.sum(), (x, layer.lora_A, layer.lora_B))
    torch.testing.assert_close(got, want)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b)
    torch._dynamo.reset()


@pytest.mark.parametrize("router", ["softmax", "dynamic"])
@pytest.mark.parametrize("composition", ["params", "outputs"])
def test_router_reads_the_experts_dropped_out_input(router, composition):
    """router_reads_dropout: in training, the gate (and lambda head) see the very dropout(x) the experts see;
    outputs and gradients against the per-token formulas on that input (float64)."""
    torch.manual_seed(0)
    base = torch.nn.Linear(D_IN, D_OUT).double().requires_grad_(False)
    cfg = LMoEConfig(num_experts=E, rank=R, router=router, composition=composition, dropout=0.5,
                     router_reads_dropout=True, lambda_hidden=4, target_modules="all-linear")
    layer = MoLoRALinear(base, cfg).double().train()
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(T, D_IN, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(5)
    y = layer(x)
    torch.manual_seed(5)
    xd = torch.nn.functional.dropout(x, 0.5, training=True)  # the same draw: the same mask
    g = layer.router.route(xd).weights
    assert not torch.allclose(g, layer.router.route(x).weights)  # the clean input would route otherwise
    want = base(x) + brute_delta(xd, layer.lora_A, layer.lora_B, g, layer.scaling, composition == "params")
    torch.testing.assert_close(y, want)
    wrt = (x, *(p for p in layer.parameters() if p.requires_grad))
    grad_out = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y, wrt, grad_out), torch.autograd.grad(want, wrt, grad_out)):
        torch.testing.assert_close(a, b)
    layer.eval()  # no dropout at evaluation: the clean input everywhere
    with torch.no_grad():
        torch.testing.assert_close(layer(x), base(x) + brute_delta(x, layer.lora_A, layer.lora_B,
                                                                    layer.router.route(x).weights, layer.scaling,
                                                                    composition == "params"))
