"""The training loop: frozen base + mixture of LoRA experts, AdamW with warm-up and cosine decay.

Read top to bottom: train() builds everything, then runs steps; each step averages grad_accum
micro-batches, clips, steps the optimizer, logs, and every save_every steps writes a checkpoint
(adapter + optimizer + scheduler + step) that resume() restores exactly. Each step reseeds torch from
(seed, step, process): dropout differs between processes, and a resumed run draws what the uninterrupted
one drew.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import os
import random
import re
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import extract_model_from_parallel
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor
from tqdm.auto import tqdm

from .benchmarks import read_data, task_names
from .choices import MultipleChoice, encode_questions
from .compose import freeze_experts
from .config import LMoEConfig, check_known_keys
from .data import IGNORE, Example, Mixture, batch_stream, collate, encode_all, read_records
from .evaluate import (answer_logprobs, evaluate_benchmarks, evaluate_file, evaluate_mixture, format_table,
                       is_choice_file, write_json)
from .inject import (AUX_COEFS, aux_loss, aux_losses, count_parameters, get_config, inject,
                     routing_counts, shared_modules)
from .inject import aux_loss_apart
from .io import CONFIG_FILE, load_adapter, load_state, read_adapter_meta, save_adapter, save_state
from .objective import set_label_smoothing
from .optim import param_groups
from .models import BUILTIN, LOAD_IN, check_context, enable_activation_checkpointing, load_model

logger = logging.getLogger(__name__)
PRECISIONS = ("auto", "no", "bf16", "fp16")
STRATEGIES = ("ddp", "fsdp")  # how several processes (torchrun / accelerate launch) share the work
CHECKPOINT, METRICS, ROUTING_FILE = "checkpoint.pt", "metrics.csv", "routing.json"
ROUTING_SUMMARY = ("mutual_information_bits", "routing_entropy", "top_weight_over_half", "mean_active_experts")
ROUTING_COLUMNS = ["active_experts", "routing_entropy", "top_weight_over_half"]  # means per token and layer
COLUMNS = ["step", "loss", "lm_loss", "aux_loss", *AUX_COEFS, *ROUTING_COLUMNS, "eval_loss", "lr", "grad_norm", "tokens",
           "tokens_per_s", "elapsed_s"]


# The default run's mixture: 4 softmax-routed rank-4 experts on the attention and MLP inputs. A partial
# `lmoe:` section (file or `lmoe.x=...` overrides) changes only the fields it names.
DEFAULT_LMOE = dict(num_experts=4, rank=4, alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
                    router="softmax", composition="params")


# LD-MoLE's released settings (eshentw/LD-MoLE: conf/finetune.yaml, conf/model/*.yaml, conf/task/*.yaml, run.sh):
# label smoothing 0.1, AdamW weight decay 0.1 on experts, routers and lambda heads, LoRA dropout 0.1 read by the
# experts, the gate and the lambda head alike, 8 experts of rank 8 (alpha 16) composed by outputs on all seven
# projections, dynamic routing with load balance 1.0. Their learning rate (1e-4 over 3-10 epochs) is left to `lr`.
SEVEN_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RECIPES = {"ld-mole": dict(label_smoothing=0.1, weight_decay=0.1, lmoe=dict(
    num_experts=8, rank=8, alpha=16, dropout=0.1, router_reads_dropout=True, composition="outputs",
    router="dynamic", load_balance_coef=1.0, target_modules=SEVEN_PROJECTIONS))}


def default_lmoe() -> LMoEConfig:
    return LMoEConfig(**DEFAULT_LMOE)


@dataclass
class TrainConfig:
    """Everything `lmoe train` needs. data empty = the built-in mixture (with a base-vs-trained table)."""

    model: str = BUILTIN
    data: list[str] = field(default_factory=list)
    eval_data: list[str] = field(default_factory=list)
    output_dir: str = "runs/lmoe"
    lmoe: LMoEConfig = field(default_factory=default_lmoe)
    mixture: Mixture = field(default_factory=Mixture)
    mc: MultipleChoice = field(default_factory=MultipleChoice)  # how multiple-choice data trains and is scored
    steps: int = 150
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2e-3
    router_lr_scale: float = 1.0  # the routers' (and lambda heads') learning rate is lr times this
    weight_decay: float = 0.0  # AdamW's, on every trainable parameter (experts, routers, lambda heads)
    label_smoothing: float = 0.0  # of the LM loss (lmoe.objective)
    warmup_steps: int = 10
    max_grad_norm: float = 1.0
    max_length: int = 128
    seed: int = 0
    precision: str = "auto"
    save_every: int = 50
    eval_every: int = 0  # > 0: the held-out answer loss every this many steps (metrics.csv eval_loss)
    compare_base: bool = True
    distributed: str = "ddp"
    gradient_checkpointing: bool = False
    load_in: str = "full"  # "8bit" / "4bit": the base quantised by bitsandbytes (CUDA only), experts in float32
    max_bad_steps: int = 5  # stop after this many consecutive steps with a non-finite loss or gradient
    init_adapter: str | None = None  # a saved adapter directory to start from; its mixture replaces `lmoe`
    train_experts: bool = True  # false: every expert frozen, only the routers (and lambda heads) learn
    recipe: str | None = None  # "ld-mole": the LD-MoLE authors' settings (RECIPES) for every field left at its default

    def __post_init__(self) -> None:
        self._apply_recipe()
        self._check_init_adapter()
        if self.init_adapter is not None:
            self.lmoe = adapter_lmoe(self.init_adapter, self.lmoe)
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
            _check(self, name, isinstance(getattr(self, name), int) and getattr(self, name) >= 1, "an integer >= 1")
        for name in ("warmup_steps", "save_every", "eval_every", "seed"):
            _check(self, name, isinstance(getattr(self, name), int) and getattr(self, name) >= 0, "an integer >= 0")
        _check(self, "lr", _finite(self.lr) and self.lr > 0, "a finite number > 0")
        _check(self, "label_smoothing", _finite(self.label_smoothing) and 0 <= self.label_smoothing < 1,
               "a number in [0, 1)")
        _check(self, "router_lr_scale", _finite(self.router_lr_scale) and self.router_lr_scale > 0, "a finite number > 0")
        for name in ("weight_decay", "max_grad_norm"):
            _check(self, name, _finite(getattr(self, name)) and getattr(self, name) >= 0, "a finite number >= 0")
        _check(self, "precision", self.precision in PRECISIONS, f"one of {', '.join(PRECISIONS)}")
        _check(self, "distributed", self.distributed in STRATEGIES, f"one of {', '.join(STRATEGIES)}")
        _check(self, "gradient_checkpointing", isinstance(self.gradient_checkpointing, bool), "true or false")
        _check(self, "load_in", self.load_in in LOAD_IN, f"one of {', '.join(LOAD_IN)}")

    def _apply_recipe(self) -> None:
        """Fill the fields still at their defaults (top level and lmoe.*) from the named recipe."""
        if self.recipe is None:
            return
        _check(self, "recipe", self.recipe in RECIPES, f"null or one of {', '.join(RECIPES)}")
        recipe = RECIPES[self.recipe]
        defaults = {f.name: f.default for f in dataclasses.fields(self) if f.default is not dataclasses.MISSING}
        for name, value in recipe.items():
            if name != "lmoe" and getattr(self, name) == defaults[name]:
                setattr(self, name, value)
        if isinstance(self.lmoe, LMoEConfig):  # a whole config counts as given where it differs from the default
            self.lmoe = {k: v for k, v in self.lmoe.to_dict().items() if v != default_lmoe().to_dict()[k]}
        if self.init_adapter is None:
            self.lmoe = {**DEFAULT_LMOE, **recipe["lmoe"], **self.lmoe}

    def _check_init_adapter(self) -> None:
        if isinstance(self.init_adapter, os.PathLike):
            self.init_adapter = os.fspath(self.init_adapter)
        _check(self, "init_adapter", self.init_adapter is None or isinstance(self.init_adapter, str) and
               self.init_adapter != "", "an adapter directory, or null for fresh experts")
        _check(self, "train_experts", isinstance(self.train_experts, bool), "true or false")
        if not self.train_experts and self.init_adapter is None:
            raise ValueError("TrainConfig.train_experts=false needs init_adapter=DIR: fresh experts start at zero "
                             "and, frozen, would stay there. Give the adapter to start from, or train_experts=true.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        return cls(**check_known_keys(cls, data))

    @classmethod
    def from_file(cls, path: str | Path, overrides: list[str] = ()) -> "TrainConfig":
        """A YAML or JSON file (or None for defaults) plus "dotted.key=value" overrides (values parsed as YAML)."""
        data = {}
        if path:
            if not Path(path).is_file():
                raise FileNotFoundError(f"Config file {path} does not exist; pass an existing YAML/JSON file to --config.")
            try:
                data = load_yaml(Path(path).read_text()) or {}
            except yaml.YAMLError as err:
                raise ValueError(f"Config {path} is not valid YAML ({err}); fix the file.") from err
            if not isinstance(data, dict):
                raise ValueError(f"Config {path} must be a mapping of fields, got {type(data).__name__}.")
        return cls.from_dict(apply_overrides(data, overrides))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def adapter_lmoe(directory: str, given: dict | LMoEConfig) -> LMoEConfig:
    """The mixture of the adapter training starts from. An `lmoe` section (`given`) may only repeat its
    values: a partial one (a dict) names the fields it sets; a whole one counts as unset when it is the default."""
    if not (Path(directory) / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"TrainConfig.init_adapter={directory!r}: no adapter there ({CONFIG_FILE} is "
                                "missing). Pass a directory written by `lmoe train` (OUTPUT_DIR/adapter) or "
                                "`lmoe compose`, or drop init_adapter to start from fresh experts.")
    saved = LMoEConfig.from_dict(read_adapter_meta(directory)["config"])
    if isinstance(given, LMoEConfig):
        given = {} if given == default_lmoe() else given.to_dict()
    asked = LMoEConfig.from_dict({**saved.to_dict(), **given})
    clash = [f"lmoe.{f.name}={getattr(asked, f.name)!r} (the adapter's is {getattr(saved, f.name)!r})"
             for f in dataclasses.fields(LMoEConfig) if getattr(asked, f.name) != getattr(saved, f.name)]
    if clash:
        raise ValueError(f"TrainConfig: init_adapter={directory} brings its own mixture, and the lmoe section sets "
                         f"{'; '.join(clash)}. Drop those lmoe keys to train the adapter's mixture, or drop "
                         "init_adapter to train fresh experts.")
    return saved


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check(cfg: Any, name: str, ok: bool, expected: str) -> None:
    if not ok:
        raise ValueError(f"TrainConfig.{name}={getattr(cfg, name)!r} is invalid: expected {expected}.")


class _Loader(yaml.SafeLoader):
    """yaml.safe_load's loader, except that 1e-4 and 2E5 are numbers (as in YAML 1.2 and JSON), not strings."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                              list("-+0123456789"))


