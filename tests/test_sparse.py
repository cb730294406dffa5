"""The sparse kernels (lmoe/kernels/grouped.py, csr.py, gathered.py) and the rule (lmoe/sparse.py):
per-token brute force in float64, the dense path in float32, grouped products against explicit
loops, and the rule that picks the path."""

import copy
import itertools

import pytest
import torch
from conftest import VOCAB, tiny_model
from test_layer import COMPOSITIONS, brute_force, make_layer
from torch import nn

import lmoe.kernels
import lmoe.layer
from lmoe import LMoEConfig, MoLoRALinear, inject
from lmoe.kernels.csr import csr_ok
from lmoe.kernels.grouped import _grouped_ok, grouped_mm, route_pairs
from lmoe.modular.experts import add_experts, remove_experts
from lmoe.sparse import CSR_GROUP_COST, DENSE_UP_TO_RANK, GROUP_COST, prefer_sparse

SPARSE_ROUTERS = ["topk", "dynamic", "remix"]


@pytest.fixture
def no_dense(monkeypatch):
    """Make the dense mixture fail, so a test passes only through the sparse path."""

    def refuse(*args):
        raise AssertionError("the dense path ran")

    monkeypatch.setitem(lmoe.kernels.KERNELS, "dense", refuse)


@pytest.fixture(params=["csr", "grouped"])
def kernel(request, monkeypatch):
    """Each of the sparse path's two ways to run the grouped products, the other made to fail: CSR
    products (CPU, float32/64) and torch's grouped GEMM / per-expert loop (any device)."""

    def refuse(*args):
        raise AssertionError("the other kernel ran")

    if request.param == "grouped":
        monkeypatch.setattr(lmoe.layer, "csr_ok", lambda device, dtype: False)
        monkeypatch.setitem(lmoe.kernels.KERNELS, "csr", refuse)
    else:
        monkeypatch.setitem(lmoe.kernels.KERNELS, "grouped", refuse)
    return request.param


def gradients(
    layer: nn.Module, x: torch.Tensor, out: torch.Tensor, grad_out: torch.Tensor
) -> list[torch.Tensor]:
    wrt = [x] + [p for p in layer.parameters() if p.requires_grad]
    return list(torch.autograd.grad(out, wrt, grad_out, allow_unused=True))


@pytest.mark.parametrize("router", SPARSE_ROUTERS)
@pytest.mark.parametrize("composition", COMPOSITIONS)
@pytest.mark.parametrize("E", [2, 8, 64])
@pytest.mark.parametrize("shape", [(1, 1), (4, 10)])
def test_sparse_layer_equals_per_token_brute_force(router, composition, E, shape, no_dense, kernel):
    """Values and every gradient (input, experts, gate, lambda head) against the docs/design.md
    formulas, float64; one token (each token's experts gathered) and 40 (pairs grouped by expert,
    except for the dynamic router at E = 64 with few experts a token), through either kernel."""
    layer = make_layer(router, composition, E=E, r=2)
    layer.execution = "sparse"
    if router == "remix":  # evaluation's routing (top-k at 1/k): the same every call, unlike draws
        layer.eval()
    x = torch.randn(*shape, 5, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    g = layer.router.route(x.reshape(-1, 5)).weights
    if router == "dynamic" and E > 2 and shape[1] > 1:
        assert ((g > 0).sum(-1) < E).all() and (
            (g > 0).sum(-1) > 1
        ).any()  # sparse, and not one-hot
    want = brute_force(layer, x, g)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    grad_out = torch.randn_like(out)
    for a, b in zip(
        gradients(layer, x, out, grad_out), gradients(layer, x, want, grad_out), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), want, rtol=1e-10, atol=1e-10)


def layer_pair(router, composition, E, top_k=2, dtype=torch.float32):
    """The same random layer (d 32 -> 48, r 4), dense and sparse: sizes torch's
    grouped GEMM takes."""
    torch.manual_seed(0)
    cfg = LMoEConfig(
        num_experts=E,
        rank=4,
        router=router,
        composition=composition,
        top_k=top_k,
        router_bias=True,
        lambda_hidden=8,
        lambda_bias_init=2.0,
        target_modules="all-linear",
    )
    dense = MoLoRALinear(nn.Linear(32, 48), cfg).to(dtype)
    with torch.no_grad():
        for name, p in dense.named_parameters():  # the router's in use: stored divided by its scale
            std = 0.1 if "lambda" in name else 0.5
            p.normal_(std=std / dense.router.scale if "router" in name else std)
    sparse = copy.deepcopy(dense)
    dense.execution, sparse.execution = "dense", "sparse"
    return dense, sparse


