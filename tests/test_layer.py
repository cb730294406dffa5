"""MoLoRALinear against independent references: per-token brute force in float64,
plain LoRA, PEFT."""

import pytest
import torch
from torch import nn
from torch.func import functional_call

from lmoe import LMoEConfig, MoLoRALinear
from lmoe.layer import frozen_product

ROUTERS = ["softmax", "topk", "dynamic"]
COMPOSITIONS = ["params", "outputs"]


def make_layer(
    router="softmax",
    composition="params",
    E=3,
    r=2,
    d_in=5,
    d_out=4,
    dtype=torch.float64,
    bias=True,
    seed=0,
):
    """A layer with random (non-zero) experts and router so every term of the maths is exercised."""
    torch.manual_seed(seed)
    cfg = LMoEConfig(
        num_experts=E,
        rank=r,
        alpha=3.0,
        router=router,
        top_k=min(2, E),
        composition=composition,
        router_bias=True,
        target_modules=["x"],
    )
    layer = MoLoRALinear(nn.Linear(d_in, d_out, bias=bias, dtype=dtype), cfg)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if p.requires_grad or p is layer.base.weight:  # the router's in use: stored / scale
                std = 0.3 if "lambda" in name else 1.0  # keep the dynamic router's lambda moderate
                p.normal_(std=std / layer.router.scale if "router" in name else std)
    return layer


