"""CompareConfig: what `lmoe compare` trains and scores, read as `lmoe train` reads its settings
(a YAML/JSON file, then key=value overrides), and the TrainConfig of each of its runs."""

from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import is_number
from ..data.benchmarks import task_names
from ..models import BUILTIN
from ..settings import apply_overrides, check_known_keys, flatten_settings, read_config_file
from ..training.config import TrainConfig

# What a mixture may set besides lmoe.*: knobs that only routers read, so the LoRA has no twin.
MIXTURE_KEYS = ("router_lr_scale", "temperature_start", "temperature_anneal_steps")
# What compare sets for every run alike: `train` may not set these (the comparison would differ).
SHARED_KEYS = frozenset(
    {"model", "data", "eval_data", "steps", "lr", "batch_size", "seed", "output_dir", "lmoe"}
    | {"init_adapter", "train_experts", "frozen_experts", "recipe", "compare_base", *MIXTURE_KEYS}
)
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _help(text: str) -> dict:
    return {"help": text}


@dataclass
class CompareConfig:
    """`lmoe compare`: a LoRA of equal trainable parameters against one or more mixtures, on the
    same data, data order, steps, learning rate and seeds, scored item by item on held-out data."""

    model: str = field(default=BUILTIN, metadata=_help("'builtin' or a model directory / hub id"))
    data: list[str] = field(
        default_factory=list,
        metadata=_help("training files or bench:NAME entries (empty: the built-in mixture)"),
    )
    eval_data: list[str] = field(
        default_factory=list,
        metadata=_help("held-out files scored item by item (benchmarks: their test side)"),
    )
    held_out_fraction: float = field(
        default=0.0,
        metadata=_help("> 0 without eval_data: hold out this share of each data file (by hash)"),
    )
    steps: int = field(default=TrainConfig.steps, metadata=_help("optimizer steps of every run"))
    lr: float = field(default=TrainConfig.lr, metadata=_help("learning rate of every run"))
    batch_size: int = field(default=TrainConfig.batch_size, metadata=_help("examples per step"))
    seeds: list[int] = field(
        default_factory=lambda: [0, 1, 2],
        metadata=_help("one run per method and seed (init and data order)"),
    )
    mixtures: dict[str, dict] = field(
        default_factory=lambda: {"default": {}},
        metadata=_help(
            "name -> lmoe.* settings, e.g. {top2: {lmoe.router: topk, lmoe.top_k: 2}} "
            "(on the command line: mixtures.top2.lmoe.router=topk); {}: lmoe train's default"
        ),
    )
    lora_target_modules: list[str] | None = field(
        default=None, metadata=_help("the LoRA's target modules (null: each mixture's)")
    )
    lora_rank: int | None = field(
        default=None,
        metadata=_help("the LoRA's rank (null: the rank nearest each mixture's trainable count)"),
    )
    base: bool = field(
        default=False,
        metadata=_help(
            "also score the base model alone on the same items: each method's paired difference "
            "from it is what training gained or forgot"
        ),
    )
    train: dict[str, Any] = field(
        default_factory=dict,
        metadata=_help("other TrainConfig settings for every run, e.g. train.max_length=256"),
    )
    output_dir: str = field(
        default="runs/compare",
        metadata=_help("where runs, compare.json and compare.md go; finished runs are kept"),
    )

    def __post_init__(self) -> None:
        for name in ("data", "eval_data"):
            if isinstance(getattr(self, name), str):
                setattr(self, name, [getattr(self, name)])
        if isinstance(self.seeds, int) and not isinstance(self.seeds, bool):
            self.seeds = [self.seeds]
        _check(
            self,
            "seeds",
            isinstance(self.seeds, list)
            and self.seeds
            and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in self.seeds)
            and len(set(self.seeds)) == len(self.seeds),
            "a list of distinct integers >= 0, e.g. [0, 1, 2]",
        )
        _check(
            self,
            "held_out_fraction",
            is_number(self.held_out_fraction) and 0 <= self.held_out_fraction < 1,
            "a number in [0, 1)",
        )
        _check(
            self,
            "lora_rank",
            self.lora_rank is None or isinstance(self.lora_rank, int) and self.lora_rank >= 1,
            "null or an integer >= 1",
        )
        if isinstance(self.lora_target_modules, str):
            self.lora_target_modules = [self.lora_target_modules]
        _check(self, "train", isinstance(self.train, dict), "a mapping of TrainConfig settings")
        clash = sorted(SHARED_KEYS & set(self.train))
        if clash:
            raise ValueError(
                f"CompareConfig.train sets {', '.join(clash)}: compare sets those itself (same for "
                "every run; mixture settings go in mixtures). Give them as top-level settings."
            )
        self.mixtures = mixture_settings(self.mixtures)
        self._check_held_out()
        self.base_config(0, "check")  # the shared settings and each mixture are valid TrainConfigs
        for name in self.mixtures:
            self.mixture_config(name, 0, "check")

    def _check_held_out(self) -> None:
        files = [d for d in self.data if not task_names([d])]
        if files and not self.eval_data and not self.held_out_fraction:
            raise ValueError(
                f"CompareConfig: data {files} has no held-out side; give eval_data=[test.jsonl] "
                "(records the runs never train on), or held_out_fraction=0.2 to hold out a share."
            )
        if self.eval_data and self.held_out_fraction:
            raise ValueError(
                "CompareConfig: eval_data and held_out_fraction both give held-out data; keep one."
            )

    def base_config(self, seed: int, output_dir: str | Path, data=None, eval_data=None) -> dict:
        """The TrainConfig fields every run shares (as a dict: lmoe.* not yet set)."""
        shared = {
            "model": self.model,
            "data": list(self.data if data is None else data),
            "eval_data": list(self.eval_data if eval_data is None else eval_data),
            "steps": self.steps,
            "lr": self.lr,
            "batch_size": self.batch_size,
            "seed": seed,
            "output_dir": str(output_dir),
            "compare_base": False,
        }
        fields = {**self.train, **shared}
        TrainConfig.from_dict(fields)  # one error line for a bad shared setting
        return fields

    def mixture_config(self, name: str, seed: int, output_dir, **data) -> TrainConfig:
        """The TrainConfig of mixture `name`'s run at seed."""
        try:
            return TrainConfig.from_dict(
                with_settings(self.base_config(seed, output_dir, **data), self.mixtures[name])
            )
        except ValueError as err:
            raise ValueError(f"CompareConfig.mixtures.{name}: {err}") from err

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CompareConfig:
        return cls(**check_known_keys(cls, data))

    @classmethod
    def from_file(cls, path: str | Path | None, overrides: list[str] = ()) -> CompareConfig:
        """A YAML or JSON file (or None) plus "dotted.key=value" overrides, as `lmoe train`'s."""
        return cls.from_dict(apply_overrides(read_config_file(path), overrides))