def load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set "a.b=value" entries in a nested dict (copied); value is parsed as YAML ("3" -> 3, "[a, b]" -> list)."""
    data = json.loads(json.dumps(data))
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"Override {item!r} must look like key=value, e.g. steps=100 or lmoe.num_experts=8.")
        node, parts = data, key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        try:
            node[parts[-1]] = load_yaml(value)
        except yaml.YAMLError as err:
            raise ValueError(f"Override {item!r}: the value is not valid YAML ({err}); quote it or fix it.") from err
    return data


# ---------------------------------------------------------------- pieces of the loop

def warmup_cosine(warmup: int, total: int) -> Callable[[int], float]:
    """LR multiplier: linear from 1/warmup to 1 over `warmup` steps, then cosine decay to 0 at `total`."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return factor


def mixed_precision(precision: str) -> str:
    """"auto": bf16 on a GPU that has it, else fp16 on GPU, full precision on CPU."""
    if precision != "auto":
        return precision
    if not torch.cuda.is_available():
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def training_examples(cfg: TrainConfig, tokenizer) -> list[Example]:
    records = cfg.mixture.train_records() if not cfg.data else [r for path in cfg.data for r in read_data(path)]
    questions = [r for r in records if "choices" in r]  # multiple choice: trained as cfg.mc says
    return (encode_all(tokenizer, [r for r in records if "choices" not in r], cfg.max_length)
            + encode_questions(tokenizer, questions, cfg.mc, cfg.max_length))


