"""Routing statistics as pure maths on routing weights g (tokens, E): how many experts a token uses,
how sure its routing is, how loaded each expert is, and how much the routing tells
about the data's domain.

How many experts a token's routing really uses is measured as ReMix does (Qiu et al. 2026,
arXiv 2603.10160, section 2.2, eq. 3), by the effective support size
ESS(g) = (sum_i |g_i|)^2 / sum_i g_i^2: 1 for one expert, k for equal weights on k experts, E for
uniform; beside it the share of the routing mass on the top expert, max_i |g_i| / sum_i |g_i|.
These, the entropy and the top-weight test read the weights alone, scaled to sum to 1: weights of
any scale (a router's constant weights) count alike.

The specialisation measure is I(domain; expert) in bits, with p(expert | domain) the domain's mean
routing weights and p(domain) its share of tokens: H(mean routing) - sum_d p(d) H(mean routing of
d). It is 0 when every domain is routed alike (uniform routing included) and
log2(min(domains, E)) at most.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

CONFIDENT = 0.5  # a token's routing is "confident" when its top weight exceeds this


def active_experts(g: Tensor) -> Tensor:
    """Number of experts with non-zero weight, per token: (tokens, E) -> (tokens,)."""
    return (g > 0).sum(-1)


def normalised_entropy(g: Tensor) -> Tensor:
    """-sum_i g_i log g_i / log E per token, (tokens, E) -> (tokens,): 1 for uniform, 0 for one
    expert (0 log 0 = 0; 0 when E = 1)."""
    E = g.shape[-1]
    return torch.special.entr(g).sum(-1) / (math.log(E) if E > 1 else 1.0)


def routing_shares(g: Tensor) -> Tensor:
    """|g_i| / sum_j |g_j| per token, (tokens, E) -> (tokens, E): g itself for weights that sum to
    1; a token with no weight at all gets zeros."""
    mass = g.abs()
    total = mass.sum(-1, keepdim=True)
    return torch.where(total > 0, mass / total, 0.0)  # 0/0 is not taken


def effective_support_size(g: Tensor) -> Tensor:
    """ReMix's effective support size per token, (tokens, E) -> (tokens,):
    (sum_i |g_i|)^2 / sum_i g_i^2 (Qiu et al. 2026, eq. 3); 1 for one expert, k for equal weights on
    k experts, E for uniform. Defined for g != 0; a token with no weight gets 0."""
    squares = g.square().sum(-1)
    return torch.where(squares > 0, g.abs().sum(-1).square() / squares, 0.0)


TOKEN_STATISTICS = (  # the columns of token_statistics, named as metrics.csv names them
    "active_experts",
    "routing_entropy",
    "top_weight_over_half",
    "effective_support_size",
    "top_expert_share",
)


def token_statistics(g: Tensor) -> Tensor:
    """(tokens, E) -> (tokens, 5), as g's float, columns TOKEN_STATISTICS: active experts,
    normalised entropy, top share > CONFIDENT (0/1), effective support size, top share (the top
    expert's share of the routing mass). All but the first are read from the shares
    |g_i| / sum_j |g_j|: the scale of g does not count."""
    g = g.float() if not g.is_floating_point() else g
    shares = routing_shares(g)
    top = shares.amax(-1)
    return torch.stack(
        [
            active_experts(g).to(g.dtype),
            normalised_entropy(shares),
            (top > CONFIDENT).to(g.dtype),
            effective_support_size(g),
            top,
        ],
        -1,
    )


def entropy_bits(p: Tensor) -> Tensor:
    """Shannon entropy in bits of distributions along the last dim (0 log 0 = 0)."""
    return torch.special.entr(p.double()).sum(-1) / math.log(2)


def mutual_information(usage: Tensor, tokens: Tensor) -> Tensor:
    """I(domain; expert) in bits from each domain's mean routing weights usage (domains, E) and its
    number of tokens (domains,): H(sum_d p_d usage_d) - sum_d p_d H(usage_d), p_d = tokens_d / all
    tokens (float64)."""
    p = tokens.double() / tokens.double().sum()
    usage = usage.double()
    mixed = (p[:, None] * usage).sum(0)
    return (entropy_bits(mixed) - (p * entropy_bits(usage)).sum()).clamp(min=0)


# ------------------------------------------------------------- statistics of named groups of tokens


@dataclass
class RoutingStats:
    """Routing statistics over all groups' tokens; rows follow `layers`, columns the E experts."""

    layers: list[str]
    groups: list[str]
    tokens: dict[str, int]  # tokens per group
    active_hist: Tensor  # (layers, E): share of tokens with 1..E active experts
    mean_active: Tensor  # (layers,): mean number of active experts per token
    std_active: Tensor  # (layers,): their standard deviation over tokens
    entropy: Tensor  # (layers,): mean normalised routing entropy per token
    confident: Tensor  # (layers,): share of tokens whose top weight exceeds CONFIDENT
    support: Tensor  # (layers,): mean effective support size per token (ReMix's ESS)
    top_share: Tensor  # (layers,): mean share of a token's routing mass on its top expert
    mutual_info: Tensor  # (layers,): I(group; expert) in bits
    load: Tensor  # (layers, E): mean routing weight g_i (rows sum to 1)
    top1: (
        Tensor  # (layers, E): share of tokens whose largest weight is g_i (ties: the lowest index)
    )
    dispatch: Tensor  # (layers, E): share of tokens with g_i > 0
    group_usage: Tensor  # (groups, layers, E): mean routing weight within each group
    group_active: Tensor  # (groups, layers): mean active experts within each group

    @property
    def num_experts(self) -> int:
        return self.load.shape[-1]


def routing_stats(routing: Mapping[str, Mapping[str, Tensor]]) -> RoutingStats:
    """Statistics of group name -> layer name -> (tokens, E) weights (groups share layers; empty
    ones are dropped)."""
    groups = [
        name for name, layers in routing.items() if layers and next(iter(layers.values())).shape[0]
    ]
    if not groups:
        raise ValueError("No routed tokens to analyse: every group of tokens was empty.")
    layers = list(routing[groups[0]])
    pooled = [torch.cat([routing[g][layer] for g in groups]).float() for layer in layers]
    E = pooled[0].shape[-1]
    per_token = [token_statistics(g) for g in pooled]  # (tokens, 5) per layer
    counts = [active_experts(g) for g in pooled]
    tokens = {g: next(iter(routing[g].values())).shape[0] for g in groups}
    usage = torch.stack(
        [torch.stack([routing[g][layer].float().mean(0) for layer in layers]) for g in groups]
    )
    sizes = torch.tensor([tokens[g] for g in groups])
    return RoutingStats(
        layers=layers,
        groups=groups,
        tokens=tokens,
        active_hist=torch.stack(
            [torch.bincount(c - 1, minlength=E).float() / len(c) for c in counts]
        ),
        mean_active=torch.stack([s[:, 0].mean() for s in per_token]),
        std_active=torch.stack([s[:, 0].std(correction=0) for s in per_token]),
        entropy=torch.stack([s[:, 1].mean() for s in per_token]),
        confident=torch.stack([s[:, 2].mean() for s in per_token]),
        support=torch.stack([s[:, 3].mean() for s in per_token]),
        top_share=torch.stack([s[:, 4].mean() for s in per_token]),
        mutual_info=torch.stack(
            [mutual_information(usage[:, i], sizes) for i in range(len(layers))]
        ).float(),
        load=torch.stack([g.mean(0) for g in pooled]),
        top1=torch.stack(
            [torch.bincount(g.argmax(-1), minlength=E).float() / len(g) for g in pooled]
        ),
        dispatch=torch.stack([(g > 0).float().mean(0) for g in pooled]),
        group_usage=usage,
        group_active=torch.stack(
            [
                torch.stack([active_experts(routing[g][layer]).float().mean() for layer in layers])
                for g in groups
            ]
        ),
    )


def summary(stats: RoutingStats) -> dict:
    """The statistics as plain JSON-ready data: averaged over layers at the top, then per
    layer and per group."""

    def r(t: Tensor) -> list | float:
        return [round(v, 6) for v in t.tolist()] if t.dim() else round(t.item(), 6)

    return {
        "num_experts": stats.num_experts,
        "tokens": stats.tokens,
        "mean_active_experts": r(stats.mean_active.mean()),
        "routing_entropy": r(stats.entropy.mean()),  # per token, normalised by log E
        "mutual_information_bits": r(stats.mutual_info.mean()),  # I(group; expert)
        "mutual_information_max_bits": round(
            math.log2(min(len(stats.groups), stats.num_experts)), 6
        ),
        "top_weight_over_half": r(stats.confident.mean()),
        "effective_support_size": r(stats.support.mean()),  # ReMix's ESS: 1 to E
        "top_expert_share": r(stats.top_share.mean()),  # mean max_i g_i / sum_i g_i
        "layers": {
            layer: {
                "mean_active_experts": r(stats.mean_active[i]),
                "active_experts_share": r(stats.active_hist[i]),  # index k-1: share with k active
                "routing_entropy": r(stats.entropy[i]),
                "mutual_information_bits": r(stats.mutual_info[i]),
                "top_weight_over_half": r(stats.confident[i]),
                "effective_support_size": r(stats.support[i]),
                "top_expert_share": r(stats.top_share[i]),
                "expert_load": r(stats.load[i]),
                "expert_top1_share": r(stats.top1[i]),
                "expert_dispatch": r(stats.dispatch[i]),
            }
            for i, layer in enumerate(stats.layers)
        },
        "groups": {
            group: {
                "tokens": stats.tokens[group],
                "mean_active_experts": r(stats.group_active[j].mean()),
                "expert_usage": r(stats.group_usage[j].mean(0)),  # mean over layers
                "mean_active_experts_per_layer": r(stats.group_active[j]),
            }
            for j, group in enumerate(stats.groups)
        },
    }


def group_by_label(routing: Mapping[str, Tensor], labels: Sequence) -> dict[str, dict[str, Tensor]]:
    """layer -> (tokens, E) weights (e.g. a record_routing record) and one label per token -> label
    -> layer -> that label's rows (labels in order of first appearance)."""
    names = list(dict.fromkeys(map(str, labels)))
    index = {name: i for i, name in enumerate(names)}
    ids = torch.tensor([index[str(label)] for label in labels], dtype=torch.long)
    for layer, g in routing.items():
        if g.shape[0] != len(ids):
            raise ValueError(
                f"Layer {layer} holds {g.shape[0]} routed tokens but {len(ids)} labels were given; "
                "give one label per recorded token (see per_token_labels for labels per example)."
            )
    return {
        name: {layer: g[ids.to(g.device) == i] for layer, g in routing.items()}
        for i, name in enumerate(names)
    }


def per_token_labels(labels: Sequence, lengths: Sequence[int]) -> list:
    """Labels per example and each example's number of recorded tokens -> one label
    per token, in order."""
    if len(labels) != len(lengths):
        raise ValueError(
            f"{len(labels)} labels for {len(lengths)} examples; give one label per example."
        )
    return [label for label, n in zip(labels, lengths, strict=True) for _ in range(n)]


def specialisation(routing: Mapping[str, Tensor], labels: Sequence) -> dict:
    """summary() of recorded routing, layer -> (tokens, E), with one
    domain/skill/task label per token."""
    return summary(routing_stats(group_by_label(routing, labels)))
