"""The routing analysis' PNG plots (lmoe analyze, lmoe.evaluation.analysis.analyze): each expert's
load per layer, the experts a token uses, each group's expert usage, the specialisation
(I(group; expert)) by layer, and experts per token by block and kind of layer."""

from __future__ import annotations

import re
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

from ..routing_stats import RoutingStats

PLOT_FILES = {
    "load": "layer_expert_load.png",
    "active": "active_experts.png",
    "groups": "skill_expert_usage.png",
    "specialisation": "specialisation_by_layer.png",
    "experts_per_layer": "experts_per_token_by_layer.png",
}


def short_layer_names(names: list[str]) -> list[str]:
    """ "model.layers.3.self_attn.q_proj" -> "3.q_proj", or "3.self_attn.q_proj" where the
    short form clashes."""
    parts = []
    for name in names:
        block = re.search(
            r"(?:^|\.)(\d+)\.(.+)$", name
        )  # the first block number and what follows it
        parts.append((block.group(1) + ".", block.group(2)) if block else ("", name))
    short = [block + tail.rsplit(".", 1)[-1] for block, tail in parts]
    return short if len(set(short)) == len(short) else [block + tail for block, tail in parts]


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)  # draw off-screen: no display and no global pyplot backend needed
    return fig


def _heatmap(
    fig: Figure,
    ax,
    values: Tensor,
    label: str,
    rows: list[str],
    columns: list[str],
    top: float | None = None,
) -> None:
    """values (rows, columns) as colours with a colour bar from 0 to top (default: the values'
    range); long label lists are thinned to stay readable."""
    scale = {} if top is None else {"vmin": 0.0, "vmax": max(top, float(values.max()))}
    im = ax.imshow(values.numpy(), aspect="auto", cmap="viridis", interpolation="nearest", **scale)
    step = max(1, len(rows) // 30)
    ax.set_yticks(range(0, len(rows), step), rows[::step], fontsize=8 if len(rows) > 12 else 9)
    step = max(1, len(columns) // 50)
    ax.set_xticks(
        range(0, len(columns), step),
        columns[::step],
        fontsize=7 if len(columns) > 12 else 9,
        rotation=90 if max(map(len, columns)) > 3 else 0,
    )
    fig.colorbar(im, ax=ax, label=label)


def _layers_width(n: int) -> float:
    """Layers run along x: the figure widens with their number (up to a limit)."""
    return min(max(6.0, 0.08 * n + 4), 30.0)


def plot_layer_load(stats: RoutingStats, path: Path) -> None:
    """Heatmap: mean routing weight of every expert (rows) in every layer (columns)."""
    fig = _new_figure(_layers_width(len(stats.layers)), max(3.5, 0.3 * stats.num_experts + 2.5))
    ax = fig.add_subplot()
    _heatmap(
        fig,
        ax,
        stats.load.T,
        "mean routing weight",
        [str(i) for i in range(stats.num_experts)],
        short_layer_names(stats.layers),
        2 / stats.num_experts,
    )
    ax.set(
        xlabel="layer",
        ylabel="expert",
        title=f"Expert load per layer ({sum(stats.tokens.values())} tokens)",
    )
    fig.savefig(path)


def plot_active_experts(stats: RoutingStats, path: Path) -> None:
    """Histogram of active experts per token: pooled over layers, and per layer as a
    heatmap with the mean."""
    E, ks = stats.num_experts, list(range(1, stats.num_experts + 1))
    fig = _new_figure(_layers_width(len(stats.layers)) + 4, max(4.0, 0.3 * E + 2.5))
    left, right = fig.subplots(
        1, 2, width_ratios=[1, max(1.5, _layers_width(len(stats.layers)) / 4)]
    )
    mean = stats.mean_active.mean().item()
    left.bar(ks, stats.active_hist.mean(0).numpy(), color="tab:blue")
    left.axvline(mean, color="tab:red", linestyle="--", label=f"mean {mean:.2f}")
    left.set(
        xticks=ks,
        xlabel="active experts per token",
        ylabel="share of tokens (all layers)",
        title="Active experts per token",
    )
    left.legend()
    _heatmap(
        fig,
        right,
        stats.active_hist.T.flip(0),
        "share of tokens",
        [str(k) for k in reversed(ks)],
        short_layer_names(stats.layers),
    )
    right.plot(
        range(len(stats.layers)),
        (E - stats.mean_active).numpy(),
        "-o",
        color="tab:red",
        markersize=2,
        linewidth=1,
    )
    right.set(xlabel="layer", ylabel="active experts per token", title="Per layer (red: mean)")
    fig.savefig(path)


def plot_group_usage(stats: RoutingStats, path: Path) -> None:
    """Heatmaps of each group's (skill's) mean routing weight per expert: averaged over layers, and
    in the layer whose routing tells most about the group (expert indices mean nothing across
    layers). Colours run from 0 to at least 2/E, so that uniform routing (1/E) looks flat."""
    best, top = int(stats.mutual_info.argmax()), 2 / stats.num_experts
    fig = _new_figure(
        2 * max(5.0, 0.5 * stats.num_experts + 3), max(3.0, 0.35 * len(stats.groups) + 1.5)
    )
    left, right = fig.subplots(1, 2)
    experts = [str(i) for i in range(stats.num_experts)]
    _heatmap(
        fig,
        left,
        stats.group_usage.mean(1),
        "mean routing weight (over layers)",
        stats.groups,
        experts,
        top,
    )
    left.set(
        xlabel="expert (same index in every layer)",
        ylabel="skill / domain",
        title=f"Mean over layers (the layers' mean I = {stats.mutual_info.mean():.3f} bit)",
    )
    _heatmap(
        fig, right, stats.group_usage[:, best], "mean routing weight", stats.groups, experts, top
    )
    right.set(
        xlabel="expert",
        title=f"Layer {short_layer_names(stats.layers)[best]} (I = {stats.mutual_info[best]:.3f} "
        "bit)",
    )
    fig.savefig(path)


def plot_specialisation(stats: RoutingStats, path: Path) -> None:
    """Per layer: mean normalised routing entropy and share of tokens with top weight > 0.5 (left
    axis), I(group; expert) in bits (right axis)."""
    x, names = range(len(stats.layers)), short_layer_names(stats.layers)
    fig = _new_figure(_layers_width(len(stats.layers)) + 1, 4.0)
    ax = fig.add_subplot()
    ax.plot(
        x,
        stats.entropy.numpy(),
        "-o",
        markersize=2,
        color="tab:blue",
        label="routing entropy / log E",
    )
    ax.plot(
        x,
        stats.confident.numpy(),
        "-o",
        markersize=2,
        color="tab:green",
        label="share with top weight > 0.5",
    )
    ax.set(
        ylim=(-0.02, 1.02),
        xlabel="layer",
        ylabel="entropy / share of tokens",
        title=f"Routing specialisation per layer ({sum(stats.tokens.values())} tokens, "
        f"{len(stats.groups)} groups)",
    )
    step = max(1, len(names) // 50)
    ax.set_xticks(range(0, len(names), step), names[::step], fontsize=7, rotation=90)
    bits = ax.twinx()
    bits.plot(
        x, stats.mutual_info.numpy(), "-o", markersize=2, color="tab:red", label="I(skill; expert)"
    )
    top = max(1, min(len(stats.groups), stats.num_experts))
    bits.set(
        ylim=(0, max(0.05, 1.1 * float(stats.mutual_info.max()))), ylabel=f"bits (max log2 {top})"
    )
    fig.legend(loc="outside upper center", ncols=3, fontsize=8)
    fig.savefig(path)


def _block_and_kind(name: str) -> tuple[int, str]:
    """ "model.layers.3.self_attn.q_proj" -> (3, "q_proj"); (0, name) where there
    is no block number."""
    block = re.search(r"(?:^|\.)(\d+)\.(.+)$", name)
    return (int(block.group(1)), block.group(2).rsplit(".", 1)[-1]) if block else (0, name)


def plot_experts_per_layer(stats: RoutingStats, path: Path) -> None:
    """LD-MoLE's view: mean active experts per token against the transformer block, one line per
    projection, with a band of one standard deviation over tokens."""
    kinds: dict[str, list[tuple[int, int]]] = {}
    for i, name in enumerate(stats.layers):
        block, kind = _block_and_kind(name)
        kinds.setdefault(kind, []).append((block, i))
    fig = _new_figure(max(6.0, 0.15 * len(stats.layers) / max(len(kinds), 1) + 5), 4.0)
    ax = fig.add_subplot()
    for kind, rows in kinds.items():
        blocks, index = [b for b, _ in rows], [i for _, i in rows]
        mean, std = stats.mean_active[index].numpy(), stats.std_active[index].numpy()
        ax.plot(blocks, mean, "-o", markersize=3, label=kind)
        ax.fill_between(blocks, mean - std, mean + std, alpha=0.15)
    ax.set(
        ylim=(0.5, stats.num_experts + 0.5),
        xlabel="transformer block",
        ylabel="active experts per token",
        title=f"Experts per token by layer (mean {stats.mean_active.mean():.2f} of "
        f"{stats.num_experts}; band: ±1 std)",
    )
    fig.legend(loc="outside right upper", fontsize=8)
    fig.savefig(path)


PLOTS = {
    "load": plot_layer_load,
    "active": plot_active_experts,
    "groups": plot_group_usage,
    "specialisation": plot_specialisation,
    "experts_per_layer": plot_experts_per_layer,
}
