"""Routing analysis: how many experts each token uses in each layer, how loaded each expert is, and
which experts each skill (or any named group of data) uses; as a JSON summary and PNG plots.

The model runs over named groups of batches under `lmoe.record_routing`; every real (unpadded) token
gives one routing vector g (E,) per layer. An expert is active for a token when g_i > 0: always all E
for softmax, k for top-k, a learned, varying number for the dynamic (LD-MoLE) router.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor, nn

from .inject import record_routing

if TYPE_CHECKING:
    from .data import Example

SUMMARY_FILE = "routing_summary.json"
PLOT_FILES = {"load": "layer_expert_load.png", "active": "active_experts.png", "groups": "skill_expert_usage.png"}


def active_experts(g: Tensor) -> Tensor:
    """Number of experts with non-zero weight, per token: (tokens, E) -> (tokens,)."""
    return (g > 0).sum(-1)


# ---------------------------------------------------------------- collecting routing weights

def collect_routing(model: nn.Module, batches_by_name: Mapping[str, Iterable]) -> dict[str, dict[str, Tensor]]:
    """group name -> layer name -> (tokens, E) float32 CPU routing weights of the group's real tokens.

    A batch is a dict with "input_ids" (batch, T) and optionally "attention_mask" (padding is left
    out), or a bare input_ids tensor. Runs in eval mode without gradients; the mode is restored.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = {}
    try:
        for name, batches in batches_by_name.items():
            out[name] = _route_group(model, batches, device)
    finally:
        model.train(was_training)
    return out


def _route_group(model: nn.Module, batches: Iterable, device: torch.device) -> dict[str, Tensor]:
    real = 0
    with record_routing(model) as rec, torch.no_grad():  # the record leaves padding out
        for batch in batches:
            ids = batch["input_ids"] if isinstance(batch, Mapping) else batch
            mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
            mask = torch.ones_like(ids) if mask is None else mask
            model(input_ids=ids.to(device), attention_mask=mask.to(device))
            real += int(mask.bool().sum())
        weights = {}
        for layer in rec:
            g = rec[layer].float().cpu()
            if g.shape[0] != real:
                raise RuntimeError(f"Layer {layer} routed {g.shape[0]} tokens for {real} real input tokens; "
                                   "analysis needs each mixture layer to run once per forward.")
            weights[layer] = g
    return weights


def batches_by_domain(examples: list[Example], pad_id: int, batch_size: int = 16) -> dict[str, list[dict]]:
    """Group encoded examples by their domain (skill or conversation domain) into padded batches."""
    from .data import collate

    groups: dict[str, list[Example]] = {}
    for ex in examples:
        groups.setdefault(ex.domain, []).append(ex)
    return {name: [collate(exs[i:i + batch_size], pad_id) for i in range(0, len(exs), batch_size)]
            for name, exs in groups.items()}


# ---------------------------------------------------------------- statistics

@dataclass
class RoutingStats:
    """Routing statistics over all groups' tokens; rows follow `layers`, columns the E experts."""

    layers: list[str]
    groups: list[str]
    tokens: dict[str, int]  # tokens per group
    active_hist: Tensor  # (layers, E): share of tokens with 1..E active experts
    mean_active: Tensor  # (layers,): mean number of active experts per token
    load: Tensor  # (layers, E): mean routing weight g_i (rows sum to 1)
    dispatch: Tensor  # (layers, E): share of tokens with g_i > 0
    group_usage: Tensor  # (groups, layers, E): mean routing weight within each group
    group_active: Tensor  # (groups, layers): mean active experts within each group

    @property
    def num_experts(self) -> int:
        return self.load.shape[-1]


def routing_stats(routing: dict[str, dict[str, Tensor]]) -> RoutingStats:
    """Statistics of collect_routing's output (groups must share layers; empty groups are dropped)."""
    groups = [name for name, layers in routing.items() if layers and next(iter(layers.values())).shape[0]]
    if not groups:
        raise ValueError("No routed tokens to analyse: every group of batches was empty.")
    layers = list(routing[groups[0]])
    pooled = [torch.cat([routing[g][layer] for g in groups]) for layer in layers]
    E = pooled[0].shape[-1]
    counts = [active_experts(g) for g in pooled]
    return RoutingStats(
        layers=layers, groups=groups, tokens={g: next(iter(routing[g].values())).shape[0] for g in groups},
        active_hist=torch.stack([torch.bincount(c - 1, minlength=E).float() / len(c) for c in counts]),
        mean_active=torch.stack([c.float().mean() for c in counts]),
        load=torch.stack([g.mean(0) for g in pooled]),
        dispatch=torch.stack([(g > 0).float().mean(0) for g in pooled]),
        group_usage=torch.stack([torch.stack([routing[g][layer].mean(0) for layer in layers]) for g in groups]),
        group_active=torch.stack([torch.stack([active_experts(routing[g][layer]).float().mean() for layer in layers])
                                  for g in groups]))


def summary(stats: RoutingStats) -> dict:
    """The statistics as plain JSON-ready data."""
    def r(t: Tensor) -> list | float:
        return [round(v, 6) for v in t.tolist()] if t.dim() else round(t.item(), 6)

    return {
        "num_experts": stats.num_experts,
        "tokens": stats.tokens,
        "mean_active_experts": r(stats.mean_active.mean()),
        "layers": {layer: {"mean_active_experts": r(stats.mean_active[i]),
                           "active_experts_share": r(stats.active_hist[i]),  # index k-1: share with k active
                           "expert_load": r(stats.load[i]), "expert_dispatch": r(stats.dispatch[i])}
                   for i, layer in enumerate(stats.layers)},
        "groups": {group: {"tokens": stats.tokens[group], "mean_active_experts": r(stats.group_active[j].mean()),
                           "expert_usage": r(stats.group_usage[j].mean(0)),  # mean over layers
                           "mean_active_experts_per_layer": r(stats.group_active[j])}
                   for j, group in enumerate(stats.groups)},
    }


