"""merge/unmerge: the merged model equals the unmerged one with its routers forced to
the same routing."""

import pytest
import torch
from conftest import tiny_model

from lmoe import LMoEConfig, inject, lmoe_layers, mean_routing, merge, record_routing, unmerge
from lmoe.routing import Routing

E = 3
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"]}


def trained_like(family: str, composition: str) -> torch.nn.Module:
    """A float64 tiny model with lmoe layers whose experts are all non-zero (as after training)."""
    model = tiny_model(family).double()
    inject(
        model,
        LMoEConfig(num_experts=E, rank=2, composition=composition, target_modules=TARGETS[family]),
    )
    gen = torch.Generator().manual_seed(2)
    for _, layer in lmoe_layers(model):
        router = (layer.router.weight, layer.router.scale)  # stored divided by its scale
        for p, scale in ((layer.lora_A, 1), (layer.lora_B, 1), router):
            p.data.copy_(0.3 / scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def force_routing(model, routing: dict) -> None:
    """Make every router return the fixed vector routing[name] for every token."""
    for name, layer in lmoe_layers(model):
        g = routing[name]

        def route(x, wx=None, *projected, g=g):
            w = g.to(x.dtype).expand(x.shape[0], -1)
            return Routing(weights=w, logits=w, probs=w)

        layer.router.route = route


def per_layer(model, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {
        name: torch.softmax(torch.randn(E, generator=gen, dtype=torch.float64), 0)
        for name, _ in lmoe_layers(model)
    }


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("composition", ["params", "outputs"])
def test_merged_logits_equal_forced_routing_logits(family, composition, input_ids):
    model = trained_like(family, composition)
    routed = model(input_ids).logits
    routing = per_layer(model, seed=3)
    forced = trained_like(family, composition)
    force_routing(forced, routing)
    want = forced(input_ids).logits
    assert not torch.allclose(want, routed)  # the fixed routing really changes the output
    merge(model, routing)
    torch.testing.assert_close(model(input_ids).logits, want, rtol=1e-10, atol=1e-10)
    unmerge(model)
    torch.testing.assert_close(model(input_ids).logits, routed, rtol=1e-10, atol=1e-10)


def test_one_vector_for_all_layers_and_a_sparse_one(input_ids):
    model = trained_like("llama", "params")
    g = torch.tensor(
        [0.0, 1.0, 0.0], dtype=torch.float64
    )  # one expert only, as top-1 routing gives
    forced = trained_like("llama", "params")
    force_routing(forced, {name: g for name, _ in lmoe_layers(forced)})
    merge(model, g)
    torch.testing.assert_close(
        model(input_ids).logits, forced(input_ids).logits, rtol=1e-10, atol=1e-10
    )


def test_mean_routing_is_a_skills_routing_on_the_simplex(input_ids):
    model = trained_like("llama", "outputs")
    with torch.no_grad(), record_routing(model) as rec:
        model(input_ids)
    routing = mean_routing(rec)
    assert set(routing) == {name for name, _ in lmoe_layers(model)}
    for g in routing.values():
        assert g.shape == (E,) and (g >= 0).all()
        torch.testing.assert_close(g.sum(), torch.tensor(1.0, dtype=g.dtype))
    forced = trained_like("llama", "outputs")
    force_routing(forced, routing)
    merge(model, routing)
    torch.testing.assert_close(
        model(input_ids).logits, forced(input_ids).logits, rtol=1e-10, atol=1e-10
    )


def test_merge_errors_say_what_to_do(llama):
    with pytest.raises(ValueError, match="lmoe.inject"):
        merge(llama, torch.ones(E) / E)
    model = trained_like("llama", "params")
    with pytest.raises(ValueError, match=r"shape \(4,\); expected \(3,\)"):
        merge(model, torch.ones(4) / 4)
    with pytest.raises(ValueError, match="No routing vector for layer"):
        merge(model, {"model.layers.0.self_attn.q_proj": torch.ones(E) / E})
    merge(model, torch.ones(E) / E)
    with pytest.raises(ValueError, match="unmerge"):
        merge(model, torch.ones(E) / E)