def mixture_settings(mixtures: Any) -> dict[str, dict[str, Any]]:
    """name -> {dotted TrainConfig key: value}, from nested ({lmoe: {router: topk}}) or dotted
    ({lmoe.router: topk}) mappings."""
    if not isinstance(mixtures, dict) or not mixtures:
        raise ValueError(
            f"CompareConfig.mixtures={mixtures!r}: expected a mapping of names to lmoe.* settings, "
            "e.g. {softmax: {}, top2: {lmoe.router: topk, lmoe.top_k: 2}}."
        )
    parsed = {}
    for name, settings in mixtures.items():
        if not NAME.match(str(name)) or str(name).startswith("lora_") or name == "base":
            raise ValueError(
                f"CompareConfig.mixtures: name {name!r} is invalid: letters, digits, '_', '.', '-' "
                "(not starting with 'lora_', the baseline's prefix, nor 'base', the base model's)."
            )
        if not isinstance(settings, dict | None):
            raise ValueError(
                f"CompareConfig.mixtures.{name}={settings!r}: expected a mapping of lmoe.* "
                "settings, e.g. {lmoe.router: topk}."
            )
        flat = flatten_settings(settings or {})
        wrong = [k for k in flat if not k.startswith("lmoe.") and k not in MIXTURE_KEYS]
        if wrong:
            raise ValueError(
                f"CompareConfig.mixtures.{name} sets {', '.join(wrong)}: a mixture sets lmoe.* "
                f"keys (and {', '.join(MIXTURE_KEYS)}); shared settings go at the top level."
            )
        parsed[str(name)] = flat
    return parsed


def with_settings(data: dict, settings: dict[str, Any]) -> dict:
    """data (copied) with each dotted key of settings set in its nested section."""
    data = copy.deepcopy(data)
    for key, value in settings.items():
        node, parts = data, key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return data


def _check(cfg: Any, name: str, ok: bool, expected: str) -> None:
    if not ok:
        raise ValueError(
            f"CompareConfig.{name}={getattr(cfg, name)!r} is invalid: expected {expected}."
        )
