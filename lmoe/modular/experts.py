"""A mixture's experts changed in place: experts added (router rows that move routing by at most
e^logit), removed, frozen (all of them: the routers alone train) or unfrozen.

Each layer stacks its experts in one Parameter (lora_A (E, r, d_in), lora_B (E, d_out, r)), so an
expert is a slice: adding or removing one rebuilds the Parameters (build the optimizer afterwards),
freezing some masks their slices of the gradient.
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

from ..inject import CONFIG_ATTR, get_config, lmoe_layers
from ..layer import MoLoRALinear, expert_bank_B

NEW_EXPERT_LOGIT = (
    -1e4
)  # exp() underflows to exactly 0 in float32; also below any sparsemax threshold


# ---------------------------------------------------------------- adding and removing experts


def add_experts(model: nn.Module, n: int = 1, logit: float = NEW_EXPERT_LOGIT) -> list[int]:
    """Append n experts to every layer (LoRA init: A random, B = 0); returns their indices.

    Each new router row starts at the mean of the existing rows, its bias `logit` below their mean
    bias (a bias is added if the router had none): a new expert's logit is the others' mean + logit,
    so its softmax weight is at most e^logit on every token, however large the trained logits are.
    The default keeps routing weights and outputs exactly as they were for softmax, topk and dynamic
    routers, but also gives the new experts exactly zero weight and gradient; a moderate logit (e.g.
    -4) changes routing by at most about e^logit and lets them learn from the first step (topk: once
    they reach the top k).
    """
    cfg = get_config(model)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(
            f"add_experts(n={n!r}): n is the number of experts to add, an integer >= 1."
        )
    new_cfg = dataclasses.replace(cfg, num_experts=cfg.num_experts + n, router_bias=True)
    keep = list(range(cfg.num_experts))
    check_unmerged(model)
    for _, layer in lmoe_layers(model):
        _rebuild(layer, keep, n, logit)
    setattr(model, CONFIG_ATTR, new_cfg)
    return list(range(cfg.num_experts, new_cfg.num_experts))


def remove_experts(model: nn.Module, which: Sequence[int]) -> None:
    """Drop experts `which` from every layer: their slices of A, B and the router."""
    cfg = get_config(model)
    check_experts(model, which)
    check_unmerged(model)
    keep = [i for i in range(cfg.num_experts) if i not in set(which)]
    if not keep:
        raise ValueError(
            f"remove_experts({list(which)}) would remove all {cfg.num_experts} experts; "
            "keep at least one."
        )
    new_cfg = dataclasses.replace(
        cfg, num_experts=len(keep)
    )  # validates top_k etc. before anything changes
    for _, layer in lmoe_layers(model):
        _rebuild(layer, keep, 0, NEW_EXPERT_LOGIT)
    setattr(model, CONFIG_ATTR, new_cfg)


def check_experts(model: nn.Module, which: Sequence[int]) -> None:
    """Expert indices of this mixture: distinct integers from 0 to E - 1."""
    E = get_config(model).num_experts
    bad = [i for i in which if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < E]
    if bad or len(set(which)) != len(which):
        raise ValueError(
            f"Expert indices {list(which)} are invalid: expected distinct integers from 0 to "
            f"{E - 1}."
        )


def check_unmerged(model: nn.Module) -> None:
    """Changing experts under lmoe.modular.merge would leave a stale update in the base weights."""
    if any(getattr(layer, "merged_routing", None) is not None for _, layer in lmoe_layers(model)):
        raise ValueError(
            "This model has a routing merged into its base weights; call lmoe.unmerge(model) first."
        )


@torch.no_grad()
def _rebuild(layer: MoLoRALinear, keep: list[int], n: int, logit: float) -> None:
    """Keep expert slices `keep` (in order) and append n new LoRA-initialised experts with
    router bias logit."""
    frozen = _frozen_mask(layer)[keep]
    idx = torch.tensor(keep, device=layer.lora_A.device)
    A = torch.empty(n, layer.rank, layer.in_features, dtype=layer.lora_A.dtype, device=idx.device)
    for a in A:
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as MoLoRALinear.reset_experts
    layer.lora_A = _grown(layer.lora_A, idx, A)
    B = torch.cat([layer.lora_B[idx], layer.lora_B.new_zeros(n, *layer.lora_B.shape[1:])])
    layer.lora_B = nn.Parameter(expert_bank_B(B), requires_grad=layer.lora_B.requires_grad)
    router = layer.router
    if router.bias is None and n:
        router.bias = nn.Parameter(
            router.weight.new_zeros(router.out_features), requires_grad=router.weight.requires_grad
        )
    # weight (E, d_in), bias (E,), both stored divided by the router's scale
    for name, p in list(router.named_parameters(recurse=False)):
        shift = logit / router.scale if name == "bias" else 0.0
        start = p[idx].mean(0, keepdim=True).expand(n, *p.shape[1:]) + shift
        setattr(router, name, _grown(p, idx, start))
    router.out_features = layer.num_experts = len(keep) + n
    _apply_freeze(layer, torch.cat([frozen, torch.zeros(n, dtype=torch.bool)]))


def _grown(p: nn.Parameter, idx: Tensor, new: Tensor) -> nn.Parameter:
    return nn.Parameter(torch.cat([p[idx], new]), requires_grad=p.requires_grad)


# ---------------------------------------------------------------- freezing experts

_PARTLY_FROZEN: weakref.WeakSet[MoLoRALinear] = weakref.WeakSet()
_STEP_HOOKS: list = []


def freeze_experts(model: nn.Module, which: Sequence[int] | None = None) -> None:
    """Stop training experts `which` (all if None) in every layer; freezing all
    trains the routers only.

    Fully frozen A/B get requires_grad=False. Partly frozen ones get a gradient hook zeroing the
    frozen slices, and every torch optimizer step restores those slices, so weight decay and
    momentum cannot move them.
    """
    _set_frozen(model, which, True)


def unfreeze_experts(model: nn.Module, which: Sequence[int] | None = None) -> None:
    """Train experts `which` (all if None) again."""
    _set_frozen(model, which, False)


def frozen_experts(model: nn.Module) -> list[int]:
    """Indices of the frozen experts (the same in every layer)."""
    mask = _frozen_mask(next(layer for _, layer in lmoe_layers(model)))
    return mask.nonzero().flatten().tolist()


def _set_frozen(model: nn.Module, which: Sequence[int] | None, frozen: bool) -> None:
    E = get_config(model).num_experts
    which = range(E) if which is None else which
    check_experts(model, list(which))
    for _, layer in lmoe_layers(model):
        mask = _frozen_mask(layer).clone()
        mask[list(which)] = frozen
        _apply_freeze(layer, mask)


def _frozen_mask(layer: MoLoRALinear) -> Tensor:
    return getattr(layer, "_lmoe_frozen_experts", torch.zeros(layer.num_experts, dtype=torch.bool))


def _apply_freeze(layer: MoLoRALinear, mask: Tensor) -> None:
    """Set requires_grad, gradient hooks and step restoring for a (E,) bool mask
    of frozen experts."""
    for handle in getattr(layer, "_lmoe_freeze_hooks", []):
        handle.remove()
    layer._lmoe_frozen_experts, layer._lmoe_freeze_hooks = mask, []
    all_frozen, partly = bool(mask.all()), bool(mask.any() and not mask.all())
    for p in (layer.lora_A, layer.lora_B):
        p.requires_grad_(not all_frozen)
        if partly:
            keep = (~mask).to(p.dtype).view(-1, 1, 1)  # (E, 1, 1)
            layer._lmoe_freeze_hooks.append(
                p.register_hook(lambda grad, keep=keep: grad * keep.to(grad.device))
            )
    if partly:
        _PARTLY_FROZEN.add(layer)
        _install_step_hooks()
    else:
        _PARTLY_FROZEN.discard(layer)


def _install_step_hooks() -> None:
    if not _STEP_HOOKS:
        _STEP_HOOKS.append(register_optimizer_step_pre_hook(_snapshot_frozen))
        _STEP_HOOKS.append(register_optimizer_step_post_hook(_restore_frozen))


def _snapshot_frozen(optimizer, args, kwargs) -> None:
    for layer in list(_PARTLY_FROZEN):
        idx = layer._lmoe_frozen_experts.nonzero().flatten().to(layer.lora_A.device)
        layer._lmoe_snapshot = (
            idx,
            layer.lora_A.detach()[idx].clone(),
            layer.lora_B.detach()[idx].clone(),
        )


@torch.no_grad()
def _restore_frozen(optimizer, args, kwargs) -> None:
    for layer in list(_PARTLY_FROZEN):
        snapshot = getattr(layer, "_lmoe_snapshot", None)
        if snapshot is not None:
            idx, A, B = snapshot
            layer.lora_A[idx] = A
            layer.lora_B[idx] = B
            layer._lmoe_snapshot = None
