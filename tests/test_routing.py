"""Routing functions and their losses against independent references: an exhaustive float64 search
of the LD-MoLE quadratic program, bisection, finite differences and hand-computed values."""

import itertools
import math

import numpy as np
import pytest
import torch
from conftest import tiny_model
from torch.func import functional_call

from lmoe import (
    LMoEConfig,
    aux_loss,
    aux_losses,
    count_parameters,
    inject,
    lmoe_layers,
    load_adapter,
    save_adapter,
)
from lmoe.config import LAMBDA_BIAS_INIT, default_lambda_hidden
from lmoe.router_losses import load_balance_loss, sparsity_loss, sparsity_threshold, z_loss
from lmoe.routers import LambdaHead, build_router
from lmoe.routing import (
    softmax_route,
    sparsegen_route,
    sparsegen_weights,
    topk_route,
)

ROUTERS = ["softmax", "topk", "dynamic"]


# ---------------------------------------------------------------- independent references


def qp_reference(u: np.ndarray, lam: float) -> np.ndarray:
    """argmin_{p in simplex} ||p - u||^2 - lam ||p||^2 (lam < 1) by trying every support S.

    On S the minimiser over {sum p = 1} is p_S = (u_S - nu) / (1 - lam), nu = (sum u_S - (1 - lam))
    / |S| (Lagrange); the optimum is the feasible (p_S >= 0) candidate of least objective.
    """
    E = len(u)
    best, best_value = None, math.inf
    for size in range(1, E + 1):
        for S in map(list, itertools.combinations(range(E), size)):
            p = np.zeros(E)
            p[S] = (u[S] - (u[S].sum() - (1 - lam)) / size) / (1 - lam)
            value = ((p - u) ** 2).sum() - lam * (p**2).sum()
            if (p >= 0).all() and value < best_value:
                best, best_value = p, value
    return best


def reference_count(u: np.ndarray, lam: float) -> int:
    """How many experts the QP keeps: the size of the support S certified by the KKT conditions,
    p_S = (u_S - nu) / (1 - lam) >= 0 and u_i <= nu off S (exact at the threshold, unlike comparing
    objective values, which differ only to second order there)."""
    E = len(u)
    for size in range(1, E + 1):
        for S in map(list, itertools.combinations(range(E), size)):
            nu = (u[S].sum() - (1 - lam)) / size
            rest = np.delete(u, S)
            if (u[S] >= nu - 1e-12).all() and (
                rest <= nu + 1e-12
            ).all():  # tolerance: rounding at the threshold
                return size
    raise AssertionError("no KKT point: the QP always has one")


def bisect_threshold(u: np.ndarray, k: int) -> float:
    """The smallest lambda for which the QP keeps at most k experts (the count falls
    as lambda grows)."""
    lo, hi = -1e3, 1 - 1e-12
    for _ in range(80):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if reference_count(u, mid) <= k else (mid, hi)
    return hi


def random_problem(tokens=40, E=5, seed=0, spread=2.0):
    """Logits (tokens, E) and lambdas (tokens, 1) in float64, lambdas over the useful
    range (-3, 0.95)."""
    gen = torch.Generator().manual_seed(seed)
    u = spread * torch.randn(tokens, E, generator=gen, dtype=torch.float64)
    lam = -3 + 3.95 * torch.rand(tokens, 1, generator=gen, dtype=torch.float64)
    return u, lam


def far_from_ties(u: torch.Tensor, lam: torch.Tensor, margin=1e-3) -> torch.Tensor:
    """Rows where every u_i is at least `margin` away from the threshold tau (the support is
    locally constant)."""
    p = sparsegen_route(u, lam)
    top = u.argmax(-1, keepdim=True)
    tau = u.gather(-1, top) - p.gather(-1, top) * (1 - lam)
    sorted_u = u.sort(-1).values
    distinct = (sorted_u.diff(dim=-1).abs() > margin).all(-1)
    return ((u - tau).abs() > margin).all(-1) & distinct


