"""LMoEConfig.router_param_scale: the routers' parameters stored divided by c, times c in use.

Under Adam that is a parameter group at c times the learning rate (with eps / c), exactly: checked
against that group in float64; the initial routing is that of c = 1 for the same draws; a loop with
one learning rate and no groups moves the routing off uniform where c = 1 does not; saved adapters
keep c, and one saved before the field existed loads at c = 1.
"""

import json

import pytest
import torch
from conftest import VOCAB, tiny_model
from torch import nn

from lmoe import (
    LMoEConfig,
    MoLoRALinear,
    inject,
    lmoe_layers,
    load_adapter,
    param_groups,
    save_adapter,
)
from lmoe.routers import LambdaHead, ScaledLinear, build_router
from lmoe.training.optim import router_parameter_ids

ROUTERS = ["softmax", "topk", "dynamic"]


def effective_router_weights(model) -> dict[str, torch.Tensor]:
    """Every router linear's weight and bias in use (stored times its scale), by qualified name."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, ScaledLinear):
            found[f"{name}.weight"] = module.effective_weight().detach().clone()
            if module.bias is not None:
                found[f"{name}.bias"] = module.effective_bias().detach().clone()
    return found


def adapted(router: str, scale: float) -> nn.Module:
    """A float64 tiny model with every linear adapted, experts non-zero (B random), a router bias
    and the lambda heads' ReLU open, at router_param_scale `scale`; the same draws, so the same
    weights in use, for every scale."""
    cfg = LMoEConfig(
        num_experts=3,
        rank=2,
        router=router,
        target_modules="all-linear",
        router_bias=True,
        lambda_hidden=8,
        router_param_scale=scale,
        z_loss_coef=0.01,
        lambda_bias_init=0.0,
    )  # at -2.5 the ReLU would shut for every token here
    model = inject(tiny_model("llama").double(), cfg)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, layer in lmoe_layers(model):
            B = torch.randn(layer.lora_B.shape, generator=gen, dtype=torch.float64)
            layer.lora_B.copy_(0.1 * B)
    return model.train()


def train_steps(model, optimizer, steps: int = 6) -> list[float]:
    """`steps` steps on the model's training loss (LM loss plus router losses)."""
    gen = torch.Generator().manual_seed(4)
    losses = []
    for _ in range(steps):
        ids = torch.randint(0, VOCAB, (2, 9), generator=gen)
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("router", ROUTERS)
def test_scale_c_under_one_rate_is_adam_with_the_routers_at_c_times_the_rate(router):
    """Adam's step on p / c is (lr m / (sqrt v + eps / c)) / c for p's gradient moments m, v:
    scale c at lr equals scale 1 with the routers (every linear of the gate and of LD-MoLE's
    lambda head) at c * lr and eps / c. Float64, plain Adam, no weight decay, no clipping."""
    c, lr, eps = 30.0, 1e-3, 1e-8
    scaled, plain = adapted(router, c), adapted(router, 1.0)
    start = effective_router_weights(scaled)
    torch.testing.assert_close(start, effective_router_weights(plain), rtol=1e-15, atol=0)
    trainable = [p for p in scaled.parameters() if p.requires_grad]
    one_rate = torch.optim.Adam(trainable, lr=lr, eps=eps)
    experts, routers = param_groups(plain, lr, router_lr_scale=c)
    assert len(routers["params"]) == len(router_parameter_ids(plain))
    grouped = torch.optim.Adam([experts, {**routers, "eps": eps / c}], lr=lr, eps=eps)
    losses = train_steps(scaled, one_rate), train_steps(plain, grouped)
    torch.testing.assert_close(*losses, rtol=1e-10, atol=0)
    end = effective_router_weights(scaled)
    torch.testing.assert_close(end, effective_router_weights(plain), rtol=1e-9, atol=1e-12)
    moved = {k: float((end[k] - start[k]).abs().max()) for k in end}
    still = {k: v for k, v in moved.items() if v < 0.1 * c * lr}
    assert not still, still  # every router linear learned (the equality is not trivial)
    if router == "dynamic":  # the lambda head's first linear too, not only its output
        assert any(".net.0." in k for k in moved)


@pytest.mark.parametrize("router", ROUTERS)
def test_param_groups_at_scale_c_step_as_the_routers_at_c_times_the_rate(router):
    """lmoe train's groups at scale c (the routers' eps times c) give the same steps as scale 1
    with the routers' group at c * lr and the same eps: float64 Adam, 6 steps."""
    c, lr, eps = 30.0, 1e-3, 1e-8
    scaled, plain = adapted(router, c), adapted(router, 1.0)
    groups = param_groups(scaled, lr, eps=eps)
    assert groups[1]["eps"] == pytest.approx(eps * c) and groups[0]["eps"] == eps
    losses = (
        train_steps(scaled, torch.optim.Adam(groups, lr=lr)),
        train_steps(plain, torch.optim.Adam(param_groups(plain, lr, c, eps=eps), lr=lr)),
    )
    torch.testing.assert_close(*losses, rtol=1e-10, atol=0)
    torch.testing.assert_close(
        effective_router_weights(scaled), effective_router_weights(plain), rtol=1e-9, atol=1e-12
    )


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("init_std", [None, 0.3])
def test_initial_routing_is_that_of_scale_one_for_the_same_draws(router, init_std):
    x = torch.randn(16, 24, generator=torch.Generator().manual_seed(5))
    routers = {}
    for scale in (1.0, 30.0):
        torch.manual_seed(0)
        cfg = LMoEConfig(
            num_experts=4,
            router=router,
            router_init_std=init_std,
            router_param_scale=scale,
            lambda_hidden=8,
        )
        routers[scale] = build_router(24, cfg)
    one, scaled = routers[1.0], routers[30.0]
    torch.testing.assert_close(scaled.weight * 30, one.weight, rtol=1e-6, atol=0)  # stored / c
    torch.testing.assert_close(scaled.effective_weight(), one.weight)
    a, b = one.route(x), scaled.route(x)
    torch.testing.assert_close(b.logits, a.logits)
    torch.testing.assert_close(b.weights, a.weights)
    if router == "dynamic":
        torch.testing.assert_close(b.extras["lambda"], a.extras["lambda"])
        for index in (0, 2):  # LAMBDA_BIAS_INIT in use
            first, second = one.lambda_head.net[index], scaled.lambda_head.net[index]
            torch.testing.assert_close(second.effective_bias(), first.bias)