def validation_examples(cfg: TrainConfig, tokenizer) -> list[Example]:
    """What eval_every scores: the built-in mixture's held-out conversations and skill items, or the
    answer-perplexity files of eval_data (multiple-choice files are scored at the end only)."""
    if not cfg.eval_every:
        return []
    if not cfg.data:
        records = cfg.mixture.conversations("test") + cfg.mixture.skill_items("test")
    else:
        records = [r for path in cfg.eval_data if not is_choice_file(path) for r in read_records(path)]
    if not records:
        raise ValueError(f"TrainConfig.eval_every={cfg.eval_every} needs held-out data: with your own data, give "
                         "eval_data=[held_out.jsonl] (prompt/completion or chat records), or set eval_every=0.")
    return encode_all(tokenizer, records, cfg.max_length)


@torch.no_grad()
def validation_loss(accelerator: Accelerator, model: nn.Module, examples: list[Example], pad_id: int) -> float:
    """Mean negative log-likelihood per answer token of the held-out examples. Every process scores all of
    them (the same value everywhere; FSDP's forwards need every process anyway)."""
    with accelerator.autocast():
        scores = answer_logprobs(accelerator.unwrap_model(model), examples, pad_id)
    model.train()
    return -sum(logprob for logprob, _ in scores) / max(sum(n for _, n in scores), 1)


