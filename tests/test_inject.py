"""inject / remove / aux_loss / record_routing on tiny transformers models of several families."""

import copy
import math
import pickle
import threading

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from conftest import VOCAB, tiny_model
from torch import nn

from lmoe import (
    LMoEConfig,
    aux_loss,
    aux_losses,
    count_parameters,
    inject,
    lmoe_layers,
    record_routing,
    remove,
)
from lmoe.config import AUX_COEFS
from lmoe.inject import shared_modules
from lmoe.models import enable_activation_checkpointing
from lmoe.routing import Routing
from lmoe.routing_record import active_expert_counts, routing_counts

FAMILIES = ["llama", "qwen2", "mistral", "gpt2"]
TARGETS = {
    "llama": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "gpt2": ["c_attn", "c_fc"],
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("router", ["softmax", "topk", "dynamic"])
def test_fresh_injection_gives_base_logits_exactly(family, router, input_ids):
    model = tiny_model(family)
    ref = model(input_ids).logits
    inject(model, LMoEConfig(router=router, target_modules=TARGETS[family]))
    assert len(list(lmoe_layers(model))) == 4  # two targets in each of two blocks
    # the layer runs the base product itself on (tokens, d_in), the base ran on (batch, seq, d_in):
    # another GEMM grouping, so float32 tolerance; the added delta is exactly zero
    # (test_layer, same computation)
    torch.testing.assert_close(model(input_ids).logits, ref)


def test_only_adapter_parameters_train_and_counts_add_up(llama):
    total_before = sum(p.numel() for p in llama.parameters())
    cfg = LMoEConfig(num_experts=3, rank=2, target_modules=["q_proj", "down_proj"])
    inject(llama, cfg)
    expected = 0
    for _, layer in lmoe_layers(llama):
        d_in, d_out = layer.in_features, layer.out_features
        expected += 3 * 2 * (d_in + d_out) + 3 * d_in  # experts + router (no bias)
    trainable, total = count_parameters(llama)
    assert trainable == expected and total == total_before + expected
    names = {n for n, p in llama.named_parameters() if p.requires_grad}
    assert names and all(("lora_" in n or ".router." in n) for n in names)


def test_target_selection_by_regex_and_all_linear(llama):
    inject(llama, LMoEConfig(target_modules=r"model\.layers\.0\..*proj"))
    assert {n for n, _ in lmoe_layers(llama)} == {
        f"model.layers.0.{m}"
        for m in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        )
    }
    remove(llama)
    inject(llama, LMoEConfig(target_modules="all-linear"))
    names = [n for n, _ in lmoe_layers(llama)]
    assert len(names) == 14 and "lm_head" not in names


def test_target_matching_nothing_names_the_available_layers(llama):
    with pytest.raises(ValueError, match=r"target_modules.*matches no linear layer.*q_proj"):
        inject(llama, LMoEConfig(target_modules=["query"]))


def test_double_injection_is_refused(llama):
    inject(llama, LMoEConfig())
    with pytest.raises(ValueError, match="remove"):
        inject(llama, LMoEConfig())


def test_remove_restores_the_original_model(llama, input_ids):
    originals = {n: m for n, m in llama.named_modules() if n.endswith(("q_proj", "v_proj"))}
    grads = {n: p.requires_grad for n, p in llama.named_parameters()}
    ref = llama(input_ids).logits
    inject(llama, LMoEConfig())
    with torch.no_grad():
        for _, layer in lmoe_layers(llama):
            layer.lora_B.normal_()
    assert not torch.allclose(llama(input_ids).logits, ref)
    remove(llama)
    assert not list(lmoe_layers(llama)) and not hasattr(llama, "lmoe_config")
    assert all(llama.get_submodule(n) is m for n, m in originals.items())
    assert {n: p.requires_grad for n, p in llama.named_parameters()} == grads
    assert torch.equal(llama(input_ids).logits, ref)


