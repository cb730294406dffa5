"""Optimizer parameter groups for a mixture: the routers at a rate of their own.

The routers learn faster than the experts without any group: their parameters are stored divided
by LMoEConfig.router_param_scale (30 by default; routers.ScaledLinear), which under Adam moves the
weights in use that many times as far per step. These groups multiply the routers' rate further
(router_lr_scale > 1) or, for an adapter at router_param_scale 1, give them their own rate. Any
training loop can use them: build the groups
(`torch.optim.AdamW(lmoe.param_groups(model, lr, router_lr_scale=2))`; `lmoe train` passes them to
`adamw`, torch's fused AdamW where the parameters allow) or split an optimizer that exists
(`scale_router_lr(optimizer, model, 2)`, as LMoETrainer does)."""

from __future__ import annotations

import torch
from torch import nn

from ..inject import lmoe_layers
from ..routers import ScaledLinear


def router_parameter_ids(model: nn.Module) -> set[int]:
    """ids of the routers' parameters (gates and LD-MoLE's shared lambda heads)."""
    module = getattr(model, "module", model)  # DDP / accelerate wrappers keep the model as .module
    return {id(p) for _, layer in lmoe_layers(module) for p in layer.router.parameters()}


def router_param_scale(model: nn.Module) -> float:
    """The factor the routers' parameters are stored divided by (LMoEConfig.router_param_scale);
    1 for a model without routers."""
    module = getattr(model, "module", model)
    scales = {
        m.scale
        for _, layer in lmoe_layers(module)
        for m in layer.router.modules()
        if isinstance(m, ScaledLinear)
    }
    if len(scales) > 1:
        raise ValueError(f"the routers are stored at several scales {sorted(scales)}; expected one")
    return scales.pop() if scales else 1.0


def param_groups(
    model: nn.Module, lr: float, router_lr_scale: float = 1.0, eps: float = 1e-8
) -> list[dict]:
    """The trainable parameters as optimizer groups: the experts at lr, the routers (gates and
    LD-MoLE's lambda heads, each once) at lr * router_lr_scale, on top of the factor their
    router_param_scale c gives them already (the module docstring). Empty groups are left out.

    The routers' group takes Adam's eps times c: their stored gradients are c times the gradients
    of the weights in use, so this is Adam with eps on the weights in use, and the step equals
    that of c = 1 with the routers at c * router_lr_scale * lr (tests/test_router_scale.py). A plain
    optimizer over model.parameters() acts with eps / c on them instead: the same up to where
    the routers' gradients are near eps, early in training (bench/RESULTS.md, "Routers at 30x")."""
    routers = router_parameter_ids(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if id(p) not in routers], "lr": lr, "eps": eps},
        {
            "params": [p for p in trainable if id(p) in routers],
            "lr": lr * router_lr_scale,
            "eps": eps * router_param_scale(model),
        },
    ]
    return [g for g in groups if g["params"]]


FUSED_DEVICES = ("cpu", "cuda")


def adamw(groups: list[dict], **kwargs) -> torch.optim.AdamW:
    """torch's AdamW over the groups, fused (one kernel per parameter group and step) where every
    parameter is a plain floating-point tensor on the CPU or a CUDA GPU: the same update as the
    per-tensor loop torch uses by default on the CPU, in one pass over memory instead of a dozen;
    it matters where the experts outnumber the base (bench/RESULTS.md, "Sparse routing", gives
    the AdamW step's time at E = 64)."""
    params = [p for group in groups for p in group["params"]]
    fused = (
        bool(params)
        and all(
            type(p) is nn.Parameter and p.is_floating_point() and p.device.type in FUSED_DEVICES
            for p in params
        )
        and len({p.device for p in params}) == 1
    )
    return torch.optim.AdamW(groups, fused=fused or None, **kwargs)


def scale_router_lr(
    optimizer: torch.optim.Optimizer, model: nn.Module, router_lr_scale: float
) -> None:
    """Move the routers' parameters of every group of a fresh optimizer into a copy of that group
    (same weight decay, betas, ...) whose lr is router_lr_scale times the group's. Before
    the first step only."""
    if router_lr_scale == 1:
        return
    routers = router_parameter_ids(model)
    for group in list(optimizer.param_groups):
        moved = [p for p in group["params"] if id(p) in routers]
        if moved:
            group["params"] = [p for p in group["params"] if id(p) not in routers]
            optimizer.add_param_group(
                {
                    **{k: v for k, v in group.items() if k != "params"},
                    "params": moved,
                    "lr": group["lr"] * router_lr_scale,
                }
            )
    optimizer.param_groups[:] = [g for g in optimizer.param_groups if g["params"]]
