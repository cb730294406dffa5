"""What train() checks before it loads anything (the data files, warm-up), and what a run that
fails before its first step leaves behind (nothing)."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from ..data.benchmarks import root, task_names
from .config import TrainConfig

logger = logging.getLogger(__name__)


def check_inputs(cfg: TrainConfig) -> None:
    """The data and eval_data files exist and the benchmarks are known, before the model loads; a
    warm-up as long as the run is worth a warning."""
    for name in ("data", "eval_data"):
        for entry in getattr(cfg, name):
            if not task_names([entry]) and not Path(entry).is_file():
                raise FileNotFoundError(
                    f"TrainConfig.{name}: data file {entry} does not exist; "
                    f"fix the path or drop it from {name}."
                )
    if task_names(cfg.data + cfg.eval_data):
        root()  # a missing benchmark package is reported now, not after the base model's scores
    if cfg.warmup_steps >= cfg.steps:
        logger.warning(
            "lmoe: warmup_steps=%d >= steps=%d: the learning rate rises for the whole "
            "run and never decays; set warmup_steps below steps (e.g. warmup_steps=%d).",
            cfg.warmup_steps,
            cfg.steps,
            cfg.steps // 10,
        )


class FirstStepGuard:
    """Context manager around a run's start: if the run fails (or is interrupted) before its first
    step is done, what it created in output_dir goes again: the directory itself (and the parents
    it made) when it did not exist, else only the entries that were not there before. Nothing that
    was there is deleted.

    Set `state` to the run's TrainState once it exists: a step done makes the run's files worth
    keeping. out=None (a process other than the main one) removes nothing."""

    def __init__(self, out: Path | None, start_step: int) -> None:
        self.out, self.start_step, self.state = out, start_step, None
        self.made = None  # the highest directory of out's path that does not exist yet
        for path in [out, *out.parents] if out is not None else []:
            if path.exists():
                break
            self.made = path
        self.before = set(os.listdir(out)) if out is not None and self.made is None else set()

    def __enter__(self) -> "FirstStepGuard":
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        stepped = self.state is not None and self.state.step > self.start_step
        if exc_type is None or self.out is None or stepped:
            return
        if self.made is not None:
            shutil.rmtree(self.made, ignore_errors=True)
            return
        for name in set(os.listdir(self.out)) - self.before:
            path = self.out / name
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
