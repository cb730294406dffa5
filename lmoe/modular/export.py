"""A fixed routing exported as a plain PEFT LoRA adapter: one skill of a mixture, served where LoRA
is (PEFT, vLLM, SGLang). With g fixed every mixture layer is one LoRA: exact, no router left."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from ..inject import get_config, lmoe_layers
from ..io import atomic_write
from ..layer import MoLoRALinear
from .compose import PEFT_CONFIG, PEFT_PREFIX, PEFT_WEIGHTS, routing_vector


def mean_routing(record: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """layer name -> (E,) mean routing weights over the tokens of an lmoe.record_routing record."""
    return {name: weights.float().mean(0) for name, weights in record.items()}


def fixed_lora(layer: MoLoRALinear, g: Tensor) -> tuple[Tensor, Tensor]:
    """The layer with routing fixed at g (E,) as one LoRA (A (r', d_in), B (d_out,
    r')), B A = s Delta W(g).

    outputs: r' = E r, the experts side by side with block i of B scaled by s g_i.
    params: r' = r, A(g) = sum g_i A_i and B(g) = s sum g_i B_i (exact when g does not depend on x).
    """
    g = g.to(device=layer.lora_A.device, dtype=layer.lora_A.dtype)
    if layer.composition == "params":
        A = torch.einsum("e,erd->rd", g, layer.lora_A)
        return A, layer.scaling * torch.einsum("e,eor->or", g, layer.lora_B)
    A, B = layer.stacked()
    return A, B * (layer.scaling * g).repeat_interleave(layer.rank)


VLLM_RANKS = (
    1,
    8,
    16,
    32,
    64,
    128,
    256,
    320,
    512,
)  # the LoRA ranks vLLM serves (its --max-lora-rank choices)


@torch.no_grad()
def export_peft(
    model: nn.Module,
    directory: str | Path,
    g: Tensor | Mapping[str, Tensor],
    rank: int | str | None = None,
) -> Path:
    """Write the mixture with routing fixed at g as a plain PEFT LoRA adapter
    (PeftModel.from_pretrained loads it).

    g: (E,) for every layer (one skill's routing), or layer name -> (E,) (e.g.
    mean_routing(record)).
    rank: None, the LoRA's own (E r for outputs, r for params); an int, or "vllm" (the next rank
    vLLM serves): A and B padded with zeros up to it, which changes no product. Prints the
    --max-lora-rank to serve it with.
    """
    cfg = get_config(model)
    loras = {
        name: fixed_lora(layer, routing_vector(g, name, cfg.num_experts))
        for name, layer in lmoe_layers(model)
    }
    own = max(A.shape[0] for A, _ in loras.values())
    target = padded_rank(own, rank)
    state = {}
    for name, (A, B) in loras.items():
        state[f"{PEFT_PREFIX}{name}.lora_A.weight"] = F.pad(
            A, (0, 0, 0, target - A.shape[0])
        ).contiguous()
        state[f"{PEFT_PREFIX}{name}.lora_B.weight"] = F.pad(
            B, (0, target - B.shape[1])
        ).contiguous()
    conv1d = any(type(layer.base).__name__ == "Conv1D" for _, layer in lmoe_layers(model))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": target,
        "lora_alpha": target,  # scale 1: s is in B
        "target_modules": list(loras),
        "lora_dropout": cfg.dropout,
        "fan_in_fan_out": conv1d,
        "bias": "none",
        "inference_mode": True,
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None),
    }
    directory = Path(directory)
    atomic_write(
        directory / PEFT_WEIGHTS, lambda tmp: save_file(state, tmp, metadata={"format": "pt"})
    )
    atomic_write(
        directory / PEFT_CONFIG,
        lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2) + "\n"),
    )
    serve = next((r for r in VLLM_RANKS if r >= target), target)
    print(
        f"{directory}: PEFT LoRA of rank {target}; serve it with vLLM or SGLang: --enable-lora "
        f"--max-lora-rank {serve}"
    )
    return directory


def padded_rank(own: int, rank: int | str | None) -> int:
    """The exported LoRA's rank: its own, `rank`, or the next one vLLM serves ("vllm")."""
    if rank is None:
        return own
    if rank == "vllm":
        if own > VLLM_RANKS[-1]:
            raise ValueError(
                f"The exported LoRA has rank {own}; vLLM serves ranks up to {VLLM_RANKS[-1]}. "
                "Export fewer experts (remove_experts) or merge it into the base "
                "(lmoe.modular.merge)."
            )
        return next(r for r in VLLM_RANKS if r >= own)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < own:
        raise ValueError(
            f'export_peft(rank={rank!r}): expected None, "vllm" or an integer >= the LoRA\'s own '
            f"rank {own} (zeros pad it; nothing is cut)."
        )
    return rank
