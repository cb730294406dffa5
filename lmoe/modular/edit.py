"""A saved mixture, expert by expert: what it holds (describe_mixture) and LoRA adapters added to it
as new experts (add_adapters). Removing, replacing (load_experts into a slot), freezing:
lmoe/modular/experts.py and lmoe/modular/compose.py. `lmoe experts list | add | remove | replace`
is the CLI over these.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ..config import LMoEConfig
from ..io import read_adapter_meta, read_adapter_weights
from .compose import check_fit, load_experts, read_lora
from .experts import add_experts

# The new experts' router bias. At -4 a new expert starts nearly off (weight e^-4 / (E + e^-4)
# against a zero router, about 1e-2 / E) yet learns from the first step; add_experts' default (-1e4)
# keeps every output exactly as it was, but the new experts' weight and gradient are then exactly 0,
# so no training reaches them.
ADDED_EXPERT_LOGIT = -4.0


def add_adapters(
    model: nn.Module, adapters: Sequence[str | Path], logit: float = ADDED_EXPERT_LOGIT
) -> list[int]:
    """Append one expert per LoRA adapter (PEFT's, or lmoe's at E=1), with router rows of zero
    weight and bias `logit`; the earlier experts keep their rows. Returns the new slots. Every
    adapter is checked against the mixture (base, target modules, rank: compose.check_fit) before
    the model changes."""
    check_fit(model, [read_lora(d) for d in adapters])
    slots = add_experts(model, len(adapters), logit)
    load_experts(model, adapters, slots)
    return slots


def describe_mixture(directory: str | Path) -> dict:
    """What a saved mixture holds, from its files (no base model): config, wrapped modules and per
    expert the size of its update ||s B_e A_e||_F and its router row, averaged over the layers."""
    meta = read_adapter_meta(directory)
    cfg = LMoEConfig.from_dict(meta["config"])
    weights = read_adapter_weights(directory, meta)
    layers = list(meta["layers"])
    norms = torch.stack(
        [update_norms(weights[f"{n}.lora_A"], weights[f"{n}.lora_B"], cfg.scaling) for n in layers]
    )
    c = cfg.router_param_scale  # the files hold the router's parameters divided by it
    rows = torch.stack(
        [c * weights[f"{n}.router.weight"].double().norm(dim=1) for n in layers]
    )  # (layers, E)
    biases = [
        c * weights[f"{n}.router.bias"].double() if f"{n}.router.bias" in weights else None
        for n in layers
    ]
    experts = [
        {
            "expert": e,
            "update_norm": norms[:, e].mean().item(),
            "router_row_norm": rows[:, e].mean().item(),
            "router_bias": None
            if biases[0] is None
            else torch.stack(biases)[:, e].double().mean().item(),
        }
        for e in range(cfg.num_experts)
    ]
    return {
        "adapter": str(directory),
        "base_model": meta.get("base_model_name_or_path"),
        "base_model_type": meta.get("base_model_type"),
        "num_experts": cfg.num_experts,
        "rank": cfg.rank,
        "scaling": cfg.scaling,
        "router": cfg.router,
        "top_k": cfg.top_k if cfg.router in ("topk", "remix") else None,
        "composition": cfg.composition,
        "layers": len(layers),
        "target_modules": sorted({n.rsplit(".", 1)[-1] for n in layers}),
        "experts": experts,
    }


def update_norms(A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """||s B_e A_e||_F per expert (E,) from A (E, r, d_in), B (E, d_out, r),
    without forming B_e A_e:
    ||B A||_F^2 = trace((B^T B)(A A^T)), two (r, r) matrices."""
    A, B = A.double(), B.double()
    gram_B, gram_A = B.transpose(1, 2) @ B, A @ A.transpose(1, 2)  # (E, r, r)
    return (
        scaling * (gram_B * gram_A).sum((1, 2)).clamp_min(0).sqrt()
    )  # trace(X Y) = sum(X * Y^T), Y symmetric


def format_mixture(desc: dict) -> str:
    """describe_mixture's result as a few lines of text for `lmoe experts list`."""
    router = desc["router"] + (f" (k={desc['top_k']})" if desc["top_k"] else "")
    lines = [
        f"{desc['adapter']}: {desc['num_experts']} experts of rank {desc['rank']} (scaling "
        f"{desc['scaling']:g}), {router} router, {desc['composition']} composition",
        f"  wraps {', '.join(desc['target_modules'])} in {desc['layers']} layers of "
        f"{desc['base_model_type']} (base: {desc['base_model'] or 'not recorded'})",
        "  expert  update ||s B A||  router row ||w||  router bias   (means over layers)",
    ]
    for e in desc["experts"]:
        bias = "-" if e["router_bias"] is None else f"{e['router_bias']:.3g}"
        empty = "   (B = 0: adds nothing yet)" if e["update_norm"] == 0 else ""
        lines.append(
            f"  {e['expert']:6d}  {e['update_norm']:15.4g}  {e['router_row_norm']:16.4g}  "
            f"{bias:>11s}{empty}"
        )
    return "\n".join(lines)
