"""A composed mixture's router started from its experts instead of zero: expert i's router row in
each layer is the top right singular vector v_i of that layer's update B_i A_i (Arrow's prototype),
so the mixture routes a token towards the adapters whose strongest input direction it lies along,
before any router training.

Arrow scores |<v_i, x>|; a linear router cannot take the absolute value, so each row's sign is fixed
once by the mean projection over some unlabelled calibration text: sign(mu_i) <v_i, x> equals
Arrow's score wherever the token's projection has the mean's sign (the mean dominates post-norm
transformer inputs).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from ..inject import CONFIG_ATTR, get_config, lmoe_layers
from ..layer import MoLoRALinear


def top_right_singular_vectors(A: Tensor, B: Tensor) -> Tensor:
    """Unit top right singular vector of each B_i A_i, from A (E, r, d_in) and B (E,
    d_out, r): (E, d_in).

    Through two thin QRs (B = Q_B R_B, A^T = Q_A R_A), so only an r x r SVD per expert; float64. An
    expert with B = 0 (untrained) gets a zero row.
    """
    A, B = A.double(), B.double()
    Q_A, R_A = torch.linalg.qr(A.transpose(1, 2))  # (E, d_in, r), (E, r, r)
    _, R_B = torch.linalg.qr(B)  # (E, r, r)
    _, S, Vh = torch.linalg.svd(
        R_B @ R_A.transpose(1, 2)
    )  # small core: B A = Q_B (R_B R_A^T) Q_A^T
    v = (Q_A @ Vh[:, 0, :, None]).squeeze(-1)  # (E, d_in)
    return torch.where(S[:, :1] > 0, v, torch.zeros_like(v))


@torch.no_grad()
def projection_moments(
    model: nn.Module, batches: Iterable[dict], directions: dict[str, Tensor]
) -> dict[str, tuple[Tensor, Tensor]]:
    """Per lmoe layer, the mean and standard deviation (E,) of <v_i, x> over the real tokens of
    batches (dicts of model inputs), for that layer's directions (E, d_in); float64."""
    layers = dict(lmoe_layers(model))
    sums = {name: torch.zeros(3, directions[name].shape[0], dtype=torch.float64) for name in layers}

    def hook(name: str, layer: MoLoRALinear):
        def record(_module, args):
            x, mask = args[0], layer.token_mask.value
            x = (
                x[mask.bool()]
                if mask is not None and mask.shape == x.shape[:-1]
                else x.reshape(-1, x.shape[-1])
            )
            p = x.double().cpu() @ directions[name].T  # (tokens, E)
            sums[name] += torch.stack([torch.full_like(p[0], p.shape[0]), p.sum(0), (p * p).sum(0)])

        return record

    handles = [layer.register_forward_pre_hook(hook(name, layer)) for name, layer in layers.items()]
    try:
        device = next(model.parameters()).device
        for batch in batches:
            model(**{k: v.to(device) for k, v in batch.items() if k != "labels"})
    finally:
        for handle in handles:
            handle.remove()
    if not all(float(total[0, 0]) > 1 for total in sums.values()):
        raise ValueError(
            "The router's calibration text reached no lmoe layer with two tokens or more: pass at "
            "least one batch of text (dicts with input_ids and attention_mask)."
        )
    moments = {}
    for name, (n, total, squares) in sums.items():
        mean = total / n
        moments[name] = mean, ((squares - n * mean * mean) / (n - 1)).clamp(min=0).sqrt()
    return moments


@torch.no_grad()
def init_router_from_experts(
    model: nn.Module, calibration: Iterable[dict], scale: float = 1.0
) -> None:
    """Start every layer's router at each expert's Arrow score, signed and standardised on
    unlabelled text: u_i(x) = scale * sign_i (<v_i, x> - mu_i) / sd_i, where v_i is the top right
    singular vector of B_i A_i, mu_i and sd_i the mean and standard deviation of <v_i, x> over the
    calibration batches' tokens, sign_i = sign(mu_i).

    Standardised because the raw scores are small (|<v_i, x>| about 0.03-0.12 on SmolLM2-135M),
    which softmax turns into uniform routing; centred because the mean projection is a per-expert
    constant, not a preference of the token. Adds a router bias where there was none (the mixture's
    config says so). Experts with B = 0 get a zero row."""
    directions = {
        name: top_right_singular_vectors(layer.lora_A, layer.lora_B)
        for name, layer in lmoe_layers(model)
    }
    moments = projection_moments(model, calibration, directions)
    for name, layer in lmoe_layers(model):
        mean, sd = moments[name]
        sign = torch.where(mean < 0, -1.0, 1.0).double()
        inverse = torch.where(sd > 0, 1.0 / sd.clamp(min=1e-30), torch.zeros_like(sd))
        router = layer.router
        if router.bias is None:
            router.bias = nn.Parameter(
                router.weight.new_zeros(router.out_features),
                requires_grad=router.weight.requires_grad,
            )
        router.init_effective(
            scale * (sign * inverse)[:, None] * directions[name], -scale * sign * inverse * mean
        )
    setattr(model, CONFIG_ATTR, dataclasses.replace(get_config(model), router_bias=True))