def mean_active_experts(model: nn.Module, batches: Iterable) -> dict[str, float]:
    """layer name -> mean number of active experts per real token over `batches` (for benchmarks)."""
    stats = routing_stats(collect_routing(model, {"all": batches}))
    return dict(zip(stats.layers, stats.mean_active.tolist()))


# ---------------------------------------------------------------- plots

def short_layer_names(names: list[str]) -> list[str]:
    """"model.layers.3.self_attn.q_proj" -> "3.q_proj", or "3.self_attn.q_proj" where the short form clashes."""
    parts = []
    for name in names:
        block = re.search(r"(?:^|\.)(\d+)\.(.+)$", name)  # the first block number and what follows it
        parts.append((block.group(1) + ".", block.group(2)) if block else ("", name))
    short = [block + tail.rsplit(".", 1)[-1] for block, tail in parts]
    return short if len(set(short)) == len(short) else [block + tail for block, tail in parts]


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)  # draw off-screen: no display and no global pyplot backend needed
    return fig


def _heatmap(fig: Figure, ax, values: Tensor, label: str, rows: list[str], columns: list[str]) -> None:
    """values (rows, columns) as colours with a colour bar; long label lists are thinned to stay readable."""
    im = ax.imshow(values.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
    step = max(1, len(rows) // 30)
    ax.set_yticks(range(0, len(rows), step), rows[::step], fontsize=8 if len(rows) > 12 else 9)
    step = max(1, len(columns) // 50)
    ax.set_xticks(range(0, len(columns), step), columns[::step], fontsize=7 if len(columns) > 12 else 9,
                  rotation=90 if max(map(len, columns)) > 3 else 0)
    fig.colorbar(im, ax=ax, label=label)


def _layers_width(n: int) -> float:
    """Layers run along x: the figure widens with their number (up to a limit)."""
    return min(max(6.0, 0.08 * n + 4), 30.0)


def plot_layer_load(stats: RoutingStats, path: Path) -> None:
    """Heatmap: mean routing weight of every expert (rows) in every layer (columns)."""
    fig = _new_figure(_layers_width(len(stats.layers)), max(3.5, 0.3 * stats.num_experts + 2.5))
    ax = fig.add_subplot()
    _heatmap(fig, ax, stats.load.T, "mean routing weight", [str(i) for i in range(stats.num_experts)],
             short_layer_names(stats.layers))
    ax.set(xlabel="layer", ylabel="expert", title=f"Expert load per layer ({sum(stats.tokens.values())} tokens)")
    fig.savefig(path)


def plot_active_experts(stats: RoutingStats, path: Path) -> None:
    """Histogram of active experts per token: pooled over layers, and per layer as a heatmap with the mean."""
    E, ks = stats.num_experts, list(range(1, stats.num_experts + 1))
    fig = _new_figure(_layers_width(len(stats.layers)) + 4, max(4.0, 0.3 * E + 2.5))
    left, right = fig.subplots(1, 2, width_ratios=[1, max(1.5, _layers_width(len(stats.layers)) / 4)])
    mean = stats.mean_active.mean().item()
    left.bar(ks, stats.active_hist.mean(0).numpy(), color="tab:blue")
    left.axvline(mean, color="tab:red", linestyle="--", label=f"mean {mean:.2f}")
    left.set(xticks=ks, xlabel="active experts per token", ylabel="share of tokens (all layers)",
             title="Active experts per token")
    left.legend()
    _heatmap(fig, right, stats.active_hist.T.flip(0), "share of tokens", [str(k) for k in reversed(ks)],
             short_layer_names(stats.layers))
    right.plot(range(len(stats.layers)), (E - stats.mean_active).numpy(), "-o", color="tab:red", markersize=2,
               linewidth=1)
    right.set(xlabel="layer", ylabel="active experts per token", title="Per layer (red: mean)")
    fig.savefig(path)


def plot_group_usage(stats: RoutingStats, path: Path) -> None:
    """Heatmap: each group's (skill's) mean routing weight per expert, averaged over layers."""
    usage = stats.group_usage.mean(1)  # (groups, E)
    fig = _new_figure(max(5.0, 0.5 * stats.num_experts + 3), max(3.0, 0.35 * len(stats.groups) + 1.5))
    ax = fig.add_subplot()
    _heatmap(fig, ax, usage, "mean routing weight (over layers)", stats.groups,
             [str(i) for i in range(stats.num_experts)])
    ax.set(xlabel="expert (same index in every layer)", ylabel="skill / domain", title="Expert usage per skill")
    fig.savefig(path)


# ---------------------------------------------------------------- all of it

def analyze(model: nn.Module, batches_by_name: Mapping[str, Iterable], out_dir: str | Path) -> dict:
    """Route every group's batches, write out_dir/routing_summary.json and the three PNG plots.

    batches_by_name: group (skill or domain) name -> batches (see collect_routing). Returns the summary.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stats = routing_stats(collect_routing(model, batches_by_name))
    plot_layer_load(stats, out / PLOT_FILES["load"])
    plot_active_experts(stats, out / PLOT_FILES["active"])
    plot_group_usage(stats, out / PLOT_FILES["groups"])
    result = summary(stats)
    result["files"] = {key: str(out / name) for key, name in PLOT_FILES.items()}
    (out / SUMMARY_FILE).write_text(json.dumps(result, indent=2) + "\n")
    return result
