"""Gradient clipping counts the routers' gradients as gradients of the weights in use: a router
stored at scale c (routers.ScaledLinear) clips exactly as the same router stored at scale 1 does."""

import torch
from accelerate import Accelerator
from conftest import VOCAB, tiny_model

from lmoe import LMoEConfig, inject, lmoe_layers
from lmoe.routers import ScaledLinear
from lmoe.training.distributed import clip_grad_norm


def injected(scale: float, router: str) -> torch.nn.Module:
    """The tiny llama with a mixture whose experts' B are random (so the routers get a gradient)."""
    model = tiny_model("llama", seed=0)
    torch.manual_seed(1)
    inject(
        model,
        LMoEConfig(
            num_experts=3,
            rank=2,
            router=router,
            router_param_scale=scale,
            target_modules=["q_proj", "v_proj"],
            lambda_hidden=8,
        ),
    )
    torch.manual_seed(2)
    for _, layer in lmoe_layers(model):
        torch.nn.init.normal_(layer.lora_B, std=0.5)
    return model


def gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Each trainable parameter's gradient as one of the weight in use (routers': divided by c)."""
    routers = [(name, m) for name, m in model.named_modules() if isinstance(m, ScaledLinear)]
    scales = {
        f"{name}.{p}": m.scale for name, m in routers for p, _ in m.named_parameters(recurse=False)
    }
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return {n: grad / scales.get(n, 1.0) for n, grad in grads.items()}


def test_clipping_is_the_same_at_any_router_scale():
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    accelerator = Accelerator(cpu=True)
    for router in ("softmax", "dynamic"):
        results = []
        for scale in (30.0, 1.0):
            model = injected(scale, router).train()
            model(input_ids=ids, labels=ids).loss.backward()
            norm = clip_grad_norm(accelerator, model, max_norm=1e-3)  # well below the norm: clips
            results.append((norm, gradients(model)))
        (norm30, grads30), (norm1, grads1) = results
        assert norm1 > 1e-3 and abs(norm30 - norm1) <= 1e-5 * norm1, (router, norm30, norm1)
        assert grads30.keys() == grads1.keys() and any("router" in n for n in grads1)
        for name in grads1:
            torch.testing.assert_close(grads30[name], grads1[name], rtol=1e-4, atol=1e-9, msg=name)
