"""ReMix's router (router="remix", lmoe/remix.py): the drawn sets against the router's set
probabilities, equal weights, the RLOO estimator against the exact gradient of the expected loss
(every set enumerated), the estimator inside a model's loss against one written out by hand, and
that no other gradient reaches the router."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB, tiny_model

from lmoe import LMoEConfig, inject, lmoe_layers
from lmoe.layer import MoLoRALinear
from lmoe.models import enable_activation_checkpointing
from lmoe.remix import draw_without_replacement, rloo_advantages, rloo_surrogate, set_log_prob

# chi-square quantiles at 1 - 1e-4 (scipy.stats.chi2.ppf(0.9999, df)): a correct sampler fails one
# run in 10,000
CHI2_9999 = {5: 25.74, 19: 50.80}  # degrees of freedom: the number of sets - 1


def set_probability(p: torch.Tensor, subset: tuple[int, ...]) -> torch.Tensor:
    """P(subset) under sequential draws without replacement from p (E,): the sum over every order of
    the product of each draw's probability among the experts left (written out, no log space)."""
    total = p.new_zeros(())
    for order in itertools.permutations(subset):
        prob, left = p.new_ones(()), p.new_ones(())
        for i in order:
            prob = prob * p[i] / left
            left = left - p[i]
        total = total + prob
    return total


def subsets(E: int, k: int) -> list[tuple[int, ...]]:
    return list(itertools.combinations(range(E), k))


@pytest.mark.parametrize("E,k", [(4, 2), (5, 3), (4, 4), (6, 1)])
def test_set_log_prob_matches_the_written_out_sum_over_orders(E, k):
    u = torch.randn(3, E, generator=torch.Generator().manual_seed(E + k), dtype=torch.float64) * 2
    p = torch.softmax(u, -1)
    for S in subsets(E, k):
        index = torch.tensor(S).expand(3, k)
        expected = torch.stack([set_probability(p[t], S) for t in range(3)])
        torch.testing.assert_close(set_log_prob(u, index).exp(), expected)
    # order does not matter, and the probabilities of all sets add up to one
    flipped = torch.tensor(subsets(E, k)[0][::-1]).expand(3, k)
    torch.testing.assert_close(set_log_prob(u, flipped), set_log_prob(u, flipped.flip(-1)))
    total = sum(set_log_prob(u, torch.tensor(S).expand(3, k)).exp() for S in subsets(E, k))
    torch.testing.assert_close(total, torch.ones(3, dtype=torch.float64))


