"""Modular skills: a mixture built from PEFT LoRA adapters (or single-expert lmoe ones), one adapter
an expert. Experts are then added, removed or frozen by lmoe/modular/experts.py; a fixed routing
goes back to a plain PEFT LoRA adapter by lmoe/modular/export.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from ..config import LMoEConfig
from ..inject import find_targets, inject, lmoe_layers
from ..io import is_lmoe_adapter, read_adapter_meta, read_adapter_weights
from ..layer import is_linear
from .experts import check_experts, check_unmerged

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = (
    "base_model.model."  # PEFT's key prefix: PeftModel.base_model (LoraModel) .model (the LM)
)


# ---------------------------------------------------------------- reading LoRA adapters


@dataclass
class LoRA:
    """A plain LoRA adapter: module path -> (A (r, d_in), s B (d_out, r)), its own
    scale s folded into B."""

    path: Path
    modules: dict[str, tuple[Tensor, Tensor]]

    @property
    def rank(self) -> int:
        return max(A.shape[0] for A, _ in self.modules.values())


def read_lora(directory: str | Path) -> LoRA:
    """A PEFT LoRA adapter directory, or an lmoe adapter with one expert (a plain LoRA, e.g.
    `lmoe train` at E=1)."""
    if is_lmoe_adapter(directory):
        return _read_lmoe_lora(directory)
    return read_peft_lora(directory)


def read_peft_lora(directory: str | Path) -> LoRA:
    """Read adapter_config.json + adapter_model.safetensors as PEFT saves them (rank/alpha
    patterns, rsLoRA)."""
    config = _read_peft_config(directory)
    pairs: dict[str, dict[str, Tensor]] = {}
    for key, tensor in _read_peft_weights(directory).items():
        path, _, part = key.removeprefix(PEFT_PREFIX).rpartition(".lora_")
        if not key.startswith(PEFT_PREFIX) or part not in ("A.weight", "B.weight"):
            raise ValueError(
                f"PEFT adapter {directory} holds {key!r}, which is not a LoRA A/B weight. lmoe "
                "composes plain LoRA adapters of linear layers (no embeddings, modules_to_save or "
                "biases)."
            )
        pairs.setdefault(path, {})[part[0]] = tensor
    modules = {}
    for path, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(
                f"PEFT adapter {directory} has only lora_{''.join(ab)} for {path}; "
                "the file is incomplete."
            )
        A, B = ab["A"], ab["B"]  # (r, d_in), (d_out, r)
        modules[path] = (A, _module_scale(config, path, A.shape[0]) * B)
    if not modules:
        raise ValueError(f"PEFT adapter {directory} has no LoRA weights.")
    return LoRA(Path(directory), modules)


def _read_lmoe_lora(directory: str | Path) -> LoRA:
    meta = read_adapter_meta(directory)
    cfg = LMoEConfig.from_dict(meta["config"])
    if cfg.num_experts != 1:
        raise ValueError(
            f"{directory} is an lmoe mixture of {cfg.num_experts} experts, not one LoRA; export a "
            "fixed routing of it with lmoe.export_peft and compose that."
        )
    weights = read_adapter_weights(directory, meta)
    return LoRA(
        Path(directory),
        {
            name: (weights[f"{name}.lora_A"][0], cfg.scaling * weights[f"{name}.lora_B"][0])
            for name in meta["layers"]
        },
    )


def _read_peft_config(directory: str | Path) -> dict:
    path = Path(directory) / PEFT_CONFIG
    if not path.is_file():
        raise FileNotFoundError(
            f"No PEFT adapter at {directory}: {PEFT_CONFIG} is missing. Pass a directory "
            "written by PEFT's save_pretrained (or lmoe.export_peft)."
        )
    config = json.loads(path.read_text())
    unsupported = {
        "peft_type": config.get("peft_type") != "LORA",
        "use_dora": bool(config.get("use_dora")),
        "bias": config.get("bias", "none") != "none",
        "lora_bias": bool(config.get("lora_bias")),
    }
    wrong = [f"{key}={config.get(key)!r}" for key, bad in unsupported.items() if bad]
    if wrong:
        raise ValueError(
            f"PEFT adapter {directory} has {', '.join(wrong)}; lmoe composes plain LoRA adapters "
            "(peft_type LORA, no DoRA, no biases)."
        )
    return config


def _read_peft_weights(directory: str | Path) -> dict[str, Tensor]:
    path = Path(directory) / PEFT_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(
            f"PEFT adapter {directory} has no {PEFT_WEIGHTS}; save it with safetensors "
            "(PEFT's default, safe_serialization=True)."
        )
    return load_file(str(path))


def _module_scale(config: dict, path: str, r: int) -> float:
    """PEFT's scale of one module: alpha / r, or alpha / sqrt(r) with rsLoRA; alpha_pattern
    may override alpha."""
    alpha = config["lora_alpha"]
    for key, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({key})$", path):  # PEFT's get_pattern_key rule
            alpha = value
            break
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


# ---------------------------------------------------------------- building a mixture from adapters


def compose(
    model: nn.Module, adapters: Sequence[str | Path], cfg: LMoEConfig | None = None
) -> nn.Module:
    """Inject a mixture whose expert i is LoRA adapters[i] (see read_lora), in place, with a zero
    router. Returns model.

    num_experts, rank (the largest; smaller ranks are zero-padded, which is exact) and
    target_modules come from the adapters; alpha = rank, so scaling is 1 and each adapter's own
    scale sits in its B. Router, composition and losses come from cfg (default: outputs composition,
    where a one-hot routing reproduces an adapter exactly). The zero router starts uniform: the
    average of the adapters.
    """
    loras = [read_lora(d) for d in adapters]
    paths = _module_paths(model, loras)
    rank = max(lora.rank for lora in loras)
    template = cfg or LMoEConfig(composition="outputs")
    cfg = dataclasses.replace(
        template, num_experts=len(loras), rank=rank, alpha=float(rank), target_modules=paths
    )
    inject(model, dataclasses.replace(cfg, target_modules=_short_targets(model, cfg, paths)))
    with torch.no_grad():
        for _, layer in lmoe_layers(model):
            for p in layer.router.parameters(recurse=False):
                p.zero_()
    _copy_experts(model, loras, range(len(loras)))
    return model


def load_experts(model: nn.Module, adapters: Sequence[str | Path], experts: Sequence[int]) -> None:
    """Overwrite expert slots experts[i] with LoRA adapters[i] (e.g. the slots
    add_experts returned)."""
    if len(adapters) != len(experts):
        raise ValueError(
            f"load_experts got {len(adapters)} adapters for {len(experts)} expert slots; "
            "give one slot per adapter."
        )
    check_experts(model, experts)
    check_unmerged(model)
    _copy_experts(model, [read_lora(d) for d in adapters], experts)


def _module_paths(model: nn.Module, loras: list[LoRA]) -> list[str]:
    """The union of the adapters' modules, in model order; an error names any the model lacks."""
    paths = set().union(*(lora.modules for lora in loras))
    linear = [name for name, module in model.named_modules() if name in paths and is_linear(module)]
    missing = sorted(paths - set(linear))
    if missing:
        owners = [str(lora.path) for lora in loras if set(lora.modules) & set(missing)]
        raise ValueError(
            f"Adapters {owners} have LoRA weights for {missing[:3]}, which are not linear layers "
            f"of this {type(model).__name__}; compose adapters trained on this base model."
        )
    return linear