def evaluate_all(model: nn.Module, tokenizer, cfg: TrainConfig) -> dict:
    """The built-in mixture's held-out metrics (when training on it), the test split of every benchmark in data
    or eval_data, and every eval_data file."""
    results = {} if cfg.data else evaluate_mixture(model, tokenizer, cfg.mixture, cfg.max_length)
    if task_names(cfg.data + cfg.eval_data):
        results |= evaluate_benchmarks(model, tokenizer, task_names(cfg.data + cfg.eval_data), cfg.mc, cfg.max_length)
    for path in (p for p in cfg.eval_data if not task_names([p])):
        for metric, values in evaluate_file(model, tokenizer, path, cfg.max_length, cfg.mc).items():
            results[f"{metric}:{Path(path).stem}"] = values
    return results


@dataclass
class TrainState:
    """What a checkpoint restores besides the adapter weights; independent of the number of processes."""
    step: int = 0
    elapsed_s: float = 0.0
    batches: int = 0  # global batches (batch_size x processes examples each) consumed so far
    global_batch: int = 0  # examples per global batch, 0 before the first step


def seed_step(seed: int, step: int, rank: int) -> None:
    """Seed torch (CPU and GPUs) for one optimizer step of one process: the processes draw different dropout
    masks, and a resumed run (with any number of processes) draws the masks of the uninterrupted one."""
    torch.manual_seed(random.Random(f"{seed}/{step}/{rank}").getrandbits(63))


FULL = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)


def save_checkpoint(path: Path, model: nn.Module, optimizer, scheduler, state: TrainState, main: bool = True) -> None:
    """Adapter, optimizer, scheduler and step in one file, written atomically by the main process.

    Every process calls it: the adapter and optimizer state are gathered whole (keyed by parameter
    name, unsharded), so any number of processes can resume from the file.
    """
    adapter, optim = get_state_dict(model, optimizer, options=FULL)
    adapter = one_name_per_tensor(model, adapter)
    if main:
        save_state(path, {"adapter": adapter, "optimizer": optim, "scheduler": scheduler.state_dict(),
                          "state": dataclasses.asdict(state), "lmoe": mixture_of(model).to_dict()})


def one_name_per_tensor(model: nn.Module, state: dict) -> dict:
    """state without the extra names of shared tensors (LD-MoLE's lambda heads sit under every layer's path,
    and FSDP loads a sharded tensor under one name only): the names model.named_parameters() gives."""
    module = extract_model_from_parallel(model)
    names = {n for n, _ in module.named_parameters()} | {n for n, _ in module.named_buffers()}
    return {key: value for key, value in state.items() if key in names}


def mixture_of(model: nn.Module) -> LMoEConfig:
    return get_config(extract_model_from_parallel(model))


def check_same_mixture(saved: dict | None, current: dict) -> None:
    """--resume continues the checkpoint's mixture: every LMoEConfig field but the loss weights must match
    (a checkpoint written before the mixture was recorded in it is not checked)."""
    if saved is None:
        return
    free = set(AUX_COEFS.values())  # a loss weight may be changed on resume
    diff = [key for key in current if key not in free and saved.get(key) != current[key]]
    if diff:
        raise ValueError("--resume: the checkpoint holds another mixture than this run asks for: "
                         + ", ".join(f"lmoe.{k}={saved.get(k)!r} there, {current[k]!r} here" for k in diff)
                         + ". Resume with the checkpoint's lmoe settings (train_config.yaml in the output "
                         "directory holds them) or train into a new output_dir.")


