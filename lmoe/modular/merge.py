"""Fold a fixed routing into the base weights, for zero-overhead serving of one skill.

With the routing fixed to one vector g (E,) per layer, every mixture layer is one linear map:
W = W0 + s * Delta W(g). `merge` adds that update to the base weight and makes the layer run its
base alone (no router, no experts); `unmerge` subtracts it again and restores routing.
A skill's routing: the mean of its tokens' weights, `lmoe.mean_routing(rec)` after
`with lmoe.record_routing(model) as rec: model(skill_ids)`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ..inject import lmoe_layers
from ..layer import MoLoRALinear
from .compose import routing_vector


def _routing_for(name: str, layer: MoLoRALinear, g: Tensor | Mapping[str, Tensor]) -> Tensor:
    weight = layer.base.weight
    if type(weight) is not nn.Parameter or not weight.dtype.is_floating_point:
        raise TypeError(
            f"merge needs a floating-point base weight; {name!r} wraps {type(layer.base).__name__} "
            f"with a {weight.dtype} weight. Serve it unmerged, or load the base model in float."
        )
    return routing_vector(g, name, layer.num_experts).to(device=layer.lora_A.device)


def _base_update(layer: MoLoRALinear, g: Tensor) -> Tensor:
    """s * Delta W(g) laid out like the base weight (Conv1D stores it transposed)."""
    delta = layer.delta_weight(g)  # (d_out, d_in)
    return delta.t() if type(layer.base).__name__ == "Conv1D" else delta


@torch.no_grad()
def merge(model: nn.Module, g: Tensor | Mapping[str, Tensor]) -> nn.Module:
    """Add s * Delta W(g) to every mixture layer's base weight and switch routing off. In
    place; returns model.

    g: one routing vector (E,) for all layers, or {layer name: (E,)}. Undo with `unmerge`.
    """
    layers = list(lmoe_layers(model))
    if not layers:
        raise ValueError(
            "merge needs a model with lmoe layers; call lmoe.inject or lmoe.load_adapter first."
        )
    if any(layer.merged_routing is not None for _, layer in layers):
        raise ValueError(
            "This model is already merged; call lmoe.unmerge(model) before merging another routing."
        )
    routing = [
        _routing_for(name, layer, g) for name, layer in layers
    ]  # all checked before any change
    for (_, layer), g_layer in zip(layers, routing, strict=True):
        weight = layer.base.weight
        weight += _base_update(layer, g_layer).to(weight.dtype)
        layer.merged_routing = g_layer.detach().clone()
    return model


@torch.no_grad()
def unmerge(model: nn.Module) -> nn.Module:
    """Subtract what merge added (the base is back up to float rounding) and
    route again. In place."""
    for _, layer in lmoe_layers(model):
        if layer.merged_routing is not None:
            weight = layer.base.weight
            weight -= _base_update(layer, layer.merged_routing).to(weight.dtype)
            layer.merged_routing = None
    return model