class RouteOf(torch.nn.Module):
    """Wraps a router so torch.func.functional_call (which calls forward) runs its route with
    swapped parameters."""

    def __init__(self, router):
        super().__init__()
        self.router = router

    def forward(self, x):
        return self.router.route(x)


def route_with(r, tensors: dict, x):
    """r.route(x) with some of r's parameters replaced by `tensors` (name ->
    tensor), for gradcheck."""
    return functional_call(RouteOf(r), {f"router.{n}": t for n, t in tensors.items()}, (x,))


def router(name, d_in=6, E=4, dtype=torch.float64, seed=0, **cfg):
    torch.manual_seed(seed)
    r = build_router(
        d_in, LMoEConfig(num_experts=E, router=name, router_bias=True, **cfg), dtype=dtype
    )
    with torch.no_grad():
        for p in r.parameters():  # every linear of the router at r.scale: std 0.5 in use
            p.normal_(std=0.5 / r.scale)
    return r


# ---------------------------------------------------------------- softmax and top-k


def test_softmax_route_is_exp_over_sum():
    u = torch.tensor([[0.0, math.log(3.0)], [1.0, 1.0]])
    torch.testing.assert_close(softmax_route(u), torch.tensor([[0.25, 0.75], [0.5, 0.5]]))
    torch.testing.assert_close(
        softmax_route(u, temperature=2.0)[0],
        torch.tensor([1 / (1 + 3**0.5), 3**0.5 / (1 + 3**0.5)]),
    )


