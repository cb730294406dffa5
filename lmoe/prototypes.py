"""A composed mixture's router started from its experts instead of zero: expert i's router row in each layer is
the top right singular vector v_i of that layer's update B_i A_i (Arrow's prototype), so the mixture routes a
token towards the adapters whose strongest input direction it lies along, before any router training.

Arrow scores |<v_i, x>|; a linear router cannot take the absolute value, so each row's sign is fixed once by
the layer's mean input m over some unlabelled calibration text: <sign(<v_i, m>) v_i, x> equals Arrow's score
wherever the token's projection has the mean's sign (the mean dominates post-norm transformer inputs).
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from .inject import lmoe_layers
from .layer import MoLoRALinear


def top_right_singular_vectors(A: Tensor, B: Tensor) -> Tensor:
    """Unit top right singular vector of each B_i A_i, from A (E, r, d_in) and B (E, d_out, r): (E, d_in).

    Through two thin QRs (B = Q_B R_B, A^T = Q_A R_A), so only an r x r SVD per expert; float64. An expert
    with B = 0 (untrained) gets a zero row.
    """
    A, B = A.double(), B.double()
    Q_A, R_A = torch.linalg.qr(A.transpose(1, 2))  # (E, d_in, r), (E, r, r)
    _, R_B = torch.linalg.qr(B)  # (E, r, r)
    _, S, Vh = torch.linalg.svd(R_B @ R_A.transpose(1, 2))  # small core: B A = Q_B (R_B R_A^T) Q_A^T
    v = (Q_A @ Vh[:, 0, :, None]).squeeze(-1)  # (E, d_in)
    return torch.where(S[:, :1] > 0, v, torch.zeros_like(v))


@torch.no_grad()
def mean_layer_inputs(model: nn.Module, batches: Iterable[dict]) -> dict[str, Tensor]:
    """Each lmoe layer's mean input (d_in,) over the real tokens of batches (dicts of model inputs)."""
    layers = dict(lmoe_layers(model))
    sums = {name: torch.zeros(layer.in_features, dtype=torch.float64) for name, layer in layers.items()}
    counts = dict.fromkeys(layers, 0)

    def hook(name: str, layer: MoLoRALinear):
        def record(_module, args):
            x, mask = args[0], layer.token_mask.value
            x = x[mask.bool()] if mask is not None and mask.shape == x.shape[:-1] else x.reshape(-1, x.shape[-1])
            sums[name] += x.double().sum(0).cpu()
            counts[name] += x.shape[0]
        return record

    handles = [layer.register_forward_pre_hook(hook(name, layer)) for name, layer in layers.items()]
    try:
        device = next(model.parameters()).device
        for batch in batches:
            model(**{k: v.to(device) for k, v in batch.items() if k != "labels"})
    finally:
        for handle in handles:
            handle.remove()
    if not any(counts.values()):
        raise ValueError("mean_layer_inputs got no tokens: pass at least one batch of calibration text.")
    return {name: sums[name] / max(counts[name], 1) for name in layers}


@torch.no_grad()
def init_router_from_experts(model: nn.Module, calibration: Iterable[dict], scale: float = 1.0) -> None:
    """Set every layer's router to scale * sign_i v_i (bias 0), v_i the top right singular vector of B_i A_i and
    sign_i = sign(<v_i, m>), m the layer's mean input over `calibration` (batches of unlabelled text)."""
    means = mean_layer_inputs(model, calibration)
    for name, layer in lmoe_layers(model):
        v = top_right_singular_vectors(layer.lora_A, layer.lora_B)  # (E, d_in) float64
        sign = torch.sign(v @ means[name])
        sign[sign == 0] = 1.0
        router = layer.router
        router.weight.copy_((scale * sign[:, None] * v).to(router.weight))
        if router.bias is not None:
            router.bias.zero_()
