"""Methods given as whole `lmoe train` settings (a bench study's named setting: a list of
TrainConfig overrides, LoRAs among them), run by compare's run_method as compare runs its own.

given_method splits one run's TrainConfig into what compare shares between the runs of a
comparison (CompareConfig: model, data, steps, learning rate, batch size, the seed, every other
setting in `train`) and what the method sets (lmoe.* and the router-only MIXTURE_KEYS), so that
compare builds the same TrainConfig back (tests/compare/test_given.py). A setting with
lmoe.num_experts=1 is a LoRA, as compare's own (one expert always weighted 1); its router-only
settings are left at their defaults, as compare leaves its LoRAs': a one-expert router receives no
gradient, so they change nothing.
"""

from __future__ import annotations

from pathlib import Path

from ..training.config import TrainConfig
from .config import MIXTURE_KEYS, CompareConfig
from .runs import Method

TOP_LEVEL = ("model", "data", "eval_data", "steps", "lr", "batch_size")  # CompareConfig's own
FRESH = ("init_adapter", "train_experts", "frozen_experts")  # compare trains fresh experts


def given_method(train: TrainConfig, name: str, output_dir: str | Path) -> tuple:
    """(CompareConfig, Method) of one run given in full, at train.seed; its trainable count is
    taken from the trained model.

    Args:
        train: the run's settings (a recipe is resolved already; output_dir is run_method's).
        name: the method's name (a study's setting).
        output_dir: the CompareConfig's (run_method is given each run's directory).
    """
    fields, defaults = train.to_dict(), TrainConfig().to_dict()
    fresh = [key for key in FRESH if fields[key] != defaults[key]]
    if fresh:
        raise ValueError(
            f"{name} sets {', '.join(fresh)}: compare trains fresh experts of every method; "
            "leave those at their defaults."
        )
    own = {"lmoe": fields["lmoe"], **{key: fields[key] for key in MIXTURE_KEYS}}
    shared = {key: fields[key] for key in TOP_LEVEL}
    # recipe: resolved in fields; compare_base: compare scores trained runs only
    skipped = {*TOP_LEVEL, *FRESH, *own, "seed", "output_dir", "recipe", "compare_base"}
    rest = {k: v for k, v in fields.items() if k not in skipped and v != defaults[k]}
    settings = {**shared, "seeds": [train.seed], "train": rest, "output_dir": str(output_dir)}
    if train.lmoe.num_experts == 1:
        cfg = CompareConfig.from_dict(settings)
        return cfg, Method(name, "lora", None, own["lmoe"], rank=train.lmoe.rank)
    cfg = CompareConfig.from_dict({**settings, "mixtures": {name: own}})
    return cfg, Method(name, "mixture", None, cfg.mixtures[name])
