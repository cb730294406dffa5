"""The execution kernels (lmoe/kernels/) against the library's reference, lmoe.layer.mixture_delta,
and the reference itself against an independent per-token loop (test_layer.brute_force), float64:
values and every gradient (input, A, B, gate, lambda head), both compositions, every router, E in
{1, 2, 8, 64}, k = E."""

import copy

import pytest
import torch
from test_layer import brute_force, make_layer
from torch import nn

import lmoe.kernels
from lmoe import LMoEConfig, MoLoRALinear
from lmoe.kernels import KERNELS, KernelInputs
from lmoe.kernels.input_gemm import InputProducts
from lmoe.layer import mixture_delta

T, E, R, D_IN, D_OUT = 7, 4, 3, 5, 6
# "topk_all": top-k with k = E (every expert on, through the sparse kernels); top-k otherwise k =
# min(2, E)
ROUTERS = ["softmax", "topk", "topk_all", "dynamic"]
COMPOSITIONS = ["params", "outputs"]


def oracle_layer(router: str, composition: str, E: int, seed: int = 0) -> MoLoRALinear:
    """A float64 layer (d 5 -> 4, r 2) with random experts and router (test_layer.make_layer); the
    dynamic router's lambda head starts where it keeps a few experts a token, not all."""
    layer = make_layer("topk" if router == "topk_all" else router, composition, E=E, r=2, seed=seed)
    if router == "topk_all":
        layer.router.top_k = E
    if router == "dynamic":
        with torch.no_grad():
            head = layer.router.lambda_head.net[2]
            head.init_effective(bias=torch.full_like(head.bias, 0.5))
    return layer


def wrt(layer: MoLoRALinear, x: torch.Tensor) -> list[torch.Tensor]:
    """x and every trainable parameter: A, B, the gate, the lambda head."""
    return [x] + [p for p in layer.parameters() if p.requires_grad]


def kernel_inputs(layer: MoLoRALinear, x: torch.Tensor) -> tuple[KernelInputs, torch.Tensor]:
    """The layer's operands for a kernel, routed with autograd (so the gate gets its gradient), and
    the reference y + s * Delta on the same routing."""
    routing = layer.router.route(x)
    y = layer.base(x)
    per_token = layer.router.experts_per_token()
    inputs = KernelInputs(
        y,
        x,
        layer.lora_A,
        layer.lora_B,
        routing,
        routing.weights,
        per_token,
        layer.scaling,
        layer.composition == "params",
        True,
    )
    g = routing.weights
    inputs.most_per_token = int((g > 0).sum(-1).max()) if per_token is None else per_token
    want = y + layer.scaling * mixture_delta(x, layer.lora_A, layer.lora_B, g, layer.composition)
    return inputs, want