def test_aux_loss_is_the_weighted_layer_mean_in_training_only(llama, input_ids):
    cfg = LMoEConfig(router="topk", load_balance_coef=0.3, z_loss_coef=0.02)
    inject(llama, cfg)
    llama.eval()
    llama(input_ids)
    assert aux_loss(llama).item() == 0.0
    llama.train()
    with record_routing(llama) as rec:
        llama(input_ids)
    # independent reference from the recorded weights and recomputed logits
    layers = dict(lmoe_layers(llama))
    lb, z = [], []
    for name, layer in layers.items():
        g = rec[name]
        x = hidden_inputs(llama, name, input_ids)
        u = x @ layer.router.effective_weight().T.double()
        f = torch.zeros(4, dtype=torch.float64)
        for e in range(4):
            f[e] = (g[:, e] > 0).double().sum() / (g > 0).double().sum()
        lb.append(4 * (f * torch.softmax(u, -1).mean(0)).sum())
        z.append(torch.logsumexp(u, -1).square().mean())
    expected = 0.3 * torch.stack(lb).mean() + 0.02 * torch.stack(z).mean()
    torch.testing.assert_close(aux_loss(llama).double(), expected, rtol=1e-4, atol=1e-6)
    assert set(aux_losses(llama)) == {"load_balance", "z_loss"}


def hidden_inputs(model, name, input_ids):
    """The (tokens, d_in) input a layer saw, captured with a forward pre-hook (float64)."""
    seen = []
    handle = model.get_submodule(name).register_forward_pre_hook(
        lambda m, args: seen.append(args[0])
    )
    model(input_ids)
    handle.remove()
    return seen[0].reshape(-1, seen[0].shape[-1]).double()


def test_record_routing_gives_token_by_expert_weights(llama, input_ids):
    inject(llama, LMoEConfig(num_experts=5, router="dynamic", target_modules="all-linear"))
    with record_routing(llama) as rec:
        llama(input_ids)
        llama(input_ids[:1])
    assert len(rec) == 14
    for name in rec:
        g = rec[name]
        assert g.shape == (2 * 9 + 9, 5) and not g.requires_grad
        torch.testing.assert_close(g.sum(-1), torch.ones(27))
    assert all(layer.recorder is None for _, layer in lmoe_layers(llama))


