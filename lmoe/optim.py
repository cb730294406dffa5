"""Optimizer parameter groups for a mixture: the routers learn at their own rate. Any training loop can use
them (`torch.optim.AdamW(lmoe.param_groups(model, lr, router_lr_scale=30))`); `lmoe train` does."""
from __future__ import annotations

from torch import nn

from .inject import lmoe_layers


def param_groups(model: nn.Module, lr: float, router_lr_scale: float = 1.0) -> list[dict]:
    """The trainable parameters as optimizer groups: the experts at lr, the routers (gates and LD-MoLE's
    lambda heads, each once) at lr * router_lr_scale. The experts start at B = 0, so the routers get no
    gradient at first and then one about E times smaller than a single LoRA's: at the experts' rate the
    routing barely moves from uniform (bench/RESULTS.md, routing study). Empty groups are left out."""
    module = getattr(model, "module", model)  # DDP / accelerate wrappers keep the model as .module
    routers = {id(p) for _, layer in lmoe_layers(module) for p in layer.router.parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if id(p) not in routers], "lr": lr},
              {"params": [p for p in trainable if id(p) in routers], "lr": lr * router_lr_scale}]
    return [g for g in groups if g["params"]]
