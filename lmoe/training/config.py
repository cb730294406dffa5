"""TrainConfig: everything `lmoe train` needs, validated when built; YAML/JSON files, key=value "
"overrides, recipes."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..config import LMoEConfig, is_number
from ..data.builtin import Mixture
from ..data.choices import MultipleChoice
from ..evaluation.scoring import MAX_ANSWER_TOKENS
from ..io import CONFIG_FILE, atomic_write, read_adapter_meta, verify_adapter
from ..models import BUILTIN, LOAD_IN, MODEL_HELP
from ..settings import (
    check_known_keys,
    load_settings,
    setting,
)

SAVED_CONFIG = "train_config.yaml"  # in output_dir: the run's settings, which --resume continues
PRECISIONS = ("auto", "no", "bf16", "fp16")
STRATEGIES = ("ddp", "fsdp")  # how several processes (torchrun / accelerate launch) share the work


# The default run's mixture: 4 softmax-routed rank-4 experts on the attention and MLP inputs. A
# partial `lmoe:` section (file or `lmoe.x=...` overrides) changes only the fields it names.
DEFAULT_LMOE = dict(
    num_experts=4,
    rank=4,
    alpha=8,
    target_modules=["q_proj", "v_proj", "up_proj"],
    router="softmax",
    composition="params",
)


# LD-MoLE's released settings (eshentw/LD-MoLE: conf/finetune.yaml, conf/model/*.yaml,
# conf/task/*.yaml, run.sh): label smoothing 0.1, AdamW weight decay 0.1 on experts, routers and
# lambda heads, LoRA dropout 0.1 read by the experts, the gate and the lambda head alike, 8 experts
# of rank 8 (alpha 16) composed by outputs on all seven projections, dynamic routing with load
# balance 1.0. Their learning rate (1e-4 over 3-10 epochs) is left to `lr`.
SEVEN_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RECIPES = {
    "ld-mole": dict(
        label_smoothing=0.1,
        weight_decay=0.1,
        lmoe=dict(
            num_experts=8,
            rank=8,
            alpha=16,
            dropout=0.1,
            router_reads_dropout=True,
            composition="outputs",
            router="dynamic",
            load_balance_coef=1.0,
            target_modules=SEVEN_PROJECTIONS,
        ),
    )
}


def default_lmoe() -> LMoEConfig:
    return LMoEConfig(**DEFAULT_LMOE)


@dataclass
class TrainConfig:
    """Everything `lmoe train` needs. data empty = the built-in mixture (with a base-vs-trained "
    "table)."""

    model: str = setting(BUILTIN, MODEL_HELP)
    data: list[str] = setting(
        factory=list,
        help="training data: JSONL/CSV/JSON/Parquet files and benchmarks (bench:NAME, "
        "bench:all); [] trains on the built-in mixture",
    )
    eval_data: list[str] = setting(
        factory=list,
        help="held-out files and benchmarks scored before and after training (as eval's data)",
    )
    eval_group: str | None = setting(
        None,
        "group the eval_data rows by this key of each row (as eval's group); null: "
        "the row's domain, else the file name",
    )
    eval_max_answer_tokens: int = setting(
        MAX_ANSWER_TOKENS,
        "eval_data chat records: greedy exact match for answers of at most this many "
        "tokens, the longer ones perplexity only; 0: perplexity only (as eval's "
        "max_answer_tokens)",
    )
    output_dir: str = setting(
        "runs/lmoe",
        "where the run writes adapter/, checkpoint.pt, metrics.csv, eval.json and "
        "train_config.yaml",
    )
    lmoe: LMoEConfig = setting(
        factory=default_lmoe,
        help="the mixture (lmoe.LMoEConfig); a partial section changes only the fields it names",
    )
    mixture: Mixture = setting(factory=Mixture, help="the built-in data, read where data is []")
    mc: MultipleChoice = setting(
        factory=MultipleChoice, help="how multiple-choice data trains and is scored"
    )
    steps: int = setting(150, "optimizer steps")
    batch_size: int = setting(8, "examples per micro-batch and process")
    grad_accum: int = setting(1, "micro-batches per optimizer step")
    lr: float = setting(
        2e-3,
        "AdamW's learning rate, after warmup_steps of linear warm-up; cosine decay to 0 at steps",
    )
    router_lr_scale: float = setting(
        1.0, "the routers' parameter group at lr times this, atop lmoe.router_param_scale"
    )
    weight_decay: float = setting(
        0.0, "AdamW's, on every trainable parameter (experts, routers, lambda heads)"
    )
    label_smoothing: float = setting(0.0, "label smoothing of the LM loss")
    temperature_start: float | None = setting(
        None,
        "set: the gates' temperature anneals from it to lmoe.temperature over "
        "temperature_anneal_steps",
    )
    temperature_anneal_steps: int = setting(
        0, "steps of that anneal, 1..steps (0 without temperature_start)"
    )
    warmup_steps: int = setting(10, "steps of linear learning-rate warm-up")
    max_grad_norm: float = setting(1.0, "the gradients' global norm is clipped to this")
    max_length: int = setting(
        128,
        "tokens per example at most, longer ones cut with a warning; 128 here because "
        "the built-in data fits and training time grows with it (eval and analyze take 512: "
        "scoring cuts less)",
    )
    seed: int = setting(0, "seed of the experts' init, the data order and dropout")
    precision: str = setting(
        "auto",
        "auto (bf16 on a GPU that has it, else fp16 on a GPU, full on a CPU), no, bf16 or fp16",
    )
    save_every: int = setting(
        50, "checkpoint.pt every this many steps (and at the last; 0: at the last only)"
    )
    eval_every: int = setting(
        0, "> 0: the held-out answer loss every this many steps (metrics.csv eval_loss)"
    )
    compare_base: bool = setting(
        True, "score the base model before training too: the base-vs-trained table"
    )
    distributed: str = setting(
        "ddp", "ddp or fsdp: how several processes (torchrun / accelerate launch) share the work"
    )
    gradient_checkpointing: bool = setting(
        False, "recompute activations in the backward pass: less memory, more time"
    )
    load_in: str = setting(
        "full",
        "full, or 8bit / 4bit: the base quantised by bitsandbytes (CUDA only), experts in float32",
    )
    max_bad_steps: int = setting(
        5, "stop after this many consecutive steps with a non-finite loss or gradient"
    )
    init_adapter: str | None = setting(
        None,
        "a saved adapter directory to start from (lmoe train's adapter/, lmoe "
        "compose's); its mixture replaces lmoe",
    )
    train_experts: bool = setting(
        True, "false: every expert frozen, only the routers (and lambda heads) learn"
    )
    frozen_experts: list[int] = setting(
        factory=list,
        help="these experts of init_adapter stay frozen, the others and the routers learn",
    )
    recipe: str | None = setting(
        None,
        "ld-mole: the LD-MoLE authors' settings (RECIPES) for every setting left at its default",
    )

    def __post_init__(self) -> None:
        self._apply_recipe()
        self._check_init_adapter()
        if self.init_adapter is not None:
            self.lmoe = adapter_lmoe(self.init_adapter, self.lmoe)
            self._check_frozen_experts()
        elif isinstance(self.lmoe, dict):
            self.lmoe = LMoEConfig.from_dict({**DEFAULT_LMOE, **self.lmoe})
        if isinstance(self.mixture, dict):
            self.mixture = Mixture(**check_known_keys(Mixture, self.mixture, "mixture."))
        if isinstance(self.mc, dict):
            self.mc = MultipleChoice(**check_known_keys(MultipleChoice, self.mc, "mc."))
        for name in ("data", "eval_data"):
            if isinstance(getattr(self, name), str):
                setattr(self, name, [getattr(self, name)])
        for name in ("steps", "batch_size", "grad_accum", "max_length", "max_bad_steps"):
            _check(
                self,
                name,
                isinstance(getattr(self, name), int) and getattr(self, name) >= 1,
                "an integer >= 1",
            )
        for name in ("warmup_steps", "save_every", "eval_every", "seed"):
            _check(
                self,
                name,
                isinstance(getattr(self, name), int) and getattr(self, name) >= 0,
                "an integer >= 0",
            )
        _check(self, "lr", is_number(self.lr) and self.lr > 0, "a finite number > 0")
        _check(
            self,
            "label_smoothing",
            is_number(self.label_smoothing) and 0 <= self.label_smoothing < 1,
            "a number in [0, 1)",
        )
        _check(
            self,
            "router_lr_scale",
            is_number(self.router_lr_scale) and self.router_lr_scale > 0,
            "a finite number > 0",
        )
        for name in ("weight_decay", "max_grad_norm"):
            _check(
                self,
                name,
                is_number(getattr(self, name)) and getattr(self, name) >= 0,
                "a finite number >= 0",
            )
        _check(self, "precision", self.precision in PRECISIONS, f"one of {', '.join(PRECISIONS)}")
        _check(
            self, "distributed", self.distributed in STRATEGIES, f"one of {', '.join(STRATEGIES)}"
        )
        _check(
            self,
            "gradient_checkpointing",
            isinstance(self.gradient_checkpointing, bool),
            "true or false",
        )
        _check(self, "load_in", self.load_in in LOAD_IN, f"one of {', '.join(LOAD_IN)}")
        _check(
            self,
            "eval_group",
            self.eval_group is None or isinstance(self.eval_group, str) and self.eval_group != "",
            "null or the name of a key of the eval_data rows",
        )
        _check(
            self,
            "eval_max_answer_tokens",
            isinstance(self.eval_max_answer_tokens, int) and self.eval_max_answer_tokens >= 0,
            "an integer >= 0 (0: no exact match)",
        )
        self._check_annealing()

    def _check_annealing(self) -> None:
        if self.temperature_start is None:
            _check(
                self,
                "temperature_anneal_steps",
                self.temperature_anneal_steps == 0,
                "0 without temperature_start (the temperature to anneal from)",
            )
            return
        _check(
            self,
            "temperature_start",
            is_number(self.temperature_start) and self.temperature_start > 0,
            "null or a finite number > 0",
        )
        _check(
            self,
            "temperature_anneal_steps",
            isinstance(self.temperature_anneal_steps, int)
            and 1 <= self.temperature_anneal_steps <= self.steps,
            f"an integer in 1..steps ({self.steps})",
        )
        if self.lmoe.router == "dynamic":
            raise ValueError(
                f"TrainConfig.temperature_start={self.temperature_start!r}: lmoe.router=dynamic "
                "has no temperature (sparsegen's lambda sets how sparse it is). Drop "
                "temperature_start, or use lmoe.router=softmax or topk."
            )

    def _apply_recipe(self) -> None:
        """Fill the fields still at their defaults (top level and lmoe.*) from the named recipe."""
        if self.recipe is None:
            return
        _check(self, "recipe", self.recipe in RECIPES, f"null or one of {', '.join(RECIPES)}")
        recipe = RECIPES[self.recipe]
        defaults = {
            f.name: f.default
            for f in dataclasses.fields(self)
            if f.default is not dataclasses.MISSING
        }
        for name, value in recipe.items():
            if name != "lmoe" and getattr(self, name) == defaults[name]:
                setattr(self, name, value)
        if isinstance(
            self.lmoe, LMoEConfig
        ):  # a whole config counts as given where it differs from the default
            self.lmoe = {
                k: v for k, v in self.lmoe.to_dict().items() if v != default_lmoe().to_dict()[k]
            }
        if self.init_adapter is None:
            self.lmoe = {**DEFAULT_LMOE, **recipe["lmoe"], **self.lmoe}

    def _check_init_adapter(self) -> None:
        if isinstance(self.init_adapter, os.PathLike):
            self.init_adapter = os.fspath(self.init_adapter)
        _check(
            self,
            "init_adapter",
            self.init_adapter is None
            or isinstance(self.init_adapter, str)
            and self.init_adapter != "",
            "an adapter directory, or null for fresh experts",
        )
        _check(self, "train_experts", isinstance(self.train_experts, bool), "true or false")
        if not self.train_experts and self.init_adapter is None:
            raise ValueError(
                "TrainConfig.train_experts=false needs init_adapter=DIR: fresh experts start at "
                "zero "
                "and, frozen, would stay there. Give the adapter to start from, or "
                "train_experts=true."
            )
        if isinstance(self.frozen_experts, int) and not isinstance(self.frozen_experts, bool):
            self.frozen_experts = [self.frozen_experts]
        _check(
            self,
            "frozen_experts",
            isinstance(self.frozen_experts, list)
            and all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0
                for i in self.frozen_experts
            )
            and len(set(self.frozen_experts)) == len(self.frozen_experts),
            "a list of distinct expert indices",
        )
        if self.frozen_experts and self.init_adapter is None:
            raise ValueError(
                f"TrainConfig.frozen_experts={self.frozen_experts} needs init_adapter=DIR: it "
                "keeps experts of a saved mixture as they are (e.g. after `lmoe experts add "
                "mixture=MIX fresh=1 out=DIR`). Give the adapter, or drop frozen_experts."
            )
        if self.frozen_experts and not self.train_experts:
            raise ValueError(
                f"TrainConfig.frozen_experts={self.frozen_experts} with train_experts=false: every "
                "expert is frozen already. Drop one of them."
            )

    def _check_frozen_experts(self) -> None:
        E = self.lmoe.num_experts
        _check(
            self,
            "frozen_experts",
            all(i < E for i in self.frozen_experts),
            f"indices of init_adapter's {E} experts, 0 to {E - 1}",
        )
        if self.frozen_experts and self.distributed == "fsdp":
            raise ValueError(
                "TrainConfig.frozen_experts with distributed=fsdp: FSDP shards the stacked "
                "experts that "
                "freezing masks slice by slice. Use distributed=ddp, or train_experts=false."
            )

    def to_dict(self) -> dict[str, Any]:
        # lmoe: the mixture's fields, not PEFT's (an LMoEConfig is a peft.PeftConfig)
        return {**dataclasses.asdict(self), "lmoe": self.lmoe.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        return cls(**check_known_keys(cls, data))

    @classmethod
    def from_file(cls, path: str | Path, overrides: list[str] = ()) -> "TrainConfig":
        """A YAML or JSON file (or None for defaults) plus "dotted.key=value" overrides."""
        return load_settings(cls, path, overrides)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self) -> None:
        """Write output_dir/train_config.yaml, atomically: a resumed run reads it."""
        text = self.to_yaml()
        atomic_write(Path(self.output_dir) / SAVED_CONFIG, lambda tmp: Path(tmp).write_text(text))