def test_fused_products_use_the_weights_in_use():
    """MoLoRALinear puts the gate's and the lambda head's stored weights into its GEMM with the
    experts' A; the router scales the products: the layer's routing is the router's on its own."""
    torch.manual_seed(0)
    cfg = LMoEConfig(
        num_experts=4, router="dynamic", router_bias=True, lambda_hidden=8, target_modules=["x"]
    )
    layer = MoLoRALinear(nn.Linear(12, 10, dtype=torch.float64), cfg).train()
    x = torch.randn(7, 12, dtype=torch.float64)
    layer(x)
    fused, alone = layer.last_routing[0], layer.router.route(x)
    gate = layer.router
    in_use = x @ gate.effective_weight().t() + gate.effective_bias()
    torch.testing.assert_close(fused.logits, in_use)
    torch.testing.assert_close(fused.extras["lambda"], alone.extras["lambda"])
    torch.testing.assert_close(fused.weights, alone.weights)


def top_weight_after_training(scale: float) -> float:
    """One layer (gate at zero: uniform routing), two clusters of inputs wanting different updates,
    30 steps of plain AdamW over all its parameters: the mean top routing weight after."""
    torch.manual_seed(0)
    cfg = LMoEConfig(
        num_experts=4, rank=2, target_modules=["x"], router_param_scale=scale, router_init_std=0.0
    )
    layer = MoLoRALinear(nn.Linear(8, 8), cfg)
    layer.base.requires_grad_(False)
    maps, centres = torch.randn(2, 8, 8), torch.randn(2, 8)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(1)
    for _ in range(30):
        cluster = torch.randint(0, 2, (64,), generator=gen)
        x = centres[cluster] + 0.3 * torch.randn(64, 8, generator=gen)
        target = layer.base(x).detach() + torch.einsum("tij,tj->ti", maps[cluster], x)
        error = (layer(x) - target).square().mean()
        loss = error + 0.1 * layer.last_aux.losses()["load_balance"]  # this forward's
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        cluster = torch.arange(2).repeat_interleave(100)
        x = centres[cluster] + 0.3 * torch.randn(200, 8, generator=gen)
        return float(layer.router.route(x).weights.max(-1).values.mean())


def test_one_rate_moves_the_routing_off_uniform_only_with_the_scale():
    """At the default scale the routing specialises; at c = 1 it stays near uniform (0.25 each)."""
    assert LMoEConfig().router_param_scale == 30
    assert top_weight_after_training(30.0) > 0.8
    assert top_weight_after_training(1.0) < 0.35


def test_adapter_keeps_its_scale_and_one_saved_without_it_loads_at_scale_one(tmp_path, input_ids):
    """The files hold the parameters as they are and the scale in the config; a config from before
    the field existed meant scale 1 and loads so (lmoe.load_adapter and PEFT's from_pretrained),
    while a new config that leaves the field out gets today's default."""
    from peft import PeftModel

    for scale in (7.0, 1.0):
        model = adapted("dynamic", scale).eval()
        with torch.no_grad():
            for _, layer in lmoe_layers(model):
                layer.router.weight.normal_(std=0.5 / scale)
        want = model(input_ids).logits
        save_adapter(model, tmp_path / str(scale))
        loaded = load_adapter(tiny_model("llama").double(), tmp_path / str(scale))
        assert loaded.lmoe_config.router_param_scale == scale
        torch.testing.assert_close(loaded(input_ids).logits, want)
    config = tmp_path / "1.0" / "adapter_config.json"
    meta = json.loads(config.read_text())
    del meta["config"]["router_param_scale"]  # as written before the field existed
    config.write_text(json.dumps(meta))
    old = load_adapter(tiny_model("llama").double(), tmp_path / "1.0")
    assert old.lmoe_config.router_param_scale == 1.0
    torch.testing.assert_close(old(input_ids).logits, want)
    peft = PeftModel.from_pretrained(tiny_model("llama").double(), tmp_path / "1.0")
    torch.testing.assert_close(peft(input_ids).logits, want)
    assert LMoEConfig.from_dict({}).router_param_scale == 30.0
    with pytest.raises(ValueError, match="router_param_scale=0"):
        LMoEConfig(router_param_scale=0)


def test_lambda_head_scales_both_linears():
    head = LambdaHead(d_in=6, hidden=4, eps=0.01, scale=10.0, dtype=torch.float64)
    x = torch.randn(5, 6, dtype=torch.float64)
    first, second = head.net[0], head.net[2]
    hidden = torch.relu(x @ (10 * first.weight).t() + 10 * first.bias)
    f = hidden @ (10 * second.weight).t() + 10 * second.bias
    torch.testing.assert_close(head(x), 1 - (0.01 + nn.functional.softplus(-f)))