def test_training_reduces_loss_and_changes_only_adapters():
    torch.manual_seed(0)
    # a large init range lets the frozen output head express confident predictions
    model = tiny_model("llama", initializer_range=0.5).train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    inject(
        model,
        LMoEConfig(num_experts=4, rank=4, target_modules="all-linear", load_balance_coef=0.01),
    )
    # a toy task: the next token is the current one plus one (mod vocab)
    x = torch.randint(0, VOCAB, (16, 1)) + torch.arange(12)
    data = x % VOCAB
    # one rate; the routers learn at 30x it (router_param_scale): at 1e-2 they
    # would thrash in this toy
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(200):
        out = model(data, labels=data)
        loss = out.loss + aux_loss(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < 0.5 * losses[0]
    for n, p in model.named_parameters():
        key = n.replace(".base.", ".")
        if key in frozen:
            assert torch.equal(p, frozen[key]), n
        else:
            assert "lora_" in n or ".router." in n


def test_shared_lambda_head_runs_once_per_distinct_input_with_identical_results(input_ids):
    def run(cache: bool):
        model = tiny_model("llama").train()
        inject(model, LMoEConfig(router="dynamic", lambda_hidden=8, target_modules="all-linear"))
        heads = {
            id(m): m for _, layer in lmoe_layers(model) for m in [layer.router.lambda_head]
        }.values()
        calls = []
        for head in heads:

            def counted(x, hidden, compute=head.from_hidden):
                calls.append(1)
                return compute(x, hidden)

            head.from_hidden = counted  # every computation of lambda goes through it
            if not cache:
                head.caching = False
        logits = model(input_ids).logits
        logits.square().sum().backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        return logits, grads, len(calls), heads

    logits, grads, calls, heads = run(cache=True)
    ref_logits, ref_grads, ref_calls, _ = run(cache=False)
    assert (
        ref_calls == 14 and calls == 8
    )  # per block: q/k/v share x, gate/up share x; o and down differ
    # uncached, the head's first linear joins the projection GEMM ([A; W_g; W1] instead of [A;
    # W_g]): the same maths grouped differently, equal to float32 rounding only
    torch.testing.assert_close(logits, ref_logits)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert all(head._last is None for head in heads)  # nothing is held after the forward


# ---------------------------------------------------------------- aux losses: padding and processes


def brute_force_aux(router, kind: str, x: torch.Tensor, k: int = 1) -> dict[str, torch.Tensor]:
    """One layer's aux losses over the tokens x (tokens, d_in), from their definitions in
    docs/design.md section 4."""
    routing = router.route(x)
    u, g = routing.logits, routing.weights
    E = u.shape[-1]
    dispatch = F.one_hot(g.argmax(-1), E) if kind == "softmax" else (g > 0)
    probs = torch.softmax(u, -1) if kind == "topk" else g
    f = [dispatch[:, i].sum() / dispatch.sum() for i in range(E)]
    out = {
        "load_balance": E * sum(f[i] * probs[:, i].mean() for i in range(E)),
        "z_loss": (torch.logsumexp(u, -1) ** 2).mean(),
    }
    if kind == "dynamic":  # lambda_k(u) = 1 - sum_{j<=k} (u_(j) - u_(k+1)), the gate detached
        top = u.detach().sort(-1, descending=True).values
        threshold = 1 - (top[:, :k] - top[:, k : k + 1]).sum(-1)
        out["sparsity"] = torch.clamp(threshold - routing.extras["lambda"][:, 0], min=0).mean()
    return out


def layer_mean(per_layer: list[dict]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([d[key] for d in per_layer]).mean() for key in per_layer[0]}


def layer_inputs(model, run) -> dict[str, list[torch.Tensor]]:
    """layer name -> the (tokens, d_in) inputs it saw during run(), graph kept."""
    seen = {name: [] for name, _ in lmoe_layers(model)}
    handles = [
        layer.register_forward_pre_hook(
            lambda m, args, name=name: seen[name].append(args[0].reshape(-1, args[0].shape[-1]))
        )
        for name, layer in lmoe_layers(model)
    ]
    run()
    for handle in handles:
        handle.remove()
    return seen


@pytest.mark.parametrize("router", ["softmax", "topk", "dynamic"])
def test_padding_is_left_out_of_aux_losses_and_routing_records(router):
    model = tiny_model("llama").double().train()
    inject(
        model,
        LMoEConfig(
            num_experts=4,
            router=router,
            target_modules="all-linear",
            load_balance_coef=1.0,
            z_loss_coef=1.0,
            sparsity_coef=1.0,
            sparsity_target=1,
            lambda_hidden=8,
        ),
    )
    gen = torch.Generator().manual_seed(3)
    examples = [torch.randint(0, VOCAB, (n,), generator=gen) for n in (7, 3, 5)]
    ids = torch.randint(0, VOCAB, (3, 7), generator=gen)  # right-padded with random tokens
    mask = torch.zeros(3, 7, dtype=torch.long)
    for row, ex in enumerate(examples):
        ids[row, : len(ex)], mask[row, : len(ex)] = ex, 1
    with torch.no_grad(), record_routing(model) as rec:
        model(ids, attention_mask=mask)
        got = aux_losses(model)
    # reference: the real tokens run alone, one example at a time, losses from the definitions
    with torch.no_grad():
        inputs = layer_inputs(model, lambda: [model(ex[None]) for ex in examples])
        layers = dict(lmoe_layers(model))
        expected = layer_mean(
            [
                brute_force_aux(layers[name].router, router, torch.cat(xs))
                for name, xs in inputs.items()
            ]
        )
        for name, xs in inputs.items():
            torch.testing.assert_close(rec[name], layers[name].router.route(torch.cat(xs)).weights)
        assert (
            got.keys()
            == expected.keys()
            == (
                {"load_balance", "z_loss", "sparsity"}
                if router == "dynamic"
                else {"load_balance", "z_loss"}
            )
        )
        for key in expected:
            torch.testing.assert_close(
                got[key], expected[key], rtol=1e-6, atol=1e-9, msg=key
            )  # float32 rotary
        model(ids)  # without the mask the padding counts: the test can tell
        assert not torch.allclose(aux_losses(model)["z_loss"], expected["z_loss"])
    assert (
        model.get_submodule("model.layers.0.mlp.up_proj").token_mask.value is None
    )  # not held after forward


class PerToken(nn.Module):
    """Two linear layers applied token by token: a batch's real tokens go through it as
    they would alone."""

    def __init__(self, d: int = 6) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x, attention_mask=None):
        return self.b(torch.tanh(self.a(x)))


