"""Processes and devices for training: accelerate's Accelerator (autocast, gloo on CPU), DDP or
FSDP2 (fully_shard) over several processes, and the trained model gathered whole for
saving and evaluation."""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from ..inject import shared_modules
from ..routers import ScaledLinear
from .checkpoint import FULL
from .config import TrainConfig


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    """The processes (torchrun / accelerate launch), the device and autocast; cfg.distributed
    picks the sharding."""
    # accelerate starts gloo on CPU only when told to; under torchrun without a GPU, tell it
    cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    # accelerate keeps one precision per process; forget the last run's so train() can run again
    # with another (a notebook, a sweep). The process group (PartialState) stays.
    AcceleratorState._reset_state()
    return Accelerator(mixed_precision=mixed_precision(cfg.precision), cpu=cpu)


def distribute(cfg: TrainConfig, accelerator: Accelerator, model: nn.Module) -> nn.Module:
    """DDP through accelerate, or with distributed=fsdp and several processes, torch's FSDP2
    (fully_shard): each decoder layer (the model's _no_split_modules), then the root. Mixed
    precision is autocast in both.

    Modules that several decoder layers share (LD-MoLE's lambda heads) belong to the root's unit,
    which stays gathered from the forward through the backward; each layer's unit
    leaves them alone."""
    if cfg.distributed != "fsdp" or accelerator.num_processes == 1:
        return accelerator.prepare_model(model)
    blocks = set(getattr(model, "_no_split_modules", None) or [])
    model.to(accelerator.device)
    for (
        module
    ) in model.modules():  # FSDP shards contiguous tensors only (lora_B is a permuted view)
        for name, p in module.named_parameters(recurse=False):
            if not p.is_contiguous():
                setattr(
                    module,
                    name,
                    nn.Parameter(p.detach().contiguous(), requires_grad=p.requires_grad),
                )
    shared = shared_modules(model)
    if shared:
        model.lmoe_shared = nn.ModuleList(shared)  # a path to them outside every decoder layer
    ignored = {p for module in shared for p in module.parameters()} or None
    for module in list(model.modules()):
        if type(module).__name__ in blocks:
            fully_shard(module, ignored_params=ignored)
    return fully_shard(model)


def mixed_precision(precision: str) -> str:
    """ "auto": bf16 on a GPU that has it, else fp16 on GPU, full precision on CPU."""
    if precision != "auto":
        return precision
    if not torch.cuda.is_available():
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def single_process_model(
    accelerator: Accelerator, model: nn.Module, fresh: Callable[[], nn.Module]
) -> nn.Module:
    """The trained model whole on the main process, for saving and evaluation. Every process calls
    this: FSDP's shards are gathered (collectively) into fresh() there (the base with the run's
    starting adapter, whose frozen experts are not gathered); the others keep their shards."""
    if not isinstance(model, FSDPModule):  # DDP keeps a whole copy in every process
        return accelerator.unwrap_model(model)
    adapter, _ = get_state_dict(
        model, [], options=FULL
    )  # cpu_offload: only the main process receives it
    if not accelerator.is_main_process:
        return model
    whole = fresh()
    whole.load_state_dict(adapter, strict=False)
    return whole.to(accelerator.device)


def clip_grad_norm(accelerator: Accelerator, model: nn.Module, max_norm: float) -> float:
    """Clip the gradients to max_norm (0: no clipping); the norm of all of them, FSDP's shards
    included, as gradients of the weights in use.

    A router stores its parameters divided by its scale c (routers.ScaledLinear), so their gradients
    are c times those of the weights they stand for; counted as stored, the routers would weigh c^2
    times as much in the norm. They are counted divided by c, so the clipping (and, Adam being
    invariant to a gradient's scale, the update) is what routers at c times the
    learning rate get."""
    routers = [m for m in model.modules() if isinstance(m, ScaledLinear) and m.scale != 1]
    scaled = [
        (p, m.scale) for m in routers for p in m.parameters(recurse=False) if p.grad is not None
    ]
    for p, scale in scaled:
        p.grad.div_(scale)
    norm = accelerator.clip_grad_norm_(model.parameters(), max_norm or float("inf"))
    for p, scale in scaled:
        p.grad.mul_(scale)
    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)
