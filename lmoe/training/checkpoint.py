"""Training checkpoints: adapter + optimizer + scheduler + TrainState in one file, written whole by
the main process and restored into any number of processes; --resume refuses a checkpoint
of another mixture."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from accelerate.utils import extract_model_from_parallel
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from ..config import LMoEConfig
from ..inject import AUX_COEFS, get_config
from ..io import load_state, save_state

CHECKPOINT = "checkpoint.pt"


@dataclass
class TrainState:
    """What a checkpoint restores besides the adapter weights; independent of the
    number of processes."""

    step: int = 0
    elapsed_s: float = 0.0
    batches: int = 0  # global batches (batch_size x processes examples each) consumed so far
    global_batch: int = 0  # examples per global batch, 0 before the first step


# whole (unsharded) tensors on the CPU, trainable ones only: what a checkpoint and
# the gathered model hold
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)


def save_checkpoint(
    path: Path, model: nn.Module, optimizer, scheduler, state: TrainState, main: bool = True
) -> None:
    """Adapter, optimizer, scheduler and step in one file, written atomically by the main process.

    Every process calls it: the adapter and optimizer state are gathered whole (keyed by parameter
    name, unsharded), so any number of processes can resume from the file.
    """
    adapter, optim = get_state_dict(model, optimizer, options=FULL)
    adapter = one_name_per_tensor(model, adapter)
    if main:
        save_state(
            path,
            {
                "adapter": adapter,
                "optimizer": optim,
                "scheduler": scheduler.state_dict(),
                "state": dataclasses.asdict(state),
                "lmoe": mixture_of(model).to_dict(),
            },
        )


def one_name_per_tensor(model: nn.Module, state: dict) -> dict:
    """state without the extra names of shared tensors (LD-MoLE's lambda heads sit under every
    layer's path, and FSDP loads a sharded tensor under one name only): the names
    model.named_parameters() gives."""
    module = extract_model_from_parallel(model)
    names = {n for n, _ in module.named_parameters()} | {n for n, _ in module.named_buffers()}
    return {key: value for key, value in state.items() if key in names}


def mixture_of(model: nn.Module) -> LMoEConfig:
    return get_config(extract_model_from_parallel(model))


def check_same_mixture(saved: dict | None, current: dict) -> None:
    """--resume continues the checkpoint's mixture: every LMoEConfig field but the loss weights must
    match (a checkpoint written before the mixture was recorded in it is not checked)."""
    if saved is None:
        return
    free = set(AUX_COEFS.values())  # a loss weight may be changed on resume
    diff = [key for key in current if key not in free and saved.get(key) != current[key]]
    if diff:
        raise ValueError(
            "--resume: the checkpoint holds another mixture than this run asks for: "
            + ", ".join(f"lmoe.{k}={saved.get(k)!r} there, {current[k]!r} here" for k in diff)
            + ". Resume with the checkpoint's lmoe settings (train_config.yaml in the output "
            "directory holds them) or train into a new output_dir."
        )


def read_checkpoint(path: Path) -> dict:
    """The checkpoint --resume continues, checksum verified (read before the model loads: a missing
    or damaged one stops the run at once)."""
    if not path.is_file():
        raise FileNotFoundError(
            f"--resume: no checkpoint at {path}; train without --resume "
            "first (checkpoints are written every save_every steps, at the "
            "last step and on an interrupt)."
        )
    return load_state(path)  # weights_only: nothing in the file can run code


def load_checkpoint(blob: dict, model: nn.Module, optimizer, scheduler) -> TrainState:
    """Restore read_checkpoint's blob into the model, optimizer and scheduler; returns its
    TrainState."""
    check_same_mixture(blob.get("lmoe"), mixture_of(model).to_dict())
    set_state_dict(
        model,
        optimizer,
        model_state_dict=one_name_per_tensor(model, blob["adapter"]),
        optim_state_dict=blob["optimizer"],
        options=StateDictOptions(full_state_dict=True, strict=False),
    )
    scheduler.load_state_dict(blob["scheduler"])  # no RNG state: seed_step reseeds every step
    # the next step's learning rate from this run's schedule (resumed with more steps: the longer
    # one's), not the rate the checkpoint's run set for it at the end of its last step
    scheduler.last_epoch -= 1
    scheduler.step()
    return TrainState(**blob["state"])