def adapter_lmoe(directory: str, given: dict | LMoEConfig) -> LMoEConfig:
    """The mixture of the adapter training starts from. An `lmoe` section (`given`) may only repeat
    its values: a partial one (a dict) names the fields it sets; a whole one counts as unset when
    it is the default."""
    if not (Path(directory) / CONFIG_FILE).is_file():
        raise FileNotFoundError(
            f"TrainConfig.init_adapter={directory!r}: no adapter there ({CONFIG_FILE} is "
            "missing). Pass a directory written by `lmoe train` (OUTPUT_DIR/adapter) or "
            "`lmoe compose`, or drop init_adapter to start from fresh experts."
        )
    verify_adapter(
        directory
    )  # a corrupt adapter stops the run here, not after the base model's evaluation
    saved = LMoEConfig.from_dict(read_adapter_meta(directory)["config"])
    if isinstance(given, LMoEConfig):
        given = {} if given == default_lmoe() else given.to_dict()
    asked = LMoEConfig.from_dict({**saved.to_dict(), **given})
    before, after = saved.to_dict(), asked.to_dict()  # the mixture's fields, not PEFT's
    clash = [
        f"lmoe.{key}={after[key]!r} (the adapter's is {before[key]!r})"
        for key in before
        if after[key] != before[key]
    ]
    if clash:
        raise ValueError(
            f"TrainConfig: init_adapter={directory} brings its own mixture, and the lmoe section "
            f"sets {'; '.join(clash)}. Drop those lmoe keys to train the adapter's mixture, or "
            "drop init_adapter to train fresh experts."
        )
    return saved


def _check(cfg: Any, name: str, ok: bool, expected: str) -> None:
    if not ok:
        raise ValueError(
            f"TrainConfig.{name}={getattr(cfg, name)!r} is invalid: expected {expected}."
        )
