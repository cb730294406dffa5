"""The routing of an injected model, read off its layers: record_routing (every forward's weights
per layer, padding left out: what analysis, plots and mean routings read) and routing_counts (the
last training forward's per-token statistics summed over tokens and layers: the training log's
routing columns)."""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from .inject import lmoe_layers
from .layer import MoLoRALinear
from .router_losses import token_count, token_sum
from .routing_stats import TOKEN_STATISTICS, token_statistics


def routing_counts(model: nn.Module) -> Tensor:
    """(len(TOKEN_STATISTICS) + 1,): over the real tokens of the last training forward and over
    layers, the sums of each of TOKEN_STATISTICS (experts in use, normalised routing entropy, tokens
    whose top weight exceeds 0.5, effective support size, top expert's share), then the number of
    those (token, layer) pairs. All add up over micro-batches and processes; divided by the last,
    each is a mean per token and layer. No host sync."""
    device = next(model.parameters()).device
    counts = torch.zeros(len(TOKEN_STATISTICS) + 1, device=device)
    for _, layer in lmoe_layers(model):
        if layer.last_routing is not None:
            routing, mask = layer.last_routing
            per_token = token_statistics(routing.weights.detach())  # (tokens, TOKEN_STATISTICS)
            counts += torch.cat(
                [token_sum(per_token, mask), token_count(per_token, mask)[None]]
            ).to(device)
    return counts


def active_expert_counts(model: nn.Module) -> Tensor:
    """(2,): the experts in use summed over real tokens and layers, and the number of (token, layer)
    pairs (see routing_counts); their ratio is the mean number of experts a token uses in a
    layer."""
    return routing_counts(model)[[0, -1]]


class RoutingRecord(Mapping):
    """layer name -> (tokens, E) routing weights of every forward run inside record_routing."""

    def __init__(self, layers: dict[str, MoLoRALinear]) -> None:
        self._lists: dict[str, list[Tensor]] = {name: [] for name in layers}

    def __getitem__(self, name: str) -> Tensor:
        chunks = [
            g if mask is None else g[mask] for g, mask in self._lists[name]
        ]  # padding left out
        return torch.cat(chunks) if chunks else torch.empty(0)

    def __iter__(self):
        return iter(self._lists)

    def __len__(self) -> int:
        return len(self._lists)


@contextmanager
def record_routing(model: nn.Module):
    """Record per-layer routing weights of every forward in the block: `rec[name]` -> (tokens, E).

    Only real tokens: where the model is called with an attention_mask, padding is left out.
    """
    layers = dict(lmoe_layers(model))
    if not layers:
        raise ValueError("record_routing needs a model with lmoe layers; call lmoe.inject first.")
    record = RoutingRecord(layers)
    for name, layer in layers.items():
        layer.recorder = record._lists[name]
    try:
        yield record
    finally:
        for layer in layers.values():
            layer.recorder = None