def load_checkpoint(path: Path, model: nn.Module, optimizer, scheduler) -> TrainState:
    if not path.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {path}; train without --resume first "
                                "(checkpoints are written every save_every steps).")
    blob = load_state(path)  # checksum verified; weights_only: nothing in the file can run code
    check_same_mixture(blob.get("lmoe"), mixture_of(model).to_dict())
    set_state_dict(model, optimizer, model_state_dict=one_name_per_tensor(model, blob["adapter"]),
                   optim_state_dict=blob["optimizer"],
                   options=StateDictOptions(full_state_dict=True, strict=False))
    scheduler.load_state_dict(blob["scheduler"])  # no RNG state: seed_step reseeds every step
    return TrainState(**blob["state"])


class MetricsLog:
    """metrics.csv (rows after the resumed step are dropped) and TensorBoard when it is installed."""

    def __init__(self, directory: Path, resume_step: int) -> None:
        self.path = directory / METRICS
        rows = []
        if resume_step and self.path.is_file():
            with open(self.path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        with open(self.path, "w", newline="") as f:
            writer = csv.DictWriter(f, COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.board = SummaryWriter(str(directory / "tensorboard"))
        except ImportError:  # tensorboard is optional
            self.board = None

    def write(self, row: dict) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, COLUMNS).writerow(row)
        if self.board is not None:
            for key, value in row.items():
                if key != "step" and value != "":
                    self.board.add_scalar(f"train/{key}", value, row["step"])

    def close(self) -> None:
        if self.board is not None:
            self.board.close()


def read_metrics(directory: str | Path) -> list[dict]:
    """The rows of a run's metrics.csv as dicts of floats ('' for a missing aux term)."""
    with open(Path(directory) / METRICS, newline="") as f:
        return [{k: float(v) if v != "" else "" for k, v in row.items()} for row in csv.DictReader(f)]


# ---------------------------------------------------------------- the loop

@dataclass
class TrainResult:
    """What train() returns. With several processes only the main one evaluates and holds the whole model:
    the others return results={} and their own copy (DDP) or shards (FSDP) of the trained model."""
    model: nn.Module
    tokenizer: Any
    adapter_dir: Path
    results: dict  # run name ("base", "trained") -> metric -> task -> value


def train(cfg: TrainConfig, resume: bool = False, on_step: Callable[[dict], None] | None = None) -> TrainResult:
    """Train cfg.lmoe experts (fresh, or init_adapter's) on cfg.data (or the built-in mixture); save the
    adapter; evaluate. The main process alone evaluates and saves (see TrainResult).

    on_step(row) is called with each step's metrics (the metrics.csv row) on the main process.
    """
    out = Path(cfg.output_dir)
    accelerator = make_accelerator(cfg)
    main = accelerator.is_main_process
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.yaml").write_text(cfg.to_yaml())
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_model(cfg.model, load_in=cfg.load_in)
    check_context(model, cfg.max_length)
    set_label_smoothing(model, cfg.label_smoothing)
    examples, held_out = training_examples(cfg, tokenizer), validation_examples(cfg, tokenizer)
    runs = {}
    if cfg.compare_base:
        model.to(accelerator.device)  # in every process: the experts are then drawn on the same device everywhere
        if main:  # the others wait at the first collective of training
            runs["base"] = _base_eval(out / "eval_base.json", resume, lambda: evaluate_all(model, tokenizer, cfg))
    add_adapter(model, cfg)
    if cfg.gradient_checkpointing:
        enable_activation_checkpointing(model)
    trainable, total = count_parameters(model)
    accelerator.print(f"lmoe: {len(examples)} training examples; trainable params {trainable:,} of {total:,}")
    model = distribute(cfg, accelerator, model)  # before the optimizer: FSDP replaces the parameters
    optimizer = torch.optim.AdamW(param_groups(model, cfg.lr, cfg.router_lr_scale), weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg.warmup_steps, cfg.steps))
    optimizer = accelerator.prepare_optimizer(optimizer)
    state = load_checkpoint(out / CHECKPOINT, model, optimizer, scheduler) if resume else TrainState()
    log = MetricsLog(out, state.step) if main else None
    score = (lambda: validation_loss(accelerator, model, held_out, tokenizer.pad_token_id)) if held_out else None
    _run_steps(cfg, accelerator, model, optimizer, scheduler, examples, tokenizer.pad_token_id, state, log, on_step,
               score)
    model = _save_and_evaluate(cfg, accelerator, model, tokenizer, runs)
    return TrainResult(model, tokenizer, out / "adapter", runs)


