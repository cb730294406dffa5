"""inject / remove / aux_loss / record_routing on tiny transformers models of several families."""
import pytest
import torch
from torch import nn

from conftest import VOCAB, tiny_model
from lmoe import LMoEConfig, MoLoRALinear, aux_loss, aux_losses, count_parameters, inject, lmoe_layers, record_routing, remove

FAMILIES = ["llama", "qwen2", "mistral", "gpt2"]
TARGETS = {"llama": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"],
           "gpt2": ["c_attn", "c_fc"]}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("router", ["softmax", "topk", "dynamic"])
def test_fresh_injection_gives_base_logits_exactly(family, router, input_ids):
    model = tiny_model(family)
    ref = model(input_ids).logits
    inject(model, LMoEConfig(router=router, target_modules=TARGETS[family]))
    assert len(list(lmoe_layers(model))) == 4  # two targets in each of two blocks
    assert torch.equal(model(input_ids).logits, ref)


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
    assert {n for n, _ in lmoe_layers(llama)} == {f"model.layers.0.{m}" for m in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
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
        u = x @ layer.router.weight.T.double()
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
    handle = model.get_submodule(name).register_forward_pre_hook(lambda m, args: seen.append(args[0]))
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
    inject(model, LMoEConfig(num_experts=4, rank=4, target_modules="all-linear", load_balance_coef=0.01))
    # a toy task: the next token is the current one plus one (mod vocab)
    x = torch.randint(0, VOCAB, (16, 1)) + torch.arange(12)
    data = x % VOCAB
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for step in range(200):
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
        heads = {id(m): m for _, layer in lmoe_layers(model) for m in [layer.router.lambda_head]}.values()
        calls = []
        for head in heads:
            head.net.register_forward_hook(lambda *_: calls.append(1))
            if not cache:
                head.open_cache = head.close_cache
        logits = model(input_ids).logits
        logits.square().sum().backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        return logits, grads, len(calls), heads

    logits, grads, calls, heads = run(cache=True)
    ref_logits, ref_grads, ref_calls, _ = run(cache=False)
    assert ref_calls == 14 and calls == 8  # per block: q/k/v share x, gate/up share x; o and down differ
    assert torch.equal(logits, ref_logits)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert all(head._last is None for head in heads)  # nothing is held after the forward
