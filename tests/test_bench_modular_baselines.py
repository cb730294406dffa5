"""bench/modular_baselines.py: PEFT's Arrow and X-LoRA over the same adapter files as
lmoe.modular.compose (tiny Llama)."""

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB, tiny_model
from peft import PeftModel
from safetensors.torch import load_file, save_file

from bench.modular_baselines import (
    NoCacheLM,
    arrow_model,
    record_arrow_routing,
    save_random_lora,
    xlora_model,
)
from bench.modular_parts import fit  # noqa: E402
from lmoe import LMoEConfig, compose, inject, lmoe_layers, merge, save_adapter  # noqa: E402
from lmoe.data.encoding import Example  # noqa: E402
from lmoe.evaluation.logprobs import continuation_logprobs  # noqa: E402

TARGETS = ["q_proj", "v_proj", "up_proj"]
# d_out 16 > E: each token's weights can be read back from its output
LAYER = "model.layers.1.self_attn.v_proj"
E = 3


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Three random rank-4 PEFT LoRAs; B's first column x4 gives B A a clear top singular value, so
    Arrow's 15 power-iteration steps converge far below the tolerances here."""
    root = tmp_path_factory.mktemp("arrow")
    dirs = []
    for i in range(E):
        d = save_random_lora(
            tiny_model("llama"), root / f"task{i}", rank=4, target_modules=TARGETS, seed=10 + i
        )
        weights = load_file(d / "adapter_model.safetensors")
        for key, w in weights.items():
            if "lora_B" in key:
                w[:, 0] *= 4
        save_file(weights, d / "adapter_model.safetensors")
        dirs.append(d)
    return dirs


@pytest.fixture
def ids():
    return torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def adapter_delta(directory, layer):
    """(s B A) of one layer of a saved adapter, float64, straight from its files."""
    weights = load_file(directory / "adapter_model.safetensors")
    config = json.loads((directory / "adapter_config.json").read_text())
    A = weights[f"base_model.model.{layer}.lora_A.weight"].double()
    B = weights[f"base_model.model.{layer}.lora_B.weight"].double()
    return config["lora_alpha"] / config["r"] * B @ A  # (d_out, d_in)


def test_routing_off_both_give_the_base_and_they_hold_the_same_experts(adapters, ids):
    base = logits(tiny_model("llama"), ids)
    arrow = arrow_model(tiny_model("llama"), adapters)
    with arrow.disable_adapter():
        torch.testing.assert_close(logits(arrow, ids), base)
    assert not torch.allclose(
        logits(arrow, ids), base, atol=1e-2
    )  # the adapters do change the outputs
    composed = compose(tiny_model("llama"), adapters)
    layers = dict(lmoe_layers(composed))
    for name, layer in layers.items():
        peft_layer = arrow.base_model.model.get_submodule(name)
        for e in range(E):
            task = f"task_{e}"
            torch.testing.assert_close(layer.lora_A[e], peft_layer.lora_A[task].weight)
            torch.testing.assert_close(
                layer.scaling * layer.lora_B[e],
                peft_layer.scaling[task] * peft_layer.lora_B[task].weight,
            )
    assert len(layers) == 2 * len(TARGETS)
    merge(composed, torch.zeros(E))  # routing weight 0 for every expert: W0 + s Delta W(0) = W0
    torch.testing.assert_close(logits(composed, ids), base)


def test_one_adapter_arrow_equals_lmoe_equals_peft_lora(adapters, ids):
    lora = logits(PeftModel.from_pretrained(tiny_model("llama"), str(adapters[0])), ids)
    assert not torch.allclose(lora, logits(tiny_model("llama"), ids), atol=1e-2)
    torch.testing.assert_close(
        logits(arrow_model(tiny_model("llama"), adapters[:1], top_k=1), ids), lora
    )
    torch.testing.assert_close(logits(compose(tiny_model("llama"), adapters[:1]), ids), lora)


def test_arrow_at_infinite_temperature_is_lmoe_zero_router_average(adapters, ids):
    arrow = arrow_model(tiny_model("llama"), adapters, top_k=E, temperature=1e9)
    with record_arrow_routing(arrow) as rec:
        out = logits(arrow, ids)
    torch.testing.assert_close(rec[LAYER], torch.full((ids.numel(), E), 1 / E))
    torch.testing.assert_close(out, logits(compose(tiny_model("llama"), adapters), ids))


