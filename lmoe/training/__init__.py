"""A training run and its building blocks: config, data, the loop (lmoe.training.loop reads top to
bottom), checkpoints, the metrics log, multi-process setup, the objective, optimizer groups and
temperature annealing.

`from lmoe.training import TrainConfig, train` (imported on first use: the loop
imports transformers)."""


def __getattr__(name: str):
    if name in ("TrainConfig", "train"):
        from . import loop

        return getattr(loop, name)
    raise AttributeError(f"module 'lmoe.training' has no attribute {name!r}")