def test_set_log_prob_stays_finite_where_one_expert_holds_almost_all_mass():
    u = torch.tensor([[40.0, 0.0, -1.0, 2.0]])  # p_0 = 1 - 4e-17: 1 - p_0 is 0 in float32
    logp = set_log_prob(u, torch.tensor([[1, 2]]))
    p = torch.softmax(u.double(), -1)
    expected = p[0, 1] * p[0, 2] * (1 / (1 - p[0, 1]) + 1 / (1 - p[0, 2]))
    assert torch.isfinite(logp).all()
    torch.testing.assert_close(logp.double(), expected.log().view(1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("E,k", [(4, 2), (6, 3)])
def test_drawn_sets_follow_the_routers_set_probabilities(E, k):
    """Chi-square of 40,000 draws (fixed seed) against P(S): below the 1 - 1e-4 quantile."""
    torch.manual_seed(0)
    u = torch.tensor([1.5, 0.0, -1.0, 0.5, -0.5, 1.0][:E])
    draws = 40_000
    index = draw_without_replacement(u.expand(draws, E), k)
    assert (index.sort(-1).values.diff(dim=-1) > 0).all()  # k distinct experts
    seen = {S: 0 for S in subsets(E, k)}
    for row in index.sort(-1).values.tolist():
        seen[tuple(row)] += 1
    p = torch.softmax(u.double(), -1)
    expected = {S: draws * set_probability(p, S).item() for S in seen}
    chi2 = sum((seen[S] - expected[S]) ** 2 / expected[S] for S in seen)
    assert chi2 < CHI2_9999[len(seen) - 1]


def test_rloo_advantages_leave_each_sample_out():
    losses = torch.tensor([[1.0, 2.0, 6.0], [0.0, 0.0, 3.0]])
    expected = torch.tensor([[1 - 4.0, 2 - 3.5, 6 - 1.5], [0 - 1.5, 0 - 1.5, 3 - 0.0]])
    torch.testing.assert_close(rloo_advantages(losses), expected)


# ---------------------------------------------------------------- the estimator, the exact gradient


def toy_loss(sets: list[tuple[int, ...]], k: int) -> torch.Tensor:
    """A sequence's loss given its 2 tokens' expert sets: nonlinear in the equal-weight mixes."""
    c = torch.tensor([[1.0, -2.0, 0.5, 3.0], [-1.0, 2.5, 1.5, 0.0]], dtype=torch.float64)
    mix = [sum(c[t, i] for i in S) / k for t, S in enumerate(sets)]
    return (mix[0] - 0.5) ** 2 + mix[0] * mix[1]


U = [[0.3, -0.8, 1.1, 0.0], [0.5, 0.2, -0.4, -1.0]]  # a 2-token sequence's logits, E = 4


def exact_gradient(u: torch.Tensor, k: int) -> torch.Tensor:
    """d/du of the expected toy_loss: the sum over all joint routings of P(routing) * loss."""
    p = torch.softmax(u, -1)
    token_sets = subsets(u.shape[-1], k)
    P = [[set_probability(p[t], S) for S in token_sets] for t in range(2)]
    expected = sum(
        P[0][a] * P[1][b] * toy_loss([Sa, Sb], k)
        for (a, Sa), (b, Sb) in itertools.product(enumerate(token_sets), repeat=2)
    )
    return torch.autograd.grad(expected, u)[0]


def test_rloo_estimate_is_the_exact_gradient_of_the_expected_loss():
    """E=4, k=2, a sequence of 2 tokens (36 joint routings), M=2 draws: the estimator's mean over
    all 36^2 pairs of draws, weighted by their probabilities, equals the gradient of the expected
    loss (exact sum over the 36 routings), to float64 rounding."""
    E, k = 4, 2
    u = torch.tensor(U, dtype=torch.float64, requires_grad=True)
    routings = list(itertools.product(subsets(E, k), repeat=2))  # (S_token0, S_token1)
    index = torch.tensor(routings)  # (36, 2 tokens, k)
    logp = set_log_prob(u.repeat(len(routings), 1), index.flatten(0, 1)).view(-1, 2).sum(-1)
    loss = torch.stack([toy_loss(list(r), k) for r in routings])
    prob = logp.exp().detach()
    i, j = torch.cartesian_prod(torch.arange(len(routings)), torch.arange(len(routings))).T
    # every pair (i, j) of draws as a sequence; its estimate weighted by P(i) P(j): advantages are
    # linear in the losses, so scaling a pair's losses scales its estimate
    weight = (prob[i] * prob[j]).unsqueeze(1)
    surrogate = rloo_surrogate(
        weight * torch.stack([loss[i], loss[j]], 1), torch.stack([logp[i], logp[j]], 1)
    )
    (mean,) = torch.autograd.grad(surrogate / 2, u)  # / M
    torch.testing.assert_close(mean, exact_gradient(u, k), rtol=1e-9, atol=1e-12)


def test_sampled_rloo_estimates_average_to_the_exact_gradient():
    """The same problem with the sampler: 40 batches of 500 sequences x M=3 draws; the mean estimate
    lies within 5 standard errors (of the batch means) of the exact gradient in every coordinate."""
    k, M, sequences = 2, 3, 500
    torch.manual_seed(1)
    u = torch.tensor(U, dtype=torch.float64, requires_grad=True)
    c = torch.tensor([[1.0, -2.0, 0.5, 3.0], [-1.0, 2.5, 1.5, 0.0]], dtype=torch.float64)
    means = []
    for _ in range(40):
        tokens = u.repeat(sequences * M, 1)  # rows: (sequence, draw, token)
        index = draw_without_replacement(tokens.detach(), k)
        logp = set_log_prob(tokens, index).view(sequences, M, 2).sum(-1)
        mix = c.repeat(sequences * M, 1).gather(-1, index).mean(-1).view(sequences, M, 2)
        losses = (mix[..., 0] - 0.5) ** 2 + mix[..., 0] * mix[..., 1]
        (grad,) = torch.autograd.grad(rloo_surrogate(losses, logp) / M / sequences, u)
        means.append(grad)
    means = torch.stack(means)
    stderr = means.std(0) / math.sqrt(len(means))
    exact = exact_gradient(u, k)
    assert ((means.mean(0) - exact).abs() < 5 * stderr).all(), (means.mean(0), exact, stderr)


# ---------------------------------------------------------------- the router and the layer


def remix_layer(E=4, k=2, **cfg) -> MoLoRALinear:
    torch.manual_seed(0)
    layer = MoLoRALinear(torch.nn.Linear(16, 8), LMoEConfig(E, 2, router="remix", top_k=k, **cfg))
    with torch.no_grad():
        layer.lora_B.normal_()
    return layer


@pytest.mark.parametrize("training", [True, False])
def test_weights_are_one_over_k_on_the_k_selected_experts_and_zero_elsewhere(training):
    layer = remix_layer(E=5, k=3).train(training)
    x = torch.randn(50, 16)
    routing = layer.router.route(x)
    g = routing.weights
    assert ((g == 0) | (g == 1 / 3)).all() and ((g > 0).sum(-1) == 3).all()
    torch.testing.assert_close(g.sum(-1), torch.ones(50))
    chosen = torch.zeros_like(g).scatter(-1, routing.top_index, 1.0)
    assert torch.equal(chosen, (g > 0).float())
    assert not g.requires_grad and not routing.top_weights.requires_grad
    if not training:  # evaluation: the k largest logits, deterministic
        top = torch.topk(routing.logits, 3, -1).indices
        assert torch.equal(routing.top_index.sort(-1).values, top.sort(-1).values)
        assert "log_prob" not in routing.extras


@pytest.mark.parametrize("execution", ["dense", "sparse"])
def test_no_gradient_reaches_the_router_through_the_layers_output(execution):
    layer = remix_layer(execution=execution).train()
    layer(torch.randn(2, 7, 16)).square().sum().backward(retain_graph=True)
    assert layer.router.weight.grad is None and layer.lora_B.grad.abs().sum() > 0
    routing, _ = layer.last_routing
    (grad,) = torch.autograd.grad(routing.extras["log_prob"].sum(), layer.router.weight)
    assert grad.abs().sum() > 0  # the estimator's path: the drawn sets' log-probability


def test_sparse_and_dense_execution_give_the_same_output_for_the_same_draws():
    x = torch.randn(2, 7, 16)
    outs = []
    for execution in ("dense", "sparse"):
        layer = remix_layer(execution=execution).train()
        torch.manual_seed(5)
        outs.append(layer(x))
    torch.testing.assert_close(outs[0], outs[1])


# ---------------------------------------------------------------- in a model's loss


def remix_model(samples=3, dtype=torch.float32):
    model = tiny_model().to(dtype)
    inject(model, LMoEConfig(4, 2, router="remix", top_k=2, remix_samples=samples))
    torch.manual_seed(2)
    with torch.no_grad():
        for _, layer in lmoe_layers(model):
            layer.lora_B.normal_(std=0.5)  # the draws' losses differ: non-zero advantages
    return model.train()


def batch():
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    labels = torch.where(mask.bool(), ids, -100)
    labels[:, :4] = -100  # a prompt
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def router_and_expert_params(model):
    routers = [p for n, p in model.named_parameters() if p.requires_grad and ".router." in n]
    experts = [p for n, p in model.named_parameters() if p.requires_grad and ".lora_" in n]
    return routers, experts


@pytest.mark.parametrize("num_items", [None, 11])
def test_model_loss_carries_the_rloo_estimate_written_out_by_hand(num_items):
    """With M=3 copies of each sequence: the loss is the mean over copies of the LM loss plus the
    RLOO surrogate built here from the unfolded logits and the layers' log-probabilities, in value
    and in every gradient; the routers' gradient comes from the surrogate alone. (The surrogate
    reaches the experts too: a layer's routing reads hidden states the earlier experts make.)"""
    M, inputs = 3, batch()
    model = remix_model(M)
    seen = {}
    model.lm_head.register_forward_hook(lambda m, a, out: seen.setdefault("logits", out))
    extra = {} if num_items is None else {"num_items_in_batch": num_items}
    out = model(**inputs, **extra)
    assert out.logits.shape == (2, 9, VOCAB)
    labels = inputs["labels"].repeat_interleave(M, 0)[:, 1:]
    token_loss = F.cross_entropy(
        seen["logits"][:, :-1].flatten(0, 1), labels.flatten(), reduction="none"
    ).view(2 * M, -1)
    denominator = (labels != -100).sum() if num_items is None else M * num_items
    lm = token_loss.sum() / denominator
    torch.testing.assert_close(out.loss, lm)  # the surrogate adds 0
    mask = inputs["attention_mask"].repeat_interleave(M, 0).bool()
    logp = sum(
        torch.where(mask, layer.last_routing[0].extras["log_prob"].view(2 * M, 9), 0).sum(-1)
        for _, layer in lmoe_layers(model)
    ).view(2, M)
    L = token_loss.detach().sum(-1).view(2, M)
    advantage = torch.stack([L[:, m] - (L.sum(1) - L[:, m]) / (M - 1) for m in range(M)], dim=1)
    surrogate = (advantage * logp).sum() / denominator
    routers, experts = router_and_expert_params(model)
    got = torch.autograd.grad(out.loss, routers + experts, retain_graph=True)
    want = torch.autograd.grad(lm + surrogate, routers + experts, retain_graph=True)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)
    assert sum(g.abs().sum() for g in got[: len(routers)]) > 0
    through_lm = torch.autograd.grad(lm, routers, allow_unused=True)
    assert all(g is None or not g.any() for g in through_lm)


def test_activation_checkpointing_redraws_the_same_routing_and_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model = remix_model()
        if checkpointing:
            enable_activation_checkpointing(model)
        torch.manual_seed(7)
        model(**batch()).loss.backward()
        grads.append([p.grad for p in model.parameters() if p.requires_grad])
    for plain, checkpointed in zip(*grads, strict=True):
        torch.testing.assert_close(checkpointed, plain)


def test_evaluation_and_no_grad_forwards_draw_no_copies():
    model = remix_model()
    inputs = batch()
    with torch.no_grad():
        train_logits = model(**inputs).logits  # one draw per token, no copies, no labels needed
    assert train_logits.shape == (2, 9, VOCAB)
    model.eval()
    a, b = model(**inputs).logits, model(**inputs).logits
    assert torch.equal(a, b)  # evaluation routes by top-k: deterministic


def test_training_forward_without_labels_says_what_to_do():
    model = remix_model()
    with pytest.raises(ValueError, match="labels="):
        model(input_ids=batch()["input_ids"])


@pytest.mark.parametrize(
    "fields,match",
    [
        (dict(remix_samples=1), "remix_samples=1"),
        (dict(top_k=5), "top_k=5"),
        (dict(num_experts=8, top_k=7), "at most 6"),
    ],
)
def test_config_refuses_what_remix_cannot_run(fields, match):
    with pytest.raises(ValueError, match=match):
        LMoEConfig(**{"router": "remix", "num_experts": 4, **fields})


def test_remix_defaults_to_no_balance_loss():
    assert LMoEConfig(router="remix").load_balance_coef == 0.0


def test_trl_fused_head_gets_the_same_loss_and_gradients_as_the_models_loss():
    """TRL's SFTTrainer calls the model with fused_lm_head=True and takes -sum(log_probs) / tokens:
    its per-token log-probabilities (the M copies' mean, with the surrogate spread over each
    sequence's label positions) give the model's loss and gradients, for the same draws. To 1%: TRL
    computes log_probs in float32 by its own route, and the advantages are differences of them."""
    from trl.trainer.utils import add_fused_lm_head

    results = []
    for fused in (False, True):
        model = remix_model()
        add_fused_lm_head(model)
        torch.manual_seed(3)
        if fused:
            out = model(**batch(), fused_lm_head=True)
            assert out.log_probs.shape == out.label_mask.shape == (2, 8)  # shifted
            loss = -out.log_probs.sum() / out.label_mask.sum()
        else:
            loss = model(**batch()).loss
        params = [p for p in model.parameters() if p.requires_grad]
        results.append((loss, torch.autograd.grad(loss, params)))
    (plain, plain_grads), (fused, fused_grads) = results
    torch.testing.assert_close(fused, plain)
    for a, b in zip(fused_grads, plain_grads, strict=True):
        assert b.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2 * b.abs().max().item())