def test_arrow_routing_matches_a_float64_recomputation(adapters, ids):
    top_k, temperature = 2, 0.7
    model = arrow_model(tiny_model("llama"), adapters, top_k=top_k, temperature=temperature)
    seen = {}
    arrow = model.base_model.model.get_submodule(LAYER).lora_arrow["arrow_router"]
    handle = arrow.register_forward_hook(lambda _m, args, out: seen.update(x=args[0], delta=out))
    with record_arrow_routing(model) as rec:
        logits(model, ids)
    handle.remove()
    x = seen["x"].reshape(-1, seen["x"].shape[-1]).double()  # (tokens, d_in)
    deltas = torch.stack([adapter_delta(d, LAYER) for d in adapters])  # (E, d_out, d_in)
    _, S, Vh = torch.linalg.svd(deltas)
    assert bool((S[:, 1] < 0.5 * S[:, 0]).all())  # the premise: a clear top singular direction
    score = (x @ Vh[:, 0].T).abs()  # (tokens, E): |<v_i, x>|, sign-free
    keep = score >= score.topk(top_k, dim=-1).values[:, -1:]
    expected = torch.softmax((score / temperature).masked_fill(~keep, float("-inf")), dim=-1)
    # the weights PEFT used, read back from its output: delta = sum_i g_i (s_i B_i A_i x),
    # least squares per token
    outputs = torch.einsum("eoi,ti->toe", deltas, x)  # (tokens, d_out, E)
    used = torch.linalg.lstsq(
        outputs, seen["delta"].reshape(len(x), -1, 1).double()
    ).solution.squeeze(-1)
    torch.testing.assert_close(used, expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(rec[LAYER].double(), expected, atol=1e-5, rtol=0)
    assert bool(((expected > 0).sum(-1) == top_k).all())


def requests():
    g = torch.Generator().manual_seed(3)
    draw = lambda n: torch.randint(1, VOCAB, (n,), generator=g).tolist()  # noqa: E731
    return [(draw(n), [draw(k) for k in (1, 3, 2)]) for n in (4, 7, 5)]


def whole_sequence_logprobs(model, reqs):
    """log p(continuation | prefix) from one cache-free forward of each prefix + continuation."""
    scores = []
    for prefix, conts in reqs:
        row = []
        for cont in conts:
            ids = torch.tensor([prefix + cont])
            logp = F.log_softmax(logits(model, ids)[0, :-1].double(), dim=-1)
            row.append(sum(logp[len(prefix) - 1 + j, t].item() for j, t in enumerate(cont)))
        scores.append(row)
    return torch.tensor(scores, dtype=torch.float64)


def test_arrow_scores_and_generates_with_the_kv_cache(adapters):
    model, reqs = arrow_model(tiny_model("llama"), adapters), requests()
    assert model.config.use_cache  # lmoe.evaluation.scoring takes the shared-cache path for it
    torch.testing.assert_close(
        torch.tensor(continuation_logprobs(model, reqs, 0, progress=False)).double(),
        whole_sequence_logprobs(model, reqs),
        atol=1e-4,
        rtol=0,
    )
    # greedy generation with the cache: each new token is (up to float ties) the argmax of
    # a cache-free forward
    prompt = torch.tensor([reqs[1][0]])
    out = model.generate(
        input_ids=prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=6,
        do_sample=False,
        use_cache=True,
        pad_token_id=0,
    )
    full = logits(model, out)[
        0, prompt.shape[1] - 1 : -1
    ]  # (new tokens, vocab); fewer than 6 after an end token
    assert out.shape[1] > prompt.shape[1]
    assert bool(
        (
            full.gather(-1, out[0, prompt.shape[1] :, None]).squeeze(-1)
            >= full.max(-1).values - 1e-4
        ).all()
    )


def test_xlora_refuses_a_cache_and_is_scored_whole(adapters):
    model, reqs = xlora_model(tiny_model("llama"), adapters), requests()
    assert isinstance(model, NoCacheLM) and not hasattr(model, "config")
    with pytest.raises(ValueError, match="KV cache"):
        model(input_ids=torch.tensor([[1, 2]]), use_cache=True)
    torch.testing.assert_close(
        torch.tensor(continuation_logprobs(model, reqs, 0, progress=False)).double(),
        whole_sequence_logprobs(model.peft, reqs),
        atol=1e-4,
        rtol=0,
    )


def test_xlora_training_changes_only_its_classifier(adapters):
    model = xlora_model(tiny_model("llama"), adapters)
    g = torch.Generator().manual_seed(2)
    examples = [
        Example(ids, [-100] * 3 + ids[3:])
        for ids in (torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in (9, 6, 12, 7))
    ]
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    loss = fit(
        model, examples, steps=2, batch_size=2, lr=1e-2, seed=0, pad_id=0
    )  # the study's one loop
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert loss > 0
    assert trainable and all("internal_xlora_classifier" in name for name in trainable)
    assert changed == trainable  # not the LoRA experts, not the base
    assert not model.training


def test_bad_libraries_get_one_clear_line(adapters, tmp_path):
    with pytest.raises(ValueError, match="top_k=4 must be between 1 and the number of adapters"):
        arrow_model(tiny_model("llama"), adapters, top_k=4)
    other = save_random_lora(
        tiny_model("llama"), tmp_path / "r2", rank=2, target_modules=TARGETS, seed=0
    )
    with pytest.raises(ValueError, match="ranks \\[2, 4\\]"):
        arrow_model(tiny_model("llama"), [*adapters, other], top_k=1)
    fewer = save_random_lora(
        tiny_model("llama"), tmp_path / "q", rank=4, target_modules=["q_proj"], seed=0
    )
    with pytest.raises(ValueError, match="same target modules"):
        xlora_model(tiny_model("llama"), [adapters[0], fewer])
    with pytest.raises(ValueError, match="No adapter directories"):
        arrow_model(tiny_model("llama"), [])
    mixture = save_adapter(
        inject(tiny_model("llama"), LMoEConfig(num_experts=1, rank=4)), tmp_path / "lmoe"
    )
    with pytest.raises(ValueError, match="is an lmoe adapter.*export_peft"):
        xlora_model(tiny_model("llama"), [adapters[0], mixture])