def _save_and_evaluate(cfg: TrainConfig, accelerator: Accelerator, model: nn.Module, tokenizer,
                       runs: dict) -> nn.Module:
    """Save the adapter and add runs["trained"], on the main process with the whole model; others only wait.
    Returns this process's model."""
    model = _single_process_model(cfg, accelerator, model)
    if accelerator.is_main_process:
        out = Path(cfg.output_dir)
        save_adapter(model, out / "adapter")
        runs["trained"] = evaluate_all(model, tokenizer, cfg)
        if not cfg.data and (cfg.mixture.skills or cfg.mixture.domains):
            runs["trained"]["routing"] = held_out_routing(model, tokenizer, cfg, out / ROUTING_FILE)
        if runs["trained"]:
            write_json(runs, out / "eval.json")
            print(format_table(runs))
    accelerator.wait_for_everyone()  # the adapter is on disk when train() returns in any process
    return model


def held_out_routing(model: nn.Module, tokenizer, cfg: TrainConfig, path: Path) -> dict[str, float]:
    """How the routing specialises on the answer tokens of the built-in mixture's held-out data, averaged over
    layers (I(skill/domain; expert) in bits, entropy / log E, ...); written whole, per layer, to path."""
    from .analysis import held_out_specialisation  # plotting libraries: imported only when used
    result = held_out_specialisation(model, tokenizer, cfg.mixture, cfg.max_length)
    write_json(result, path)
    return {key: result[key] for key in ROUTING_SUMMARY}


def add_adapter(model: nn.Module, cfg: TrainConfig) -> None:
    """The mixture training starts from: the saved init_adapter, or fresh experts seeded alike in every
    process; train_experts=False then freezes every expert, so only the routers learn."""
    if cfg.init_adapter:
        load_adapter(model, cfg.init_adapter)
    else:
        torch.manual_seed(cfg.seed)
        inject(model, cfg.lmoe)
    if not cfg.train_experts:
        freeze_experts(model)


def _base_eval(path: Path, resume: bool, compute: Callable[[], dict]) -> dict:
    """The base model's results (main process), kept in the output dir so that --resume does not pay again."""
    if resume and path.is_file():
        return json.loads(path.read_text())
    results = compute()
    write_json(results, path)
    return results


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    """The processes (torchrun / accelerate launch), the device and autocast; cfg.distributed picks the sharding."""
    # accelerate starts gloo on CPU only when told to; under torchrun without a GPU, tell it
    cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    # accelerate keeps one precision per process; forget the last run's so train() can run again with
    # another (a notebook, a sweep). The process group (PartialState) stays.
    AcceleratorState._reset_state()
    return Accelerator(mixed_precision=mixed_precision(cfg.precision), cpu=cpu)


def distribute(cfg: TrainConfig, accelerator: Accelerator, model: nn.Module) -> nn.Module:
    """DDP through accelerate, or with distributed=fsdp and several processes, torch's FSDP2 (fully_shard):
    each decoder layer (the model's _no_split_modules), then the root. Mixed precision is autocast in both.

    Modules that several decoder layers share (LD-MoLE's lambda heads) belong to the root's unit, which
    stays gathered from the forward through the backward; each layer's unit leaves them alone."""
    if cfg.distributed != "fsdp" or accelerator.num_processes == 1:
        return accelerator.prepare_model(model)
    blocks = set(getattr(model, "_no_split_modules", None) or [])
    model.to(accelerator.device)
    for module in model.modules():  # FSDP shards contiguous tensors only (lora_B is a permuted view)
        for name, p in module.named_parameters(recurse=False):
            if not p.is_contiguous():
                setattr(module, name, nn.Parameter(p.detach().contiguous(), requires_grad=p.requires_grad))
    shared = shared_modules(model)
    if shared:
        model.lmoe_shared = nn.ModuleList(shared)  # a path to them outside every decoder layer
    ignored = {p for module in shared for p in module.parameters()} or None
    for module in list(model.modules()):
        if type(module).__name__ in blocks:
            fully_shard(module, ignored_params=ignored)
    return fully_shard(model)