@pytest.mark.parametrize("composition", COMPOSITIONS)
@pytest.mark.parametrize("router", ["softmax", "topk", "dynamic"])
def test_reference_equals_an_independent_per_token_loop(router, composition):
    """mixture_delta (einsum over all tokens) against test_layer.brute_force (token by token,
    explicit matrices): values and the gradients of x, A, B and g."""
    layer = oracle_layer(router, composition, E=3)
    x = torch.randn(T, 5, dtype=torch.float64, requires_grad=True)
    g = layer.router.route(x).weights.detach().requires_grad_()
    delta = mixture_delta(x, layer.lora_A, layer.lora_B, g, composition)
    got = layer.base(x) + layer.scaling * delta
    want = brute_force(layer, x, g)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    grad_out = torch.randn_like(got)
    tensors = (x, layer.lora_A, layer.lora_B, g)
    got_grads = torch.autograd.grad(got, tensors, grad_out)
    for a, b in zip(got_grads, torch.autograd.grad(want, tensors, grad_out), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kernel", sorted(KERNELS))
@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("composition", COMPOSITIONS)
@pytest.mark.parametrize("E", [1, 2, 8, 64])
def test_every_kernel_matches_the_reference(kernel, router, composition, E):
    """Each kernel through its autograd Function and without autograd, against mixture_delta on the
    same routing: values and the gradients of x, A, B, the gate and the lambda head."""
    layer = oracle_layer(router, composition, E)
    x = torch.randn(T, 5, dtype=torch.float64, requires_grad=True)
    inputs, want = kernel_inputs(layer, x)
    got = KERNELS[kernel](inputs)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    grad_out = torch.randn_like(got)
    got_grads = torch.autograd.grad(
        got, wrt(layer, x), grad_out, retain_graph=True, allow_unused=True
    )
    want_grads = torch.autograd.grad(want, wrt(layer, x), grad_out, allow_unused=True)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    with torch.no_grad():
        inputs, want = kernel_inputs(layer, x)
        inputs.autograd = False
        torch.testing.assert_close(KERNELS[kernel](inputs), want, rtol=1e-10, atol=1e-10)


def aux_total(layer: MoLoRALinear) -> torch.Tensor:
    """Every auxiliary loss of the layer's last forward, over its real tokens (the padding mask)."""
    routing, mask = layer.last_routing
    return sum(layer.router.aux_losses(routing, mask).values())


@pytest.mark.parametrize("execution", ["dense", "sparse", "auto"])
@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("composition", COMPOSITIONS)
def test_layer_forward_matches_reference_forward_with_padding(execution, router, composition):
    """The layer's forward (route, plan, kernel) against reference_forward on a batch with padding
    (the model's mask: the router losses count only real tokens): outputs, router losses and
    every gradient."""
    layer = oracle_layer(router, composition, E=8).train()
    layer.execution = execution
    mask = torch.ones(2, T, dtype=torch.long)
    mask[1, 4:] = 0
    layer.token_mask.value = mask
    x = torch.randn(2, T, 5, dtype=torch.float64, requires_grad=True)
    results = []
    for forward in (layer.forward, layer.reference_forward):
        out = forward(x)
        loss = (out * torch.linspace(-1, 1, 4, dtype=out.dtype)).sum() + aux_total(layer)
        results.append((out, torch.autograd.grad(loss, wrt(layer, x), allow_unused=True)))
    (got, got_grads), (want, want_grads) = results
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("dropout_input", [True, False])
def test_input_products_gradients_match_autograd(with_base, dropout_input):
    """InputProducts' one-GEMM input gradient against autograd on the separate products (float64),
    with and without the base product and a separate experts' input (dropout); gradcheck on top."""
    gen = torch.Generator().manual_seed(1)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    x, lora_x = randn(T, D_IN), randn(T, D_IN)
    W0, b0, A, Wg = randn(D_OUT, D_IN), randn(D_OUT), randn(E * R, D_IN), randn(E, D_IN)
    lora_x = lora_x if dropout_input else None
    W0, b0 = (W0, b0) if with_base else (None, None)
    tensors = [t.requires_grad_() for t in (x, lora_x, W0, b0, A, Wg) if t is not None]

    def reference(x, lora_x, W0, b0, A, Wg):
        y = None if W0 is None else x @ W0.t() + b0
        return y, (x if lora_x is None else lora_x) @ A.t(), x @ Wg.t()

    def total(fn, *args):  # every output, weighted, so each gradient path is exercised
        y, h, w = fn(*args)
        base = 0 if y is None else (y * torch.linspace(-1, 1, D_OUT, dtype=y.dtype)).sum()
        return base + h.sin().sum() + w.cos().sum()

    args = (x, lora_x, W0, b0, A, Wg)
    got = torch.autograd.grad(total(InputProducts.apply, *args), tensors)
    want = torch.autograd.grad(total(reference, *args), tensors)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda *t: tuple(o for o in InputProducts.apply(*t) if o is not None), args
    )


@pytest.mark.parametrize("composition", COMPOSITIONS)
def test_dense_kernel_gradcheck(composition):
    layer = oracle_layer("softmax", composition, E=3)
    x = torch.randn(T, 5, dtype=torch.float64, requires_grad=True)

    def dense(x, A, B, gate):
        g = torch.softmax(x @ gate.t(), -1)
        routing = layer.router.route(x)  # only for its type; the kernel reads g
        inputs = KernelInputs(
            torch.zeros(T, 4, dtype=x.dtype),
            x,
            A,
            B,
            routing,
            g,
            None,
            0.7,
            composition == "params",
            True,
        )
        return KERNELS["dense"](inputs)

    gate = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        dense,
        (x, layer.lora_A.detach().requires_grad_(), layer.lora_B.detach().requires_grad_(), gate),
    )


@pytest.mark.parametrize("router", ["softmax", "topk", "dynamic"])
@pytest.mark.parametrize("composition", COMPOSITIONS)
def test_layer_matches_reference_forward_in_training_and_generation(router, composition):
    """A layer of E = 4 (the dense plan, the fused input GEMM) against reference_forward with
    autograd and without (generation runs A and W_g as separate GEMMs), float64."""
    torch.manual_seed(0)
    base = nn.Linear(D_IN, D_OUT, dtype=torch.float64).requires_grad_(False)
    cfg = LMoEConfig(
        num_experts=E, rank=R, router=router, composition=composition, target_modules="all-linear"
    )
    layer = MoLoRALinear(base, cfg).double()
    nn.init.normal_(layer.lora_B)
    x = torch.randn(2, T, D_IN, dtype=torch.float64, requires_grad=True)
    y, want = layer(x), layer.reference_forward(x)
    torch.testing.assert_close(y, want)
    grad_out = torch.randn_like(y)
    got_grads = torch.autograd.grad(y, wrt(layer, x), grad_out)
    for a, b in zip(got_grads, torch.autograd.grad(want, wrt(layer, x), grad_out), strict=True):
        torch.testing.assert_close(a, b)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), want)


