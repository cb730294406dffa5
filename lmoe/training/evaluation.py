"""How a training run is scored: the held-out loss during training, and the base and trained models'
results (built-in mixture, benchmarks, eval_data files, routing specialisation) before and after."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn

from ..data.benchmarks import task_names
from ..data.encoding import Example
from ..evaluation.analysis import held_out_specialisation
from ..evaluation.logprobs import answer_logprobs
from ..evaluation.progress import announce
from ..evaluation.scoring import (
    evaluate_benchmarks,
    evaluate_file,
    evaluate_mixture,
    write_json,
)
from ..inject import lmoe_layers
from .config import TrainConfig

ROUTING_FILE = "routing.json"
ROUTING_SUMMARY = (
    "mutual_information_bits",
    "routing_entropy",
    "top_weight_over_half",
    "effective_support_size",
    "top_expert_share",
    "mean_active_experts",
)


@torch.no_grad()
def validation_loss(
    accelerator: Accelerator, model: nn.Module, examples: list[Example], pad_id: int
) -> float:
    """Mean negative log-likelihood per answer token of the held-out examples. Every process scores
    all of them (the same value everywhere; FSDP's forwards need every process anyway)."""
    with accelerator.autocast():
        scores = answer_logprobs(accelerator.unwrap_model(model), examples, pad_id)
    model.train()
    return -sum(logprob for logprob, _ in scores) / max(sum(n for _, n in scores), 1)


def evaluate_all(model: nn.Module, tokenizer, cfg: TrainConfig) -> dict:
    """The built-in mixture's held-out metrics (when training on it), the test split of every
    benchmark in data or eval_data, and every eval_data file (grouped by cfg.eval_group; exact match
    up to cfg.eval_max_answer_tokens). Says on stderr which model it scores; each phase shows its
    progress."""
    files = [p for p in cfg.eval_data if not task_names([p])]
    tasks = task_names(cfg.data + cfg.eval_data)
    parts = [] if cfg.data else ["the built-in mixture's held-out data"]
    parts += [f"benchmarks {', '.join(tasks)}"] if tasks else []
    parts += [f"eval_data {', '.join(map(str, files))}"] if files else []
    if parts:
        which = "the trained model" if any(True for _ in lmoe_layers(model)) else "the base model"
        announce(f"scoring {which} on {', '.join(parts)}")
    results = {} if cfg.data else evaluate_mixture(model, tokenizer, cfg.mixture, cfg.max_length)
    if tasks:
        results |= evaluate_benchmarks(model, tokenizer, tasks, cfg.mc, cfg.max_length)
    for path in files:
        scored = evaluate_file(
            model,
            tokenizer,
            path,
            cfg.max_length,
            cfg.mc,
            cfg.eval_group,
            cfg.eval_max_answer_tokens,
        )
        for metric, values in scored.items():
            results[f"{metric}:{Path(path).stem}"] = values
    return results


def held_out_routing(model: nn.Module, tokenizer, cfg: TrainConfig, path: Path) -> dict[str, float]:
    """How the routing specialises on the answer tokens of the built-in mixture's held-out data,
    averaged over layers (I(skill/domain; expert) in bits, entropy / log E, effective support size,
    ...); written whole, per layer, to path."""
    result = held_out_specialisation(model, tokenizer, cfg.mixture, cfg.max_length)
    write_json(result, path)
    return {key: result[key] for key in ROUTING_SUMMARY}


def cached_eval(path: Path, resume: bool, compute: Callable[[], dict]) -> dict:
    """The base model's results (main process), kept in the output dir so that --resume does not
    pay again (nothing is written when there is nothing to evaluate)."""
    if resume and path.is_file():
        return json.loads(path.read_text())
    results = compute()
    if results:
        write_json(results, path)
    return results