def _single_process_model(cfg: TrainConfig, accelerator: Accelerator, model: nn.Module) -> nn.Module:
    """The trained model whole on the main process, for saving and evaluation. Every process calls this:
    FSDP's shards are gathered (collectively) into a freshly loaded base there; the others keep their shards."""
    if not isinstance(model, FSDPModule):  # DDP keeps a whole copy in every process
        return accelerator.unwrap_model(model)
    adapter, _ = get_state_dict(model, [], options=FULL)  # cpu_offload: only the main process receives it
    if not accelerator.is_main_process:
        return model
    whole, _ = load_model(cfg.model)
    add_adapter(whole, cfg)  # the frozen experts (not gathered) come from init_adapter
    whole.load_state_dict(adapter, strict=False)
    return whole.to(accelerator.device)


def _run_steps(cfg, accelerator, model, optimizer, scheduler, examples, pad_id, state, log, on_step,
               score: Callable[[], float] | None = None) -> None:
    """Optimizer steps state.step+1 .. cfg.steps; each averages grad_accum micro-batches per process.
    score: the held-out loss, logged every cfg.eval_every steps."""
    ranks, rank = accelerator.num_processes, accelerator.process_index
    global_batch = cfg.batch_size * ranks  # each process takes a disjoint slice of every global batch
    _check_global_batch(state, global_batch, ranks)
    stream = batch_stream(examples, global_batch, cfg.seed, start=state.batches)
    bar = tqdm(total=cfg.steps, initial=state.step, desc="train", disable=not accelerator.is_main_process)
    bad = skipped = 0  # steps with a NaN/inf loss or gradient: in a row, and in this run
    model.train()
    while state.step < cfg.steps:
        started = time.perf_counter()
        seed_step(cfg.seed, state.step, rank)
        batches = [next(stream)[rank::ranks] for _ in range(cfg.grad_accum)]
        lm, aux, terms, tokens = _accumulate(accelerator, model, batches, pad_id)
        state.batches, state.global_batch = state.batches + cfg.grad_accum, global_batch
        grad_norm = float(_clip_grad_norm(accelerator, model, cfg.max_grad_norm))
        lr = scheduler.get_last_lr()[0]
        finite = math.isfinite(lm + aux) and math.isfinite(grad_norm)  # both on the host already
        if finite:
            optimizer.step()
        bad, skipped = (0, skipped) if finite else _skip_step(cfg, state.step + 1, bad + 1, skipped + 1)
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        seconds = time.perf_counter() - started
        state.elapsed_s += seconds
        row = {"step": state.step, "loss": lm + aux, "lm_loss": lm, "aux_loss": aux,
               **{k: terms.get(k, "") for k in AUX_COEFS}, **{k: terms[k] for k in ROUTING_COLUMNS},
               "lr": lr, "grad_norm": grad_norm,
               "tokens": tokens, "tokens_per_s": tokens / seconds, "elapsed_s": state.elapsed_s}
        if score is not None and state.step % cfg.eval_every == 0:
            row["eval_loss"] = score()
        if log is not None:
            log.write(row)
            if on_step is not None:
                on_step(row)
        bar.set_postfix(loss=f"{lm:.3f}", aux=f"{aux:.4f}", experts=f"{terms['active_experts']:.2f}",
                        H=f"{terms['routing_entropy']:.2f}", tok_s=f"{tokens / seconds:.0f}")
        bar.update()
        if finite and cfg.save_every and (state.step % cfg.save_every == 0 or state.step == cfg.steps):
            save_checkpoint(Path(cfg.output_dir) / CHECKPOINT, model, optimizer, scheduler, state,
                            accelerator.is_main_process)
            accelerator.wait_for_everyone()
    bar.close()
    if log is not None:
        log.close()