def fake_collectives(monkeypatch, ranks: int) -> tuple[threading.local, list]:
    """torch.distributed as `ranks` threads see it: all_reduce sums the tensors of all threads."""
    local, calls, seen = threading.local(), [], [None] * ranks
    barrier = threading.Barrier(ranks, timeout=60)

    def all_reduce(t, *args, **kwargs):
        calls.append(local.rank)
        seen[local.rank] = t.clone()
        barrier.wait()
        t.copy_(sum(seen))
        barrier.wait()

    for name, value in [
        ("is_available", lambda: True),
        ("is_initialized", lambda: True),
        ("get_world_size", lambda *a: ranks),
        ("all_reduce", all_reduce),
    ]:
        monkeypatch.setattr(dist, name, value)
    return local, calls


@pytest.mark.parametrize("router", ["topk", "dynamic"])
def test_aux_losses_over_processes_equal_one_process_on_the_whole_batch(router, monkeypatch):
    torch.manual_seed(0)
    coefs = dict(
        load_balance_coef=0.7, z_loss_coef=0.2, sparsity_coef=0.5 if router == "dynamic" else 0.0
    )
    cfg = LMoEConfig(
        num_experts=4,
        rank=2,
        router=router,
        target_modules=["a", "b"],
        sparsity_target=1,
        lambda_hidden=5,
        **coefs,
    )
    model = inject(PerToken().double(), cfg).train()
    gen = torch.Generator().manual_seed(1)
    parts = []  # each process: 2 examples, right-padded with large garbage inputs
    for lengths in ([3, 5], [2, 2], [6, 1]):
        mask = (torch.arange(max(lengths) + 1) < torch.tensor(lengths)[:, None]).long()  # (2, T)
        x = torch.randn(*mask.shape, 6, generator=gen, dtype=torch.float64)
        parts.append((torch.where(mask[..., None].bool(), x, 20 * x), mask))
    params = lambda m: [p for p in m.parameters() if p.requires_grad]  # noqa: E731
    # reference: one process, the real tokens of all processes in one batch, losses
    # from their definitions
    whole = copy.deepcopy(model)
    real = torch.cat([x[mask.bool()] for x, mask in parts])[None]  # (1, tokens, d)
    inputs = layer_inputs(whole, lambda: whole(real))
    expected = layer_mean(
        [
            brute_force_aux(layer.router, router, inputs[name][0])
            for name, layer in lmoe_layers(whole)
        ]
    )
    sum(getattr(cfg, AUX_COEFS[key]) * value for key, value in expected.items()).backward()

    ranks = len(parts)
    local, calls = fake_collectives(monkeypatch, ranks)
    replicas, results = [copy.deepcopy(model) for _ in parts], [None] * ranks

    def process(rank):
        try:
            local.rank = rank
            replicas[rank](*parts[rank][:1], attention_mask=parts[rank][1])
            terms = aux_losses(replicas[rank])
            aux_loss(replicas[rank]).backward()  # a second aux_losses: no second all-reduce
            results[rank] = terms
        except BaseException as error:  # noqa: BLE001 - re-raised in the main thread
            results[rank] = error

    threads = [threading.Thread(target=process, args=(rank,)) for rank in range(ranks)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for result in results:
        if isinstance(result, BaseException):
            raise result
    assert sorted(calls) == list(range(ranks))  # one all-reduce per process for all layers
    for key in expected:  # the logged value: the average over processes
        torch.testing.assert_close(
            sum(r[key] for r in results) / ranks, expected[key].detach(), msg=key
        )
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for name, (p, *copies) in zip(
        names, zip(params(whole), *map(params, replicas), strict=True), strict=True
    ):
        if p.grad is None:  # the experts: aux losses do not reach them
            assert "lora_" in name and all(c.grad is None for c in copies), name
        else:  # DDP averages the processes' gradients
            torch.testing.assert_close(sum(c.grad for c in copies) / ranks, p.grad, msg=name)
    routers = [layer.router for _, layer in lmoe_layers(whole)]
    assert all(
        r.weight.grad is not None for r in routers
    )  # the gates (and the dynamic lambda head) learn
    assert router == "topk" or routers[0].lambda_head.net[0].weight.grad is not None
    # each process on its own tokens, averaged, is not the whole batch's balance
    # loss: the test can tell
    naive = [
        layer_mean(
            [
                brute_force_aux(layer.router, router, xs[0])
                for xs, (_, layer) in zip(
                    layer_inputs(
                        whole, lambda x=x, mask=mask: whole(x[mask.bool()][None])
                    ).values(),
                    lmoe_layers(whole),
                    strict=True,
                )
            ]
        )
        for x, mask in parts
    ]
    assert abs(sum(n["load_balance"] for n in naive) / ranks - expected["load_balance"]) > 1e-3


@pytest.mark.parametrize("router", ["softmax", "topk", "dynamic"])
def test_gradient_checkpointing_gives_the_same_losses_and_gradients(router):
    """Checkpointed blocks re-run their forward in backward; the routers' losses (padding masked)
    and the shared lambda head's reuse must make that re-run save what the first run saved,
    and change nothing."""
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0

    def run(checkpointing: bool):
        model = tiny_model("llama").train()
        inject(
            model,
            LMoEConfig(
                num_experts=3,
                rank=2,
                router=router,
                target_modules="all-linear",
                load_balance_coef=0.1,
                z_loss_coef=0.01,
                sparsity_coef=0.1,
                lambda_hidden=8,
            ),
        )
        for _, layer in lmoe_layers(model):
            nn.init.normal_(layer.lora_B, std=0.1)  # B = 0 would hide a wrong gradient of A or g
        if checkpointing:
            enable_activation_checkpointing(model)
        out = model(input_ids=ids, attention_mask=mask, labels=ids)
        loss = out.loss + aux_loss(model)
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    loss, grads = run(checkpointing=False)
    loss_ckpt, grads_ckpt = run(checkpointing=True)
    torch.testing.assert_close(loss_ckpt, loss)
    assert grads.keys() == grads_ckpt.keys()
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-5, atol=1e-6, msg=name)


