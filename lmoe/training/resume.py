"""`lmoe train --resume`: the run to continue (its saved config with the file's and the overrides'
values on top), what may differ from it (RESUMABLE), and the checkpoint it continues from."""

from __future__ import annotations

from pathlib import Path

from ..config import AUX_COEFS
from ..settings import apply_overrides, flatten_settings, merge_settings, read_config_file
from .checkpoint import CHECKPOINT, TrainState, read_checkpoint
from .config import SAVED_CONFIG, TrainConfig

# What --resume may change (dotted keys); any other difference from the run's saved config is
# refused: the checkpoint's weights, optimizer state and data position continue that run only.
RESUMABLE = frozenset(
    {
        "steps",  # more steps (not fewer than done); the cosine schedule stretches to the new total
        "save_every",  # when checkpoints are written
        # what is scored, not what is trained on
        "eval_every",
        "eval_data",
        "eval_group",
        "eval_max_answer_tokens",
        "compare_base",
        "max_bad_steps",  # when NaN/inf steps stop the run
        "gradient_checkpointing",  # recomputes activations (same dropout masks): memory, not math
        "output_dir",  # a moved run: it is read from where it is now
        # per process: the loop refuses a change of batch_size x processes (data read)
        "batch_size",
        # the loss weights: the checkpoint's tensors do not depend on them (its
        # mixture check allows it)
        *(f"lmoe.{coef}" for coef in AUX_COEFS.values()),
    }
)


def resume_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """`lmoe train --resume`: the saved config of the run in output_dir (the file's or the
    overrides' output_dir, else the default) with the file's and the overrides' values on top."""
    given = apply_overrides(read_config_file(path), overrides, TrainConfig)
    output_dir = given.get("output_dir", TrainConfig.output_dir)
    saved = read_saved_config(output_dir)
    # the run is where it is now (its saved output_dir may name where it was before a move)
    return TrainConfig.from_dict({**merge_settings(saved, given), "output_dir": output_dir})


def read_saved_config(output_dir: str | Path) -> dict:
    """The fields of the run in output_dir, as it saved them (--resume continues that run)."""
    path = Path(output_dir) / SAVED_CONFIG
    if not path.is_file():
        raise FileNotFoundError(
            f"--resume: no run to continue in {output_dir} ({SAVED_CONFIG} is "
            "missing); give the output_dir of the run to continue, or train "
            "without --resume first."
        )
    return read_config_file(path)


def check_resumable(saved: TrainConfig, asked: TrainConfig) -> None:
    """--resume continues the saved run: refuse every difference but RESUMABLE's, naming both
    values."""
    before, after = flatten_settings(saved.to_dict()), flatten_settings(asked.to_dict())
    changed = [
        key
        for key in sorted(before.keys() | after.keys())
        if before.get(key) != after.get(key) and key not in RESUMABLE
    ]
    if changed:
        both = ", ".join(f"{k}={before.get(k)!r} there, {after.get(k)!r} here" for k in changed)
        free = ", ".join(sorted(RESUMABLE))
        raise ValueError(
            f"--resume: {both}: the run in {asked.output_dir} ({SAVED_CONFIG}) cannot continue "
            f"with another value. Drop those settings to continue it (only {free} may change), or "
            "train into a new output_dir."
        )


def resume_point(cfg: TrainConfig) -> dict:
    """The checkpoint of the run in cfg.output_dir, once cfg is known to continue that run: it may
    differ from the run's saved config only where RESUMABLE allows. Reads files, writes none."""
    out = Path(cfg.output_dir)
    check_resumable(TrainConfig.from_dict(read_saved_config(out)), cfg)
    checkpoint = read_checkpoint(out / CHECKPOINT)
    step = checkpoint["state"]["step"]
    if cfg.steps < step:
        raise ValueError(
            f"--resume: steps={cfg.steps} is below the checkpoint's step {step} in "
            f"{out}; give steps={step} or more (the run's are in {SAVED_CONFIG})."
        )
    return checkpoint


def check_global_batch(state: TrainState, global_batch: int, ranks: int) -> None:
    """A resumed run reads the data where the checkpoint stopped: only with its global batch."""
    if state.global_batch and state.global_batch != global_batch:
        raise ValueError(
            f"--resume: the checkpoint was trained on global batches of {state.global_batch} "
            f"examples (batch_size x processes), this run makes {global_batch} ({ranks} "
            f"processes); set batch_size={state.global_batch // ranks} so that the data continues "
            "where it stopped."
        )