def _clip_grad_norm(accelerator: Accelerator, model: nn.Module, max_norm: float) -> float:
    """Clip the gradients to max_norm (0: no clipping); the norm of all of them, FSDP's shards included."""
    norm = accelerator.clip_grad_norm_(model.parameters(), max_norm or float("inf"))
    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)


def _check_global_batch(state: TrainState, global_batch: int, ranks: int) -> None:
    if state.global_batch and state.global_batch != global_batch:
        raise ValueError(
            f"--resume: the checkpoint was trained on global batches of {state.global_batch} examples "
            f"(batch_size x processes), this run makes {global_batch} ({ranks} processes); set "
            f"batch_size={state.global_batch // ranks} so that the data continues where it stopped.")


class NonFiniteLoss(ValueError):
    """max_bad_steps steps in a row had a NaN/inf loss or gradient; the last good checkpoint is kept."""


def _skip_step(cfg: TrainConfig, step: int, bad: int, skipped: int) -> tuple[int, int]:
    """Log a step whose update was dropped for a NaN/inf loss or gradient; stop after max_bad_steps in a row."""
    logger.warning("lmoe: step %d skipped: the loss or gradient is NaN/inf (%d in a row, %d in this run)",
                   step, bad, skipped)
    if bad >= cfg.max_bad_steps:
        checkpoint = Path(cfg.output_dir) / CHECKPOINT
        kept = f"the last good checkpoint {checkpoint} is kept" if checkpoint.is_file() else "no checkpoint was written"
        raise NonFiniteLoss(f"Training stopped at step {step}: the loss or gradient was NaN/inf for {bad} steps in "
                            f"a row (max_bad_steps={cfg.max_bad_steps}); {kept}. Lower lr, check the data, or use "
                            "precision=no, then train again (--resume continues from the checkpoint).")
    return bad, skipped


def _accumulate(accelerator, model, batches, pad_id) -> tuple[float, float, dict, int]:
    """Forward + backward of each micro-batch; returns the step's LM and aux loss, the aux terms and the routing's
    means per token and layer (ROUTING_COLUMNS: experts in use, normalised entropy, share with top weight > 0.5),
    and tokens: all over all processes.

    Each micro-batch's LM loss is its mean over the answer tokens of all processes (as one process
    would compute it on the whole global batch): the local mean is weighted by local / global count,
    times the number of processes because DDP averages gradients. Micro-batches then count equally.
    """
    ranks, model_ = accelerator.num_processes, accelerator.unwrap_model(model)
    batches = [{k: v.to(accelerator.device) for k, v in collate(ex, pad_id).items()} for ex in batches]
    counts = torch.stack([(b["labels"][:, 1:] != IGNORE).sum() for b in batches]).float()  # loss tokens
    weights = ranks * counts / accelerator.reduce(counts.clone(), "sum") / len(batches)
    totals = torch.zeros(7 + len(AUX_COEFS), device=accelerator.device)  # lm, aux, tokens, routing_counts, aux terms
    for i, batch in enumerate(batches):
        sync = i == len(batches) - 1  # all-reduce gradients once, after the last micro-batch
        with (accelerator.no_sync(model) if not sync else nullcontext()), accelerator.autocast(), \
                aux_loss_apart(model_):  # the LM loss alone in out.loss: the aux terms are weighted here
            out = model(**batch)
            aux = aux_loss(model_)
            terms = aux_losses(model_)  # before backward: gradient checkpointing re-runs the layers' forward
            routing = routing_counts(model_)  # (4,) experts used, entropy, confident tokens, (token, layer) pairs
            accelerator.backward(out.loss * weights[i] + aux / len(batches))
        totals += torch.stack([out.loss.detach() * weights[i] / ranks, aux.detach() / len(batches) / ranks,
                               batch["attention_mask"].sum().float(), *routing,
                               *[terms[k].detach() / len(batches) / ranks if k in terms else torch.zeros(())
                                 for k in AUX_COEFS]]).to(totals)
    lm, aux, tokens, *sums = accelerator.reduce(totals, "sum").tolist()  # the one sync of the step
    routing, pairs, values = sums[:3], sums[3], sums[4:]
    stats = {k: v for k, v in zip(AUX_COEFS, values) if k in terms} | \
        {k: v / max(pairs, 1) for k, v in zip(ROUTING_COLUMNS, routing)}
    return lm, aux, stats, int(tokens)