def set_lambda_bias(model, value: float) -> None:
    """The first layer's lambda head's output bias at value (in use; stored / its scale)."""
    out = next(iter(lmoe_layers(model)))[1].router.lambda_head.net[2]
    out.init_effective(bias=torch.full_like(out.bias, value))


@pytest.mark.parametrize("router", ["topk", "dynamic"])
def test_active_expert_counts_count_the_real_tokens_of_every_layer(router):
    model = tiny_model("llama").train()
    inject(
        model,
        LMoEConfig(
            num_experts=4,
            rank=2,
            router=router,
            top_k=2,
            target_modules="all-linear",
            lambda_hidden=8,
        ),
    )
    if router == "dynamic":  # lambda near 1: sparse, a different number of experts per token
        set_lambda_bias(model, 3.0)
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0
    with record_routing(model) as rec:
        model(input_ids=ids, attention_mask=mask)
    used, pairs = active_expert_counts(model).tolist()
    layers = len(list(lmoe_layers(model)))
    assert pairs == layers * int(mask.sum())  # padding left out
    if router == "topk":
        assert used == 2 * pairs
    else:
        assert used == sum(int((rec[name] > 0).sum()) for name in rec)
        assert pairs < used < 4 * pairs


def test_routing_counts_sum_entropy_and_confident_tokens_over_real_tokens_and_layers():
    model = tiny_model("llama").train()
    inject(
        model,
        LMoEConfig(
            num_experts=4, rank=2, router="dynamic", target_modules="all-linear", lambda_hidden=8
        ),
    )
    set_lambda_bias(model, 3.0)  # sparse: some 1-hot
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    with record_routing(model) as rec:
        model(input_ids=ids, attention_mask=mask)
    g = torch.cat(
        [rec[name] for name in rec]
    ).double()  # (real tokens x layers, E), padding left out
    entropy = -(g * torch.where(g > 0, g.log(), 0)).sum(-1) / math.log(4)
    top = g.max(-1).values
    expected = torch.tensor(
        [
            (g > 0).sum().item(),
            entropy.sum().item(),
            (top > 0.5).sum().item(),
            (1 / (g**2).sum(-1)).sum().item(),  # ESS of weights that sum to 1
            top.sum().item(),
            len(g),
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(routing_counts(model).double(), expected, rtol=1e-5, atol=1e-4)
    assert 0 < expected[2] < expected[-1]  # some tokens confident, some not
    assert expected[-1] < expected[3] < expected[0]  # some spread over experts, less than counted
    torch.testing.assert_close(active_expert_counts(model), routing_counts(model)[[0, -1]])


def test_routing_counts_leave_padding_out_of_the_collapse_statistics():
    model = tiny_model("llama").train()
    inject(model, LMoEConfig(num_experts=4, rank=2, target_modules="all-linear"))
    layers = [layer for _, layer in lmoe_layers(model)]
    for layer in layers:
        layer.last_routing = None
    # one layer's last forward: a one-hot token, a token on two experts, and a uniform padding token
    g = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.5, 0.0, 0.5, 0.0], [0.25, 0.25, 0.25, 0.25]])
    layers[0].last_routing = (Routing(weights=g, logits=g, probs=g), torch.tensor([1, 1, 0]) > 0)
    active, entropy, confident, ess, top, pairs = routing_counts(model).tolist()
    # by hand, over the two real tokens: ESS 1 + 2, top share 1 + 0.5, entropy 0 + log 2 / log 4
    assert (active, confident, pairs) == (3, 1, 2)
    assert (ess, top) == pytest.approx((3.0, 1.5)) and entropy == pytest.approx(0.5)