def _short_targets(model: nn.Module, cfg: LMoEConfig, paths: list[str]) -> list[str]:
    """The module-name suffixes if they select exactly paths (a readable config),
    else the full paths."""
    suffixes = sorted({p.rsplit(".", 1)[-1] for p in paths})
    return (
        suffixes
        if find_targets(model, dataclasses.replace(cfg, target_modules=suffixes)) == paths
        else paths
    )


@torch.no_grad()
def _copy_experts(model: nn.Module, loras: list[LoRA], experts: Sequence[int]) -> None:
    check_fit(model, loras)  # all of them before any slot changes
    layers = dict(lmoe_layers(model))
    for lora, e in zip(loras, experts, strict=True):
        for name, layer in layers.items():
            layer.lora_A[e].zero_()  # a module the adapter skips: the expert adds nothing there
            layer.lora_B[e].zero_()
            if name in lora.modules:
                A, B = lora.modules[name]
                layer.lora_A[e, : A.shape[0]].copy_(
                    A
                )  # zero padding to the mixture's rank is exact
                layer.lora_B[e, :, : A.shape[0]].copy_(B / layer.scaling)


def check_fit(model: nn.Module, loras: Sequence[LoRA]) -> None:
    """Each LoRA can become an expert of this mixture: it was trained on this base (its modules
    exist with the same shapes), adapts only modules the mixture wraps, and has at most
    the mixture's rank."""
    modules, layers = dict(model.named_modules()), dict(lmoe_layers(model))
    wraps = ", ".join(sorted({name.rsplit(".", 1)[-1] for name in layers}))
    for lora in loras:
        absent = sorted(set(lora.modules) - set(modules))
        if absent:
            raise ValueError(
                f"Adapter {lora.path} adapts {_some(absent)}, which this {type(model).__name__} "
                "does not have: it was trained on another base model. Use adapters of the "
                "mixture's base."
            )
        extra = sorted(set(lora.modules) - set(layers))
        if extra:
            raise ValueError(
                f"Adapter {lora.path} adapts {_some(extra)}, which this mixture does not wrap (it "
                f"wraps {wraps}). Rebuild the mixture with `lmoe compose` (lmoe.modular.compose) "
                "over all its adapters and this one: it wraps their union."
            )
        for name, (A, B) in lora.modules.items():
            layer = layers[name]
            if A.shape[1] != layer.in_features or B.shape[0] != layer.out_features:
                raise ValueError(
                    f"Adapter {lora.path}: {name} maps {A.shape[1]} -> {B.shape[0]} features, this "
                    f"base's layer {layer.in_features} -> {layer.out_features}: it was trained on "
                    "another base model. Use adapters of the mixture's base."
                )
            if A.shape[0] > layer.rank:
                raise ValueError(
                    f"Adapter {lora.path}: {name} has rank {A.shape[0]}, above the mixture's rank "
                    f"{layer.rank} (experts share one rank; smaller ones are zero-padded). "
                    "Rebuild the mixture with `lmoe compose` (lmoe.modular.compose) over all its "
                    "adapters and this one: it takes the largest rank. Or train this skill at "
                    f"rank <= {layer.rank}."
                )


def _some(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


# ----------------------------------------------------------- a fixed routing (for merge and export)


def routing_vector(g: Tensor | Mapping[str, Tensor], name: str, E: int) -> Tensor:
    """Layer `name`'s fixed routing (E,) from one vector for all layers or a {layer
    name: (E,)} mapping."""
    if isinstance(g, Mapping):
        if name not in g:
            raise ValueError(
                f"No routing vector for layer {name!r}: pass one (E,) tensor for all layers, or "
                "one per lmoe layer (names as in lmoe.lmoe_layers(model)), e.g. "
                "mean_routing(record)."
            )
        g = g[name]
    g = torch.as_tensor(g)
    if g.shape != (E,) or bool((g < 0).any()):
        raise ValueError(
            f"The routing vector for {name!r} has shape {tuple(g.shape)}; expected ({E},), {E} "
            "non-negative weights, one per expert: one skill's weights or mean_routing(record)."
        )
    return g
