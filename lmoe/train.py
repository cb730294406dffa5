"""The training loop: frozen base + mixture of LoRA experts, AdamW with warm-up and cosine decay.

Read top to bottom: train() builds everything, then runs steps; each step averages grad_accum
micro-batches, clips, steps the optimizer, logs, and every save_every steps writes a checkpoint
(adapter + optimizer + scheduler + RNG state) that resume() restores exactly.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import random
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm

from .config import LMoEConfig, check_known_keys
from .data import Example, Mixture, batch_stream, collate, encode_all, read_records
from .evaluate import evaluate_file, evaluate_mixture, format_table, write_json
from .inject import AUX_COEFS, aux_loss, aux_losses, count_parameters, inject
from .io import adapter_state_dict, atomic_write, save_adapter
from .models import BUILTIN, load_model

PRECISIONS = ("auto", "no", "bf16", "fp16")
CHECKPOINT, METRICS = "checkpoint.pt", "metrics.csv"
COLUMNS = ["step", "loss", "lm_loss", "aux_loss", *AUX_COEFS, "lr", "grad_norm", "tokens", "tokens_per_s", "elapsed_s"]


def default_lmoe() -> LMoEConfig:
    """The default run's mixture: 4 softmax-routed rank-4 experts on the attention and MLP inputs."""
    return LMoEConfig(num_experts=4, rank=4, alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
                      router="softmax", composition="params")


@dataclass
class TrainConfig:
    """Everything `lmoe train` needs. data empty = the built-in mixture (with a base-vs-trained table)."""

    model: str = BUILTIN
    data: list[str] = field(default_factory=list)
    eval_data: list[str] = field(default_factory=list)
    output_dir: str = "runs/lmoe"
    lmoe: LMoEConfig = field(default_factory=default_lmoe)
    mixture: Mixture = field(default_factory=Mixture)
    steps: int = 150
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2e-3
    weight_decay: float = 0.0
    warmup_steps: int = 10
    max_grad_norm: float = 1.0
    max_length: int = 128
    seed: int = 0
    precision: str = "auto"
    save_every: int = 50
    compare_base: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.lmoe, dict):
            self.lmoe = LMoEConfig.from_dict(self.lmoe)
        if isinstance(self.mixture, dict):
            self.mixture = Mixture(**check_known_keys(Mixture, self.mixture, "mixture."))
        for name in ("data", "eval_data"):
            if isinstance(getattr(self, name), str):
                setattr(self, name, [getattr(self, name)])
        for name in ("steps", "batch_size", "grad_accum", "max_length"):
            _check(self, name, isinstance(getattr(self, name), int) and getattr(self, name) >= 1, "an integer >= 1")
        for name in ("warmup_steps", "save_every", "seed"):
            _check(self, name, isinstance(getattr(self, name), int) and getattr(self, name) >= 0, "an integer >= 0")
        _check(self, "lr", isinstance(self.lr, (int, float)) and self.lr > 0, "a number > 0")
        for name in ("weight_decay", "max_grad_norm"):
            _check(self, name, isinstance(getattr(self, name), (int, float)) and getattr(self, name) >= 0, "a number >= 0")
        _check(self, "precision", self.precision in PRECISIONS, f"one of {', '.join(PRECISIONS)}")

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
            data = yaml.safe_load(Path(path).read_text()) or {}
            if not isinstance(data, dict):
                raise ValueError(f"Config {path} must be a mapping of fields, got {type(data).__name__}.")
        return cls.from_dict(apply_overrides(data, overrides))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _check(cfg: Any, name: str, ok: bool, expected: str) -> None:
    if not ok:
        raise ValueError(f"TrainConfig.{name}={getattr(cfg, name)!r} is invalid: expected {expected}.")


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
        node[parts[-1]] = yaml.safe_load(value)
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
    records = cfg.mixture.train_records() if not cfg.data else [r for path in cfg.data for r in read_records(path)]
    return encode_all(tokenizer, records, cfg.max_length)


def evaluate_all(model: nn.Module, tokenizer, cfg: TrainConfig) -> dict:
    """The built-in mixture's held-out metrics (when training on it) plus every eval_data file."""
    results = {} if cfg.data else evaluate_mixture(model, tokenizer, cfg.mixture, cfg.max_length)
    for path in cfg.eval_data:
        for metric, values in evaluate_file(model, tokenizer, path, cfg.max_length).items():
            results[f"{metric}:{Path(path).stem}"] = values
    return results


@dataclass
class TrainState:
    """What a checkpoint restores besides the adapter weights."""
    step: int = 0
    elapsed_s: float = 0.0


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, model: nn.Module, optimizer, scheduler, state: TrainState) -> None:
    """Adapter, optimizer, scheduler, RNG and step in one file, written atomically."""
    blob = {"adapter": adapter_state_dict(model), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "rng": rng_state(), "state": dataclasses.asdict(state)}
    atomic_write(path, lambda tmp: torch.save(blob, tmp))


def load_checkpoint(path: Path, model: nn.Module, optimizer, scheduler) -> TrainState:
    if not path.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {path}; train without --resume first "
                                "(checkpoints are written every save_every steps).")
    blob = torch.load(path, map_location="cpu", weights_only=False)  # our own file: holds Python RNG state
    model.load_state_dict(blob["adapter"], strict=False)
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    set_rng_state(blob["rng"])
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
    model: nn.Module
    tokenizer: Any
    adapter_dir: Path
    results: dict  # run name ("base", "trained") -> metric -> task -> value