def test_shared_modules_are_the_lambda_heads_one_per_input_width():
    model = inject(
        tiny_model("llama"),
        LMoEConfig(router="dynamic", target_modules="all-linear", lambda_hidden=8),
    )
    heads = {
        id(layer.router.lambda_head): layer.router.lambda_head for _, layer in lmoe_layers(model)
    }
    assert len(heads) == 2  # hidden size 32 (q/k/v/o, gate/up) and intermediate 48 (down_proj)
    assert {id(m) for m in shared_modules(model)} == set(heads)
    assert shared_modules(inject(tiny_model("llama"), LMoEConfig(router="softmax"))) == []


def test_a_training_forward_drops_the_last_ones_routing_before_it_starts(input_ids):
    model = inject(
        tiny_model("llama"), LMoEConfig(router="topk", target_modules="all-linear")
    ).train()
    layers = [layer for _, layer in lmoe_layers(model)]
    held_at_start = []
    layers[0].register_forward_pre_hook(
        lambda *_: held_at_start.append([layer.last_routing for layer in layers])
    )
    model(input_ids)
    model(input_ids)
    assert all(
        r is None for r in held_at_start[1]
    )  # the first forward's routing was gone before the second ran
    assert all(
        layer.last_routing is not None for layer in layers
    )  # the second's is kept for aux_loss
    model.eval()(input_ids)
    assert all(
        layer.last_routing is not None for layer in layers
    )  # evaluation leaves training's alone


def test_a_trained_model_deep_copies_and_pickles_and_the_copy_computes_the_same(input_ids):
    model = inject(
        tiny_model("llama"),
        LMoEConfig(router="dynamic", target_modules="all-linear", lambda_hidden=8),
    ).train()
    (model(input_ids=input_ids, labels=input_ids).loss + aux_loss(model)).backward()
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert all(layer.last_routing is None for _, layer in lmoe_layers(clone))
        torch.testing.assert_close(clone.eval()(input_ids).logits, model.eval()(input_ids).logits)
    assert all(
        layer.last_routing is not None for _, layer in lmoe_layers(model)
    )  # the original keeps its own