def assert_near(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> None:
    """float32 agreement relative to the tensor's largest value (sums grouped differently
    round differently)."""
    torch.testing.assert_close(a, b, rtol=0, atol=rel * float(b.detach().abs().max()) + 1e-12)


@pytest.mark.parametrize("router,top_k", [("topk", 2), ("dynamic", 2), ("topk", "E")])
@pytest.mark.parametrize("composition", COMPOSITIONS)
@pytest.mark.parametrize("E", [2, 8, 64])
def test_sparse_equals_dense_in_float32(router, top_k, composition, E, kernel):
    """The issue's check: sparse and dense agree to float32 tolerance in values and every gradient,
    top-k with k = 2 and k = E, the dynamic router; through the CSR products and through torch's
    grouped GEMM (these sizes are ones it takes)."""
    dense, sparse = layer_pair(router, composition, E, top_k=E if top_k == "E" else top_k)
    x = torch.randn(3, 40, 32, requires_grad=True)
    assert _grouped_ok(x, sparse.lora_A.transpose(1, 2))
    want, got = dense(x), sparse(x)
    assert_near(got, want)
    grad_out = torch.randn_like(want)
    for a, b in zip(
        gradients(sparse, x, got, grad_out), gradients(dense, x, want, grad_out), strict=True
    ):
        assert_near(a, b)


@pytest.mark.parametrize("execution", ["dense", "sparse"])
def test_expert_gradients_arrive_in_the_parameters_layout(execution):
    """Each path's gradient of lora_A and lora_B already has the parameter's strides, so autograd
    does not copy a bank-sized gradient (E r d values per layer) to match it; lora_B's layout
    survives add_experts."""
    model = inject(
        nn.Sequential(nn.Linear(32, 48)),
        LMoEConfig(num_experts=8, rank=4, router="topk", execution=execution, target_modules=["0"]),
    )
    add_experts(model, 1)
    layer = model[0]
    nn.init.normal_(layer.lora_B)
    arrived = {}
    for name in ("lora_A", "lora_B"):
        getattr(layer, name).register_hook(
            lambda grad, name=name: arrived.update({name: grad.stride()})
        )
    layer(torch.randn(40, 32)).square().sum().backward()
    assert arrived == {"lora_A": layer.lora_A.stride(), "lora_B": layer.lora_B.stride()}
    assert (
        layer.stacked()[1].data_ptr() == layer.lora_B.data_ptr()
    )  # the dense path's stacked B: a view


@pytest.mark.parametrize("router", SPARSE_ROUTERS)
def test_padding_masks_leave_the_same_losses_and_gradients(router):
    """A model with padding: LM loss + router losses (which count only real tokens)
    and their gradients."""
    models = {}
    for execution in ("dense", "sparse"):
        model = tiny_model("llama").double()
        models[execution] = inject(
            model,
            LMoEConfig(
                num_experts=8,
                rank=4,
                router=router,
                execution=execution,
                target_modules="all-linear",
                z_loss_coef=0.01,
                sparsity_coef=0.1 if router == "dynamic" else 0.0,
                lambda_bias_init=2.0,
                lambda_hidden=8,
            ),
        ).train()
    torch.manual_seed(0)
    for p in models["dense"].parameters():
        if p.requires_grad:
            nn.init.normal_(p, std=0.2)
    models["sparse"].load_state_dict(models["dense"].state_dict())
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    results = []
    for model in models.values():
        torch.manual_seed(4)  # remix: both draw the same routing
        out = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
        assert out.aux_loss > 0
        grads = torch.autograd.grad(out.loss, [p for p in model.parameters() if p.requires_grad])
        results.append((out.loss, out.aux_loss, grads))
    (loss_d, aux_d, grads_d), (loss_s, aux_s, grads_s) = results
    torch.testing.assert_close(loss_s, loss_d, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(aux_s, aux_d, rtol=1e-10, atol=1e-12)
    for a, b in zip(grads_s, grads_d, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_route_pairs_by_hand():
    g = torch.tensor([[0.7, 0.0, 0.3], [0.0, 1.0, 0.0], [0.5, 0.5, 0.0]])
    pairs = route_pairs(g, None)  # every g > 0, by expert then token
    assert pairs.expert.tolist() == [0, 0, 1, 1, 2] and pairs.token.tolist() == [0, 2, 1, 2, 0]
    assert pairs.ends.tolist() == [2, 4, 5] and pairs.counts() == [2, 2, 1]
    top2 = route_pairs(g, 2)  # two pairs a token; token 1's second has weight 0
    assert sorted(top2.token.tolist()) == [0, 0, 1, 1, 2, 2]
    assert top2.expert.tolist() == sorted(top2.expert.tolist())
    assert top2.ends.tolist() == torch.bincount(top2.expert, minlength=3).cumsum(0).tolist()
    cells = {
        (t, e)
        for t, e in zip(top2.token.tolist(), top2.expert.tolist(), strict=True)
        if g[t, e] > 0
    }
    assert cells == {tuple(c) for c in g.nonzero().tolist()}


def loop_reference(a, b, counts):
    """grouped_mm's two forms with explicit slices, one expert at a time."""
    out, start = [], 0
    for e, n in enumerate(counts):
        out.append(
            a[start : start + n] @ b[e]
            if b.dim() == 3
            else a[:, start : start + n] @ b[start : start + n]
        )
        start += n
    return torch.cat(out) if b.dim() == 3 else torch.stack(out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_grouped_mm_equals_a_loop_over_experts_with_empty_ones(dtype):
    """float32: torch's grouped GEMM (the fast path); float64: the per-expert fallback. Experts 1
    and 4 get no rows: their weight gradients are exact zeros."""
    g = torch.zeros(12, 5, dtype=dtype)
    g[torch.arange(12), torch.tensor([0, 2, 3, 0, 2, 2, 3, 0, 0, 2, 3, 3])] = 1.0
    pairs = route_pairs(g, 1)
    counts = pairs.counts()
    assert counts == [4, 0, 4, 4, 0]
    a, b3 = torch.randn(12, 8, dtype=dtype), torch.randn(5, 8, 16, dtype=dtype)
    assert _grouped_ok(a, b3) == (dtype == torch.float32)
    torch.testing.assert_close(grouped_mm(a, b3, pairs), loop_reference(a, b3, counts))
    c = torch.randn(12, 4, dtype=dtype)
    weights = grouped_mm(a.t(), c, pairs)  # (E, 8, 4)
    torch.testing.assert_close(weights, loop_reference(a.t(), c, counts))
    assert not weights[[1, 4]].any()


def test_grouped_gemm_is_skipped_for_sizes_it_does_not_take():
    assert not _grouped_ok(torch.randn(6, 5), torch.randn(2, 5, 3))  # rows of 20 bytes
    assert not _grouped_ok(
        torch.randn(6, 8), torch.randn(2, 8, 4, dtype=torch.float64)
    )  # mixed dtypes


@pytest.mark.parametrize("composition", COMPOSITIONS)
def test_half_precision_sparse_close_to_float32_dense(composition, monkeypatch):
    """bfloat16 on the CPU runs through torch's grouped GEMM (not the CSR products, which MKL runs
    in float32/64 only); rounding aside it is the dense float32 result."""

    def refuse(*args):
        raise AssertionError("the CSR kernel ran in bfloat16")

    monkeypatch.setitem(lmoe.kernels.KERNELS, "csr", refuse)
    dense, sparse = layer_pair("topk", composition, 16)
    sparse.to(torch.bfloat16)
    x = torch.randn(2, 20, 32)
    assert_near(sparse(x.bfloat16()).float(), dense(x), rel=0.03)


@pytest.mark.parametrize("composition", COMPOSITIONS)
def test_sparse_with_dropout_is_dense_with_the_same_mask(composition):
    dense, sparse = layer_pair("topk", composition, 8, dtype=torch.float64)
    for layer in (dense, sparse):
        layer.dropout = nn.Dropout(0.3)
    x = torch.randn(30, 32, dtype=torch.float64, requires_grad=True)
    outs = []
    for layer in (dense, sparse):
        torch.manual_seed(7)
        out = layer.train()(x)
        outs.append((out, gradients(layer, x, out, torch.ones_like(out))))
    torch.testing.assert_close(outs[1][0], outs[0][0])
    for a, b in zip(outs[1][1], outs[0][1], strict=True):
        torch.testing.assert_close(a, b)


def test_adding_and_removing_experts_keeps_sparse_equal_to_dense(input_ids):
    models = [
        inject(
            tiny_model("llama").double(),
            LMoEConfig(
                num_experts=6,
                rank=4,
                router="topk",
                execution=execution,
                target_modules="all-linear",
            ),
        )
        for execution in ("dense", "sparse")
    ]
    for model in models:
        torch.manual_seed(0)
        for p in model.parameters():
            if p.requires_grad:
                nn.init.normal_(p, std=0.3)
        add_experts(model, 2, logit=-1.0)
        remove_experts(model, [0, 3])
    logits = [model(input_ids).logits for model in models]
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-10, atol=1e-10)
    grads = [
        torch.autograd.grad(out.square().mean(), [p for p in m.parameters() if p.requires_grad])
        for out, m in zip(logits, models, strict=True)
    ]
    for a, b in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("cost", [GROUP_COST, CSR_GROUP_COST])
def test_auto_keeps_todays_sizes_dense_and_goes_sparse_for_many_experts(cost):
    for E in (4, 8):
        for r in (4, 8):
            for tokens in (1, 16, 256, 1024, 8192):
                assert not prefer_sparse(E, r, 2, tokens, cost), (E, r, tokens)
                assert not prefer_sparse(E, r, 1, tokens, cost), (
                    E,
                    r,
                    tokens,
                )  # the dynamic router's best case
    for E, r in itertools.product(
        range(1, 65), range(1, 65)
    ):  # the layer's shortcut agrees with the rule
        if E * r <= DENSE_UP_TO_RANK:
            assert not any(
                prefer_sparse(E, r, 1, tokens, cost) for tokens in (1, 7, 64, 1024, 10**6)
            ), (E, r)
    for tokens in (1, 1024):
        assert prefer_sparse(64, 8, 2, tokens, cost)
    assert not prefer_sparse(
        64, 8, 64, 1024, cost
    )  # every expert active (softmax; LD-MoLE at its init)


def test_auto_rule_for_the_csr_products_follows_their_measured_crossover():
    """bench/results/sparse_rule_fit.txt (fwd+bwd, d = 576, r 8, k 2): CSR sparse won at E = 32 from
    16 tokens and at E = 64 from 16, tied or lost at E = 16 up to 1024; the grouped kernel's rule
    keeps E = 32 at 128 tokens dense."""
    for E, tokens in [(32, 16), (32, 128), (64, 16), (64, 128)]:
        assert prefer_sparse(E, 8, 2, tokens, CSR_GROUP_COST), (E, tokens)
    for tokens in (16, 128, 256, 1024):
        assert not prefer_sparse(16, 8, 2, tokens, CSR_GROUP_COST), tokens
    assert not prefer_sparse(32, 8, 2, 128, GROUP_COST)
    layer = MoLoRALinear(
        nn.Linear(32, 32),
        LMoEConfig(num_experts=32, rank=8, router="topk", target_modules="all-linear"),
    )
    assert layer._plan(128, csr_ok(torch.device("cpu"), torch.float32)) == "sparse"
    assert (
        layer._plan(128, csr_ok(torch.device("cpu"), torch.bfloat16)) == "dense"
    )  # bf16: the grouped rule


def test_auto_dynamic_router_follows_the_observed_number_of_experts(monkeypatch):
    """LD-MoLE at E = 64: dense while lambda keeps (nearly) every expert, sparse
    once it routes few."""
    ran = []
    for name in ("gathered", "csr", "dense"):
        monkeypatch.setitem(
            lmoe.kernels.KERNELS, name, lambda inputs, name=name: ran.append(name) or inputs.y
        )
    layer = MoLoRALinear(
        nn.Linear(32, 32),
        LMoEConfig(num_experts=64, router="dynamic", lambda_hidden=8, target_modules="all-linear"),
    )
    with torch.no_grad():
        head = layer.router.lambda_head.net[2]
        # lambda about -9: sparsemax(u / 10), nearly uniform
        head.init_effective(bias=torch.full_like(head.bias, -10.0))
        layer(torch.randn(64, 32))
        head.init_effective(bias=torch.full_like(head.bias, 8.0))  # lambda near 1: 1 expert a token
        layer(torch.randn(200, 32))  # 200 tokens of one or two experts: the pairs grouped by expert
        layer(torch.randn(4, 32))  # 4 tokens: their experts' weights gathered
    assert ran == ["dense", "csr", "gathered"]


def test_auto_dynamic_router_observed_dense_keeps_every_gradient():
    """auto at E = 64 with nearly every expert on: the codes A x are computed apart from the base
    product (the routing is known only after it), the rest as dense; values and gradients as
    execution=dense (float64)."""
    auto = make_layer("dynamic", "params", E=64, r=4)
    with torch.no_grad():
        head = auto.router.lambda_head.net[2]
        head.init_effective(bias=torch.full_like(head.bias, -100.0))  # sparsemax(u / 100): ~uniform
    dense = copy.deepcopy(auto)
    auto.execution, dense.execution = "auto", "dense"
    x = torch.randn(300, 5, dtype=torch.float64, requires_grad=True)
    assert auto._plan(300, True) == "after_routing"
    assert (auto.router.route(x).weights > 0).sum(-1).float().mean() > 32
    got, want = auto(x), dense(x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    grad_out = torch.randn_like(got)
    for a, b in zip(
        gradients(auto, x, got, grad_out), gradients(dense, x, want, grad_out), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