@pytest.mark.parametrize("k", [1, 2, 3])
def test_topk_zeros_exactly_the_non_chosen_experts(k):
    u, _ = random_problem(tokens=30, E=6)
    g = topk_route(u, k)
    for row, weights in zip(u, g, strict=True):
        chosen = sorted(np.argsort(-row.numpy())[:k].tolist())
        assert torch.nonzero(weights).flatten().tolist() == chosen
        e = torch.exp(row[chosen])
        torch.testing.assert_close(weights[chosen], e / e.sum(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ROUTERS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_every_router_gives_weights_on_the_simplex(name, dtype):
    r = router(name, d_in=8, E=5, dtype=dtype)
    x = (3 * torch.randn(64, 8, generator=torch.Generator().manual_seed(1))).to(dtype)
    routing = r.route(x)
    g = routing.weights
    assert g.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.isfinite(g).all() and (g >= 0).all()
    torch.testing.assert_close(g.sum(-1), torch.ones(64, dtype=g.dtype), rtol=0, atol=1e-6)
    assert ((g > 0).sum(-1) >= 1).all()
    if name == "topk":
        assert ((g > 0).sum(-1) == 2).all()


# -------------------------------------------------------------- LD-MoLE closed form (Proposition 1)


@pytest.mark.parametrize("E", [2, 3, 5, 6])
def test_closed_form_equals_exhaustive_qp_solution(E):
    u, lam = random_problem(tokens=60, E=E, seed=E)
    p = sparsegen_route(u, lam)
    expected = torch.stack(
        [
            torch.from_numpy(qp_reference(row.numpy(), float(row_lam)))
            for row, row_lam in zip(u, lam, strict=True)
        ]
    )
    torch.testing.assert_close(p, expected, rtol=1e-10, atol=1e-10)


def test_closed_form_handles_ties_and_equal_logits():
    u = torch.tensor([[1.0, 1.0, 1.0, 1.0], [2.0, 2.0, 0.0, -5.0]], dtype=torch.float64)
    lam = torch.tensor([[0.5], [0.9]], dtype=torch.float64)
    torch.testing.assert_close(
        sparsegen_route(u, lam),
        torch.tensor([[0.25] * 4, [0.5, 0.5, 0.0, 0.0]], dtype=torch.float64),
    )


def test_every_token_keeps_at_least_one_expert():
    u, lam = random_problem(tokens=500, E=8, spread=50.0)
    lam = torch.where(torch.arange(500)[:, None] % 2 == 0, 1 - 1e-9 * torch.ones_like(lam), lam)
    g = sparsegen_route(u, lam)
    assert ((g > 0).sum(-1) >= 1).all() and torch.isfinite(g).all()


def test_lambda_to_minus_infinity_gives_uniform_weights():
    u, _ = random_problem(tokens=20, E=5)
    g = sparsegen_route(u, torch.full((20, 1), -1e9, dtype=torch.float64))
    torch.testing.assert_close(g, torch.full_like(g, 0.2), rtol=0, atol=1e-8)


def test_lambda_to_one_gives_one_hot_on_the_top_logit():
    u, _ = random_problem(tokens=20, E=5)
    g = sparsegen_route(u, torch.full((20, 1), 1 - 1e-9, dtype=torch.float64))
    torch.testing.assert_close(g, torch.nn.functional.one_hot(u.argmax(-1), 5).double())


def test_number_of_experts_falls_as_lambda_grows():
    u, _ = random_problem(tokens=30, E=6)
    counts = [
        (sparsegen_route(u, torch.full((30, 1), lam, dtype=torch.float64)) > 0).sum(-1)
        for lam in np.linspace(-100, 0.999, 60)
    ]
    assert all((a >= b).all() for a, b in zip(counts, counts[1:], strict=False))
    assert (counts[0] == 6).all() and (counts[-1] <= 2).all()


def test_float32_stays_on_the_simplex_for_huge_logits_and_lambda_near_one():
    u = 1e3 * torch.randn(100, 8, generator=torch.Generator().manual_seed(2))
    lam = torch.full((100, 1), 0.99)
    g = sparsegen_route(u, lam)
    torch.testing.assert_close(g.sum(-1), torch.ones(100), rtol=0, atol=1e-6)


def test_closed_form_passes_gradcheck_away_from_ties():
    u, lam = random_problem(tokens=40, E=5, seed=7)
    keep = far_from_ties(u, lam)
    assert keep.sum() >= 20
    u, lam = u[keep].requires_grad_(), lam[keep].requires_grad_()
    assert torch.autograd.gradcheck(sparsegen_route, (u, lam), eps=1e-7, atol=1e-6)


def test_closed_form_jacobian_equals_autograd_through_the_formula():
    """The hand-written backward (_Sparsegen) against autograd replaying sort / cumsum / gather,
    float64, per-token lambda and one lambda shared by all tokens."""
    u, lam = random_problem(tokens=200, E=6, seed=11)
    w = torch.randn(200, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(12))
    for lam_in in (lam, torch.tensor(-0.7, dtype=torch.float64)):
        got_u, got_lam = u.clone().requires_grad_(), lam_in.clone().requires_grad_()
        want_u, want_lam = u.clone().requires_grad_(), lam_in.clone().requires_grad_()
        (sparsegen_route(got_u, got_lam) * w).sum().backward()
        (sparsegen_weights(want_u, 1 - want_lam) * w).sum().backward()
        assert got_lam.grad.shape == lam_in.shape
        torch.testing.assert_close(got_u.grad, want_u.grad, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(got_lam.grad, want_lam.grad, rtol=1e-10, atol=1e-10)


def test_dynamic_router_passes_gradcheck_wrt_input_and_parameters():
    r = router("dynamic", d_in=5, E=4, lambda_hidden=7)
    x = torch.randn(12, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        routing = r.route(x)
        keep = far_from_ties(routing.logits, routing.extras["lambda"])
    x = x[keep].requires_grad_()
    names = [n for n, _ in r.named_parameters()]
    params = [p.detach().clone().requires_grad_() for _, p in r.named_parameters()]

    def weights(x, *tensors):
        return route_with(r, dict(zip(names, tensors, strict=True)), x).weights

    assert torch.autograd.gradcheck(weights, (x, *params), eps=1e-7, atol=1e-6)


# ---------------------------------------------------------------- the lambda head


def test_lambda_head_parametrisation_and_init():
    head = LambdaHead(d_in=6, hidden=16, eps=0.01, dtype=torch.float64)
    assert all((linear.bias == LAMBDA_BIAS_INIT).all() for linear in (head.net[0], head.net[2]))
    # x = 0: the ReLU sees only the -2.5 biases, so f(x) = -2.5 and lambda = logsigmoid(-2.5) + 0.99
    lam0 = head(torch.zeros(3, 6, dtype=torch.float64))
    torch.testing.assert_close(
        lam0, torch.full((3, 1), math.log(1 / (1 + math.exp(2.5))) + 0.99, dtype=torch.float64)
    )
    with torch.no_grad():
        head.net[2].bias.fill_(1e4)  # logsigmoid -> 0: lambda at its ceiling 1 - eps, never 1
    torch.testing.assert_close(
        head(torch.randn(3, 6, dtype=torch.float64)), torch.full((3, 1), 0.99, dtype=torch.float64)
    )
    half = LambdaHead(d_in=6, hidden=16, eps=0.01, dtype=torch.bfloat16)
    with torch.no_grad():
        half.net[2].bias.fill_(1e4)
    lam = half(torch.randn(3, 6).bfloat16())
    assert lam.dtype == torch.float32 and (1 - lam >= 0.01 - 1e-7).all()


def test_lambda_bias_init_sets_every_bias_of_the_head_and_so_lambda_at_init():
    # x = 0: f = relu(b) * sum(W2) + b; with b = 0 that is 0, so lambda = logsigmoid(0)
    # + 0.99 = 0.99 - log 2
    model = inject(
        tiny_model("llama"),
        LMoEConfig(
            num_experts=4,
            router="dynamic",
            target_modules="all-linear",
            lambda_hidden=8,
            lambda_bias_init=0.0,
        ),
    )
    heads = {id(m): m for m in model.modules() if isinstance(m, LambdaHead)}.values()
    assert heads and all((lin.bias == 0).all() for h in heads for lin in (h.net[0], h.net[2]))
    head = next(iter(heads)).double()
    lam = head(torch.zeros(2, head.net[0].in_features, dtype=torch.float64))
    torch.testing.assert_close(lam, torch.full((2, 1), 0.99 - math.log(2), dtype=torch.float64))
    with pytest.raises(ValueError, match="lambda_bias_init=nan is invalid"):
        LMoEConfig(router="dynamic", lambda_bias_init=float("nan"))


def test_inject_shares_one_lambda_head_per_input_width():
    model = tiny_model("llama")
    inject(
        model,
        LMoEConfig(num_experts=4, router="dynamic", target_modules="all-linear", lambda_hidden=8),
    )
    heads = {}
    for _, layer in lmoe_layers(model):
        heads.setdefault(layer.in_features, set()).add(id(layer.router.lambda_head))
    assert sorted(heads) == [32, 48] and all(len(ids) == 1 for ids in heads.values())
    per_head = {d: d * 8 + 8 + 8 + 1 for d in heads}
    gates = sum(layer.router.weight.numel() for _, layer in lmoe_layers(model))
    experts = sum(layer.lora_A.numel() + layer.lora_B.numel() for _, layer in lmoe_layers(model))
    assert count_parameters(model)[0] == experts + gates + sum(per_head.values())


def test_shared_lambda_head_saves_once_and_loads_back(tmp_path, input_ids):
    model = tiny_model("llama")
    inject(
        model,
        LMoEConfig(
            num_experts=3, router="dynamic", target_modules=["q_proj", "v_proj"], lambda_hidden=8
        ),
    )
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(std=0.3)
    ref = model(input_ids).logits
    save_adapter(model, tmp_path)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert (
        sum("lambda_head" in key for key in saved) == 4
    )  # one head (two Linear layers) for width 32
    loaded = load_adapter(tiny_model("llama"), tmp_path)
    assert torch.equal(loaded(input_ids).logits, ref)


# ---------------------------------------------------------------- auxiliary losses


def test_load_balance_loss_hand_computed():
    dispatch = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    probs = torch.tensor([[0.7, 0.3], [0.4, 0.6]])
    # f = (2/3, 1/3) of the three dispatches, P = (0.55, 0.45): 2 * (2/3 * 0.55 + 1/3 * 0.45)
    torch.testing.assert_close(
        load_balance_loss(dispatch, probs), torch.tensor(2 * (2 / 3 * 0.55 + 1 / 3 * 0.45))
    )
    balanced = torch.eye(4)
    torch.testing.assert_close(load_balance_loss(balanced, balanced), torch.tensor(1.0))


def test_z_loss_hand_computed():
    u = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    torch.testing.assert_close(z_loss(u), torch.tensor((math.log(2) ** 2 + math.log(4) ** 2) / 2))


@pytest.mark.parametrize("name", ROUTERS)
def test_router_aux_losses_use_the_right_dispatch(name):
    r = router(name, d_in=6, E=4, dtype=torch.float64)
    x = torch.randn(50, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    routing = r.route(x)
    losses = r.aux_losses(routing)
    u = routing.logits
    if name == "softmax":  # a token counts for its top expert, P = softmax
        dispatch, probs = (
            torch.nn.functional.one_hot(u.argmax(-1), 4).double(),
            torch.softmax(u, -1),
        )
    elif name == "topk":  # its k experts, P = the full softmax
        dispatch, probs = (routing.weights > 0).double(), torch.softmax(u, -1)
    else:  # LD-MoLE: every expert with g_i > 0, P = g
        dispatch, probs = (routing.weights > 0).double(), routing.weights
    f = dispatch.sum(0) / dispatch.sum()
    torch.testing.assert_close(losses["load_balance"], 4 * (f * probs.mean(0)).sum())
    torch.testing.assert_close(losses["z_loss"], (torch.logsumexp(u, -1) ** 2).mean())
    assert ("sparsity" in losses) == (name == "dynamic")


def test_topk_computes_its_full_softmax_only_for_the_balance_loss():
    """A forward (generation) leaves top-k's full softmax uncomputed; the balance loss reads it,
    with its gradient, as the eager formula does."""
    r = router("topk", d_in=6, E=4, dtype=torch.float64, temperature=2.0, top_k=2)
    x = torch.randn(30, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    routing = r.route(x)
    assert callable(routing.probs)
    probs = routing.dense_probs()
    torch.testing.assert_close(probs, torch.softmax(routing.logits / 2.0, -1), rtol=0, atol=0)
    assert routing.dense_probs() is probs  # computed once
    lazy = torch.autograd.grad(r.aux_losses(r.route(x))["load_balance"], r.weight)[0]
    u = r.route(x).logits
    dispatch = (topk_route(u, 2, 2.0) > 0).double()
    eager = 4 * (dispatch.sum(0) / dispatch.sum() * torch.softmax(u / 2.0, -1).mean(0)).sum()
    torch.testing.assert_close(
        lazy, torch.autograd.grad(eager, r.weight)[0], rtol=1e-12, atol=1e-12
    )
    assert lazy.abs().sum() > 0


@pytest.mark.parametrize("k", [1, 2, 3])
def test_sparsity_threshold_is_where_the_qp_drops_to_k_experts(k):
    u, _ = random_problem(tokens=12, E=5, seed=10 + k)
    threshold = sparsity_threshold(u, k)
    expected = torch.tensor([[bisect_threshold(row.numpy(), k)] for row in u], dtype=torch.float64)
    torch.testing.assert_close(threshold, expected, rtol=0, atol=1e-9)
    assert ((sparsegen_route(u, threshold + 1e-9) > 0).sum(-1) <= k).all()
    assert ((sparsegen_route(u, threshold - 1e-6) > 0).sum(-1) > k).all()


def test_sparsity_loss_value_and_gradient_match_references():
    u, lam = random_problem(tokens=30, E=5, seed=5)
    k = 2
    thresholds = torch.tensor(
        [[bisect_threshold(row.numpy(), k)] for row in u], dtype=torch.float64
    )
    expected = torch.clamp(thresholds - lam, min=0).mean()
    lam = lam.requires_grad_()
    loss = sparsity_loss(u, lam, k)
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-9)
    assert 0 < loss.item()
    (grad,) = torch.autograd.grad(loss, lam)
    h = 1e-6  # central differences, away from the kinks lambda = threshold
    smooth = [i for i in range(30) if abs(thresholds[i, 0] - lam[i, 0]) > 1e-3]
    assert len(smooth) >= 25 and (grad != 0).any() and (grad == 0).any()
    for i in smooth:
        step = torch.zeros_like(lam)
        step[i] = h
        fd = (sparsity_loss(u, lam + step, k) - sparsity_loss(u, lam - step, k)) / (2 * h)
        torch.testing.assert_close(grad[i, 0], fd.detach(), rtol=0, atol=1e-8)


def test_sparsity_loss_trains_only_the_lambda_head_and_matches_finite_differences():
    r = router("dynamic", d_in=5, E=4, lambda_hidden=6, sparsity_target=1, sparsity_coef=1.0)
    x = torch.randn(20, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    head_names = [n for n, _ in r.named_parameters() if n.startswith("lambda_head.")]
    params = [dict(r.named_parameters())[n].detach().clone().requires_grad_() for n in head_names]

    def loss(*tensors):
        return r.aux_losses(route_with(r, dict(zip(head_names, tensors, strict=True)), x))[
            "sparsity"
        ]

    assert loss(*params) > 0
    assert torch.autograd.gradcheck(loss, tuple(params), eps=1e-7, atol=1e-6)
    routing = r.route(x)
    r.aux_losses(routing)["sparsity"].backward()
    assert (
        r.weight.grad is None and r.lambda_head.net[0].weight.grad is not None
    )  # the gate is not pushed by this loss


def test_sparsity_loss_is_zero_when_the_target_is_all_experts():
    u, lam = random_problem(tokens=10, E=4)
    assert sparsity_loss(u, lam, 4) == 0


def test_masked_losses_count_only_the_kept_tokens():
    u, lam = random_problem(tokens=30, E=5, seed=3)
    keep = torch.rand(30, generator=torch.Generator().manual_seed(0)) > 0.3
    pad = lambda t, value: torch.where(keep[:, None], t, value)  # noqa: E731 - padding that would dominate
    dispatch, probs = (sparsegen_route(u, lam) > 0).double(), softmax_route(u)
    # hand references on the kept tokens alone
    f = dispatch[keep].sum(0) / dispatch[keep].sum()
    torch.testing.assert_close(
        load_balance_loss(pad(dispatch, 1.0), pad(probs, 1.0), keep),
        5 * (f * probs[keep].mean(0)).sum(),
    )
    torch.testing.assert_close(
        z_loss(pad(u, 1e4), keep), (torch.logsumexp(u[keep], -1) ** 2).mean()
    )
    thresholds = torch.tensor(
        [bisect_threshold(row.numpy(), 2) for row in u[keep]], dtype=torch.float64
    )
    torch.testing.assert_close(
        sparsity_loss(pad(u, 1e4), pad(lam, -50.0), 2, keep),
        torch.clamp(thresholds - lam[keep, 0], min=0).mean(),
        rtol=0,
        atol=1e-9,
    )
    none = torch.zeros(30, dtype=torch.bool)  # nothing kept: zero, not NaN
    assert z_loss(u, none) == 0 and load_balance_loss(dispatch, probs, none) == 0


def test_aux_loss_weights_each_term_with_its_config_coefficient(input_ids):
    model = tiny_model("llama").train()
    cfg = LMoEConfig(
        num_experts=4,
        router="dynamic",
        target_modules=["q_proj"],
        load_balance_coef=0.5,
        z_loss_coef=0.1,
        sparsity_coef=2.0,
        sparsity_target=1,
        lambda_hidden=8,
    )
    inject(model, cfg)
    model(input_ids)
    terms = aux_losses(model)
    assert set(terms) == {"load_balance", "z_loss", "sparsity"}
    expected = 0.5 * terms["load_balance"] + 0.1 * terms["z_loss"] + 2.0 * terms["sparsity"]
    torch.testing.assert_close(aux_loss(model), expected)


def test_dynamic_defaults_are_the_authors_released_settings():
    cfg = LMoEConfig(router="dynamic")
    assert (
        cfg.load_balance_coef,
        cfg.sparsity_coef,
        cfg.sparsity_target,
        cfg.lambda_hidden,
        cfg.lambda_eps,
    ) == (1.0, 0.0, 2, None, 0.01)
    assert LMoEConfig(router="softmax").load_balance_coef == 0.1  # the routing study's choice
    assert LMoEConfig(router="topk").load_balance_coef == 0.01
    assert LMoEConfig.from_json(cfg.to_json()) == cfg


@pytest.mark.parametrize(
    "width, hidden", [(1024, 128), (2048, 256), (3072, 256), (576, 64), (64, 32), (16384, 512)]
)
def test_default_lambda_width_follows_the_authors_per_model_configs(width, hidden):
    # eshentw/LD-MoLE conf/model: Qwen3-0.6B (1024) 128, Qwen3-1.7B (2048) 256, Llama-3.2-3B (3072)
    # 256; SmolLM2 (576) gets 64; within 32..512
    assert default_lambda_hidden(width) == hidden


def test_inject_fixes_one_lambda_width_for_the_whole_model_and_saves_it(tmp_path):
    model = inject(tiny_model("llama"), LMoEConfig(router="dynamic", target_modules="all-linear"))
    widths = {layer.in_features for _, layer in lmoe_layers(model)}
    assert len(widths) > 1  # heads for several input widths, one hidden width
    expected = default_lambda_hidden(min(widths))
    assert model.lmoe_config.lambda_hidden == expected
    heads = {
        id(layer.router.lambda_head): layer.router.lambda_head for _, layer in lmoe_layers(model)
    }
    assert len(heads) == len(widths) and all(
        h.net[0].out_features == expected for h in heads.values()
    )
    save_adapter(model, tmp_path)
    loaded = load_adapter(tiny_model("llama"), tmp_path)
    assert loaded.lmoe_config.lambda_hidden == expected
    explicit = inject(
        tiny_model("llama"),
        LMoEConfig(router="dynamic", target_modules="all-linear", lambda_hidden=24),
    )
    assert explicit.lmoe_config.lambda_hidden == 24


@pytest.mark.parametrize("router", ["softmax", "topk", "dynamic"])
def test_router_init_std_draws_the_gate_from_that_normal(router):
    torch.manual_seed(0)
    # the weights in use, stored divided by router_param_scale
    default = build_router(512, LMoEConfig(num_experts=8, router=router)).effective_weight()
    drawn = build_router(512, LMoEConfig(num_experts=8, router=router, router_init_std=0.3))
    default, drawn = default.detach(), drawn.effective_weight().detach()
    assert float(default.std()) == pytest.approx(
        1 / math.sqrt(3 * 512), rel=0.05
    )  # nn.Linear's uniform
    assert float(drawn.std()) == pytest.approx(0.3, rel=0.05) and abs(float(drawn.mean())) < 0.02
    # a normal, not a stretched uniform: mass beyond 2 std (uniform: none)
    assert 0.03 < float((drawn.abs() > 0.6).float().mean()) < 0.07
