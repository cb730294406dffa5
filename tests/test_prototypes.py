"""The router started from the experts (lmoe.prototypes) against float64 SVDs and hand-built Arrow scores."""
import pytest
import torch

from conftest import VOCAB, tiny_model
from lmoe import LMoEConfig, inject, lmoe_layers, record_routing
from lmoe.prototypes import init_router_from_experts, mean_layer_inputs, top_right_singular_vectors


def random_experts(E=3, r=4, d_in=12, d_out=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(E, r, d_in, generator=g), torch.randn(E, d_out, r, generator=g)


def test_top_right_singular_vector_matches_a_full_float64_svd():
    A, B = random_experts()
    v = top_right_singular_vectors(A, B)
    for i in range(A.shape[0]):
        _, _, Vh = torch.linalg.svd(B[i].double() @ A[i].double())
        assert abs(float(v[i] @ Vh[0])) == pytest.approx(1.0, abs=1e-9)  # the same direction, up to its sign
        assert float(v[i].norm()) == pytest.approx(1.0, abs=1e-9)


def test_untrained_expert_gets_a_zero_row():
    A, B = random_experts()
    B[1] = 0
    v = top_right_singular_vectors(A, B)
    assert torch.equal(v[1], torch.zeros_like(v[1]))
    assert float(v[0].norm()) == pytest.approx(1.0)


def mixture(seed=0):
    model = inject(tiny_model("llama"), LMoEConfig(num_experts=3, rank=2, target_modules=["q_proj", "v_proj"],
                                                   composition="outputs"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lmoe_layers(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g))
    return model


def batches():
    ids = torch.randint(0, VOCAB, (3, 7), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0  # padding must not enter the mean
    return [{"input_ids": ids, "attention_mask": mask}]


def test_mean_layer_inputs_leave_padding_out():
    model = mixture()
    means = mean_layer_inputs(model, batches())
    name, layer = next(iter(lmoe_layers(model)))
    seen = []
    handle = layer.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    b = batches()[0]
    with torch.no_grad():
        model(**b)
    handle.remove()
    x = seen[0].reshape(3, 7, -1)[b["attention_mask"].bool()]  # (real tokens, d_in)
    torch.testing.assert_close(means[name], x.double().mean(0))


def test_router_scores_are_arrows_where_the_mean_sets_the_sign():
    """Each router row is sign(<v, m>) v: its logit equals Arrow's |<v, x>| on every token whose projection has
    the mean's sign, and the routing is softmax of those logits."""
    model = mixture()
    init_router_from_experts(model, batches())
    means = mean_layer_inputs(model, batches())
    name, layer = next(iter(lmoe_layers(model)))
    v = top_right_singular_vectors(layer.lora_A, layer.lora_B)
    sign = torch.sign(v @ means[name])
    torch.testing.assert_close(layer.router.weight.double(), sign[:, None] * v, rtol=0, atol=1e-6)
    inputs = []
    handle = layer.register_forward_pre_hook(lambda _m, args: inputs.append(args[0].detach()))
    b = batches()[0]
    with torch.no_grad(), record_routing(model) as rec:
        model(**b)
    handle.remove()
    x = inputs[0].reshape(3, 7, -1)[b["attention_mask"].bool()].double()  # (tokens, d_in)
    proj = x @ v.T  # (tokens, E)
    arrow = proj.abs()
    agrees = torch.sign(proj) == sign  # tokens where the linear router sees Arrow's score
    logits = proj * sign
    torch.testing.assert_close(logits[agrees], arrow[agrees])
    torch.testing.assert_close(rec[name].double(), torch.softmax(logits, -1), rtol=0, atol=1e-5)