def brute_force(layer: MoLoRALinear, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Token by token with explicit matrices: A(x) = sum g_i A_i, B(x) = sum g_i B_i
    (or sum of outputs)."""
    W0 = layer.base.weight.double()
    b0 = layer.base.bias.double() if layer.base.bias is not None else 0
    A, B = layer.lora_A.double(), layer.lora_B.double()
    rows = []
    for xt, gt in zip(x.reshape(-1, x.shape[-1]).double(), g.double(), strict=True):
        y = W0 @ xt + b0
        if layer.composition == "params":
            At = sum(gt[i] * A[i] for i in range(len(gt)))
            Bt = sum(gt[i] * B[i] for i in range(len(gt)))
            y = y + layer.scaling * Bt @ (At @ xt)
        else:
            y = y + layer.scaling * sum(gt[i] * B[i] @ (A[i] @ xt) for i in range(len(gt)))
        rows.append(y)
    return torch.stack(rows).reshape(*x.shape[:-1], -1)


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("composition", COMPOSITIONS)
def test_layer_equals_per_token_brute_force(router, composition):
    layer = make_layer(router, composition)
    x = torch.randn(2, 3, 5, dtype=torch.float64)  # any leading shape
    g = layer.router.route(x.reshape(-1, 5)).weights
    torch.testing.assert_close(layer(x), brute_force(layer, x, g), rtol=1e-10, atol=1e-10)


def test_softmax_weights_equal_reference_gate():
    layer = make_layer("softmax")
    x = torch.randn(7, 5, dtype=torch.float64)
    u = x @ layer.router.effective_weight().T + layer.router.effective_bias()
    torch.testing.assert_close(
        layer.router.route(x).weights.double(), torch.softmax(u, -1), rtol=1e-6, atol=1e-6
    )


def test_topk_uses_only_chosen_experts():
    layer = make_layer("topk", "outputs", E=4)
    x = torch.randn(6, 5, dtype=torch.float64)
    u = x @ layer.router.effective_weight().T + layer.router.effective_bias()
    top = u.topk(2, dim=-1)
    g = torch.zeros_like(u).scatter(-1, top.indices, torch.softmax(top.values, -1))
    torch.testing.assert_close(layer(x), brute_force(layer, x, g), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("composition", COMPOSITIONS)
def test_gradcheck_wrt_input_experts_and_router(router, composition):
    layer = make_layer(router, composition, E=3, r=2, d_in=4, d_out=3)
    x = torch.randn(4, 4, dtype=torch.float64, requires_grad=True)
    names = ["lora_A", "lora_B", "router.weight", "router.bias"]
    params = [dict(layer.named_parameters())[n].detach().clone().requires_grad_() for n in names]

    def f(x, *tensors):
        return functional_call(layer, dict(zip(names, tensors, strict=True)), (x,))

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("composition", COMPOSITIONS)
def test_gradients_match_brute_force(composition):
    """Autograd through the stacked GEMMs equals autograd through the explicit
    per-token matrices."""
    layer = make_layer("softmax", composition)
    x = torch.randn(5, 5, dtype=torch.float64)
    layer(x).square().sum().backward()
    fast = [p.grad.clone() for p in (layer.lora_A, layer.lora_B, layer.router.weight)]
    layer.zero_grad()
    brute_force(layer, x, layer.router.route(x).weights).square().sum().backward()
    slow = [p.grad for p in (layer.lora_A, layer.lora_B, layer.router.weight)]
    for a, b in zip(fast, slow, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("router", ROUTERS)
def test_one_expert_is_plain_lora(router):
    layer = make_layer(router, "params", E=1, r=3)
    x = torch.randn(6, 5, dtype=torch.float64)
    lora = layer.base(x) + layer.scaling * x @ layer.lora_A[0].T @ layer.lora_B[0].T
    torch.testing.assert_close(layer(x), lora, rtol=1e-12, atol=1e-12)


def test_one_expert_equals_peft_lora():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = nn.Sequential()
    base.add_module("proj", nn.Linear(8, 6))
    x = torch.randn(3, 4, 8)
    peft_model = peft.get_peft_model(
        base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["proj"])
    )
    peft_layer = peft_model.base_model.model.proj
    ours = MoLoRALinear(
        peft_layer.base_layer, LMoEConfig(num_experts=1, rank=4, alpha=8, target_modules=["proj"])
    )
    with torch.no_grad():
        peft_layer.lora_B["default"].weight.normal_()
        ours.lora_A.copy_(peft_layer.lora_A["default"].weight[None])
        ours.lora_B.copy_(peft_layer.lora_B["default"].weight[None])
    torch.testing.assert_close(ours(x), peft_model(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("router", ROUTERS)
def test_half_precision_close_to_float32(dtype, router):
    layer32 = make_layer(router, "params", dtype=torch.float32, d_in=16, d_out=12, E=4, r=4)
    layer_half = make_layer(router, "params", dtype=dtype, d_in=16, d_out=12, E=4, r=4)
    layer_half.load_state_dict({k: v.to(dtype) for k, v in layer32.state_dict().items()})
    x = torch.randn(2, 5, 16)
    out = layer_half(x.to(dtype))
    assert out.dtype == dtype and torch.isfinite(out).all()
    ref = layer32(x)
    assert (out.float() - ref).abs().max() <= 0.05 * ref.abs().max()


def test_conv1d_base():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(6, 5).double()  # d_out=6, d_in=5; weight is (d_in, d_out)
    nn.init.normal_(conv.weight)
    layer = MoLoRALinear(conv, LMoEConfig(num_experts=2, rank=2, target_modules=["c_attn"]))
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(4, 5, dtype=torch.float64)
    g = layer.router.route(x).weights
    expected = brute_force_conv(layer, x, g)
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-10)


def brute_force_conv(layer, x, g):
    y = x @ layer.base.weight + layer.base.bias
    A = torch.einsum("te,erd->trd", g.double(), layer.lora_A)
    B = torch.einsum("te,eor->tor", g.double(), layer.lora_B)
    return y + layer.scaling * torch.einsum("tor,trd,td->to", B, A, x)


def test_fresh_layer_is_identity_to_base():
    layer = make_layer("dynamic", "outputs")
    with torch.no_grad():
        layer.reset_experts()
    x = torch.randn(3, 5, dtype=torch.float64)
    assert torch.equal(layer(x), layer.base(x))
    assert not torch.equal(layer.lora_A[0], layer.lora_A[1])  # experts start different


@pytest.mark.parametrize("composition", COMPOSITIONS)
def test_delta_weight_matches_forward_for_fixed_routing(composition):
    layer = make_layer("softmax", composition)
    g = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    x = torch.randn(4, 5, dtype=torch.float64)
    merged = layer.base(x) + x @ layer.delta_weight(g).T
    torch.testing.assert_close(
        merged, brute_force(layer, x, g.expand(4, 3)), rtol=1e-10, atol=1e-10
    )


def run_layer(layer: MoLoRALinear, x: torch.Tensor, grad: bool = True):
    """(output, gradients of x, A, B and the gate for the loss sum(out^2)); no gradients
    without autograd."""
    x = x.clone().requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        out = layer(x)
    if not grad:
        return out, []
    out.square().sum().backward()
    return out, [x.grad] + [p.grad for p in layer.parameters() if p.requires_grad]


@pytest.mark.parametrize("router", ROUTERS)
def test_every_way_of_running_the_products_agrees(router):
    """A plain linear base runs inside the layer's own autograd Function with the experts and the
    gate (frozen_product); a base with hooks or of another class runs as itself, and its hooks fire;
    without autograd the products run directly. Same outputs and gradients (float64)."""
    x = torch.randn(2, 3, 5, dtype=torch.float64)
    plain = make_layer(router)
    assert frozen_product(plain.base) is not None
    want, want_grads = run_layer(plain, x)

    class Subclass(nn.Linear):
        pass

    hooked, other = make_layer(router), make_layer(router)
    calls = []
    hooked.base.register_forward_hook(lambda *args: calls.append(1))
    other.base.__class__ = Subclass
    for layer in (hooked, other):
        assert frozen_product(layer.base) is None
        out, grads = run_layer(layer, x)
        torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
        for a, b in zip(grads, want_grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert calls
    torch.testing.assert_close(
        run_layer(make_layer(router), x, grad=False)[0], want, rtol=1e-12, atol=1e-12
    )


def test_dropout_reaches_the_experts_only():
    """With dropout the experts read dropout(x), while the base and the gate read x
    (values and gradients)."""
    layer = make_layer("softmax")
    layer.dropout = nn.Dropout(0.5)
    x = torch.randn(6, 5, dtype=torch.float64)
    torch.manual_seed(3)
    out, grads = run_layer(layer.train(), x)
    layer.zero_grad()
    xr = x.clone().requires_grad_()
    torch.manual_seed(3)
    dropped = nn.functional.dropout(xr, 0.5, training=True)
    g = layer.router.route(xr).weights
    want = layer.base(xr) + brute_force(layer, dropped, g) - layer.base(dropped)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    want.square().sum().backward()
    for a, b in zip(
        grads, [xr.grad] + [p.grad for p in layer.parameters() if p.requires_grad], strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