@pytest.mark.parametrize("composition", COMPOSITIONS)
def test_inference_path_equals_training_path(composition):
    """Without autograd the layer skips the Functions and runs A and W_g as separate GEMMs
    (autograd: one GEMM on [A; W_g]); the same maths, equal to float32 rounding (how BLAS groups
    a GEMM differs between CPUs)."""
    torch.manual_seed(0)
    base = nn.Linear(D_IN, D_OUT).requires_grad_(False)
    layer = MoLoRALinear(
        base,
        LMoEConfig(num_experts=E, rank=R, composition=composition, target_modules="all-linear"),
    ).eval()
    nn.init.normal_(layer.lora_B)
    x = torch.randn(3, T, D_IN)
    with torch.no_grad():
        fast = layer(x)
    torch.testing.assert_close(fast, layer(x))


@pytest.mark.parametrize("router", ["softmax", "topk", "dynamic"])
def test_layer_compiles_without_graph_breaks(router):
    """torch.compile captures forward + backward in one graph (fullgraph) and agrees with eager."""
    torch.manual_seed(0)
    base = nn.Linear(D_IN, D_OUT).requires_grad_(False)
    cfg = LMoEConfig(num_experts=E, rank=R, router=router, target_modules="all-linear")
    layer = MoLoRALinear(base, cfg)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(2, T, D_IN, requires_grad=True)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    got = compiled(x)
    got_grads = torch.autograd.grad(got.sum(), (x, layer.lora_A, layer.lora_B))
    want = layer(x)
    want_grads = torch.autograd.grad(want.sum(), (x, layer.lora_A, layer.lora_B))
    torch.testing.assert_close(got, want)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b)
    torch._dynamo.reset()


@pytest.mark.parametrize("router", ["softmax", "dynamic"])
@pytest.mark.parametrize("composition", COMPOSITIONS)
def test_router_reads_the_experts_dropped_out_input(router, composition):
    """router_reads_dropout: in training, the gate (and lambda head) see the very dropout(x) the
    experts see; outputs and gradients against reference_forward with the same dropout draw
    (float64)."""
    torch.manual_seed(0)
    base = nn.Linear(D_IN, D_OUT).double().requires_grad_(False)
    cfg = LMoEConfig(
        num_experts=E,
        rank=R,
        router=router,
        composition=composition,
        dropout=0.5,
        router_reads_dropout=True,
        lambda_hidden=4,
        target_modules="all-linear",
    )
    layer = MoLoRALinear(base, cfg).double().train()
    nn.init.normal_(layer.lora_B)
    x = torch.randn(T, D_IN, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(5)
    y = layer(x)
    torch.manual_seed(5)
    want = layer.reference_forward(x)  # the same draw: the same mask
    torch.manual_seed(5)
    xd = nn.functional.dropout(x, 0.5, training=True)
    # the clean input would route otherwise
    assert not torch.allclose(layer.router.route(xd).weights, layer.router.route(x).weights)
    torch.testing.assert_close(y, want)
    grad_out = torch.randn_like(y)
    got_grads = torch.autograd.grad(y, wrt(layer, x), grad_out)
    for a, b in zip(got_grads, torch.autograd.grad(want, wrt(layer, x), grad_out), strict=True):
        torch.testing.assert_close(a, b)
    layer.eval()  # no dropout at evaluation: the clean input everywhere
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.reference_forward(x))
        torch.testing.assert_close(layer(x), brute_force(layer, x, layer.router.route(x).weights))


def test_choose_kernel_follows_the_plan_and_the_rule():
    """The dense plan runs dense; a sparse plan gathers for few tokens, else CSR or grouped by the
    device; the after-routing plan falls back to dense where the routing is too dense to pay."""
    layer = oracle_layer("topk", "params", E=64)
    few, many = torch.randn(2, 5, dtype=torch.float64), torch.randn(300, 5, dtype=torch.float64)
    choose = lmoe.kernels.choose_kernel
    assert choose("dense", kernel_inputs(layer, many)[0], True) == "dense"
    assert choose("sparse", kernel_inputs(layer, few)[0], True) == "gathered"
    assert choose("sparse", kernel_inputs(layer, many)[0], True) == "csr"
    assert choose("sparse", kernel_inputs(layer, many)[0], False) == "grouped"
    everyone = copy.deepcopy(layer)
    everyone.router.top_k = 64
    assert choose("after_routing", kernel_inputs(everyone, many)[0], True) == "dense"