def train(cfg: TrainConfig, resume: bool = False, on_step: Callable[[dict], None] | None = None) -> TrainResult:
    """Train cfg.lmoe experts on cfg.data (or the built-in mixture); save the adapter; evaluate.

    on_step(row) is called with each step's metrics (the metrics.csv row) on the main process.
    """
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_config.yaml").write_text(cfg.to_yaml())
    torch.manual_seed(cfg.seed)
    accelerator = Accelerator(mixed_precision=mixed_precision(cfg.precision))
    model, tokenizer = load_model(cfg.model)
    examples = training_examples(cfg, tokenizer)
    runs = {}
    if cfg.compare_base:
        runs["base"] = _base_eval(out / "eval_base.json", resume,
                                  lambda: evaluate_all(model.to(accelerator.device), tokenizer, cfg))
    torch.manual_seed(cfg.seed)
    inject(model, cfg.lmoe)
    trainable, total = count_parameters(model)
    accelerator.print(f"lmoe: {len(examples)} training examples; trainable params {trainable:,} of {total:,}")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg.warmup_steps, cfg.steps))
    model, optimizer = accelerator.prepare(model, optimizer)
    state = load_checkpoint(out / CHECKPOINT, accelerator.unwrap_model(model), optimizer, scheduler) if resume else TrainState()
    log = MetricsLog(out, state.step) if accelerator.is_main_process else None
    _run_steps(cfg, accelerator, model, optimizer, scheduler, examples, tokenizer.pad_token_id, state, log, on_step)
    model = accelerator.unwrap_model(model)
    adapter_dir = save_adapter(model, out / "adapter") if accelerator.is_main_process else out / "adapter"
    runs["trained"] = evaluate_all(model, tokenizer, cfg)
    if accelerator.is_main_process and runs["trained"]:
        write_json(runs, out / "eval.json")
        print(format_table(runs))
    return TrainResult(model, tokenizer, adapter_dir, runs)


def _base_eval(path: Path, resume: bool, compute: Callable[[], dict]) -> dict:
    """The base model's results, kept in the output dir so that --resume does not pay for them again."""
    if resume and path.is_file():
        return json.loads(path.read_text())
    results = compute()
    write_json(results, path)
    return results


def _run_steps(cfg, accelerator, model, optimizer, scheduler, examples, pad_id, state, log, on_step) -> None:
    """Optimizer steps state.step+1 .. cfg.steps; each averages grad_accum micro-batches per process."""
    ranks, rank = accelerator.num_processes, accelerator.process_index
    micro = cfg.grad_accum * ranks  # micro-batches consumed per optimizer step, all processes together
    stream = batch_stream(examples, cfg.batch_size, cfg.seed, start=state.step * micro)
    bar = tqdm(total=cfg.steps, initial=state.step, desc="train", disable=not accelerator.is_main_process)
    model.train()
    while state.step < cfg.steps:
        started = time.perf_counter()
        batches = [next(stream) for _ in range(micro)][rank::ranks]
        lm, aux, terms, tokens = _accumulate(accelerator, model, batches, pad_id)
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm or float("inf"))
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        seconds = time.perf_counter() - started
        state.elapsed_s += seconds
        row = {"step": state.step, "loss": lm + aux, "lm_loss": lm, "aux_loss": aux,
               **{k: terms.get(k, "") for k in AUX_COEFS}, "lr": lr, "grad_norm": float(grad_norm),
               "tokens": tokens, "tokens_per_s": tokens / seconds, "elapsed_s": state.elapsed_s}
        if log is not None:
            log.write(row)
            if on_step is not None:
                on_step(row)
        bar.set_postfix(loss=f"{lm:.3f}", aux=f"{aux:.4f}", tok_s=f"{tokens / seconds:.0f}")
        bar.update()
        if cfg.save_every and (state.step % cfg.save_every == 0 or state.step == cfg.steps):
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                save_checkpoint(Path(cfg.output_dir) / CHECKPOINT, accelerator.unwrap_model(model), optimizer,
                                scheduler, state)
    bar.close()
    if log is not None:
        log.close()


def _accumulate(accelerator, model, batches, pad_id) -> tuple[float, float, dict, int]:
    """Forward + backward of each micro-batch with loss / len(batches); returns the mean losses and tokens."""
    lm_total, aux_total, terms, tokens = 0.0, 0.0, {}, 0
    for i, examples in enumerate(batches):
        batch = {k: v.to(accelerator.device) for k, v in collate(examples, pad_id).items()}
        sync = i == len(batches) - 1  # all-reduce gradients once, after the last micro-batch
        with (accelerator.no_sync(model) if not sync else nullcontext()), accelerator.autocast():
            out = model(**batch)
            aux = aux_loss(accelerator.unwrap_model(model))
            accelerator.backward((out.loss + aux) / len(batches))
        lm_total += out.loss.item() / len(batches)
        aux_total += aux.item() / len(batches)
        for key, value in aux_losses(accelerator.unwrap_model(model)).items():
            terms[key] = terms.get(key, 0.0) + value.item() / len(batches)
        tokens += int(batch["attention_mask"].sum())
    return lm_total, aux_total, terms, tokens
