"""Building blocks of the modular-skills study (bench/modular.py): the tasks' questions, one
training loop for every model the study trains (PEFT LoRAs, lmoe mixtures, X-LoRA's classifier),
scoring that keeps each question's correctness (for paired differences), and how much of a task's
routing goes to its own expert.

Every model trains as `lmoe train` trains: AdamW, lmoe's defaults (10 warm-up steps, cosine decay,
gradient clipping at 1, no weight decay), the routers at 30x lr through their parameter scale
(LMoEConfig's router_param_scale; recorded before it existed, as a parameter group at 30x), dropout
masks seeded per step.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import nn

from lmoe.data import benchmarks
from lmoe.data.choices import MultipleChoice, encode_questions, requests
from lmoe.data.encoding import Example, batch_stream, collate
from lmoe.evaluation.logprobs import continuation_logprobs
from lmoe.inject import lmoe_layers
from lmoe.routing_record import record_routing
from lmoe.routing_stats import mutual_information
from lmoe.training.loop import seed_step, warmup_cosine
from lmoe.training.optim import param_groups

FORMAT = MultipleChoice(
    "cloze", "plain"
)  # lm-eval's protocol: trains on the choice's text, scores its likelihood
TARGETS = ["q_proj", "v_proj", "up_proj"]
WARMUP, MAX_GRAD_NORM = 10, 1.0  # lmoe train's defaults


# ---------------------------------------------------------------- data


def train_questions(task: str) -> list[dict]:
    """The task's train side (lmoe.data.benchmarks' split policy: never shares a question
    with the test side)."""
    return benchmarks.load(task, "train")


def drawn(records: Sequence[dict], n: int, seed: int) -> list[dict]:
    """n records drawn without replacement (all if fewer), the same for the same seed."""
    return random.Random(seed).sample(list(records), min(n, len(records)))


def examples(tokenizer, records: Iterable[dict], max_length: int) -> list[Example]:
    """Questions as training examples: prompt, then the correct choice's text as the
    answer (cloze, plain)."""
    return encode_questions(tokenizer, list(records), FORMAT, max_length)


# ---------------------------------------------------------------- training


def fit(
    model: nn.Module,
    train: list[Example],
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    pad_id: int,
    router_lr_scale: float = 1.0,
) -> float:
    """Train model's trainable parameters for `steps` batches of `train`; returns the mean
    loss of the last 10."""
    optimizer = torch.optim.AdamW(param_groups(model, lr, router_lr_scale), weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(min(WARMUP, steps // 4), steps)
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    stream = batch_stream(train, batch_size, seed)
    device = next(model.parameters()).device
    losses = []
    model.train()
    for step in range(steps):
        seed_step(seed, step, 0)
        batch = {k: v.to(device) for k, v in collate(next(stream), pad_id).items()}
        loss = model(**batch).loss  # lmoe mixtures: LM loss + their router losses
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, MAX_GRAD_NORM)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    model.eval()
    return statistics.mean(losses[-10:])


# ---------------------------------------------------------------- scoring


@torch.no_grad()
def correct(model: nn.Module, tokenizer, questions: list[dict], max_length: int) -> list[bool]:
    """Per question: does the correct choice get the highest summed
    log-likelihood (lm-eval's acc)?"""
    scores = continuation_logprobs(
        model,
        requests(tokenizer, questions, FORMAT, max_length),
        tokenizer.pad_token_id,
        progress=False,
    )
    return [
        max(range(len(s)), key=s.__getitem__) == q["gold"]
        for q, s in zip(questions, scores, strict=True)
    ]


@torch.no_grad()
def task_usage(
    model: nn.Module, tokenizer, questions: list[dict], max_length: int, batch_size: int = 16
) -> tuple[dict[str, torch.Tensor], int]:
    """Mean routing weights per lmoe layer {name: (E,)} over every real token of the questions
    (prompt and the correct choice, as scored), and the number of tokens."""
    encoded = examples(tokenizer, questions, max_length)
    device = next(model.parameters()).device
    with record_routing(model) as record:
        for start in range(0, len(encoded), batch_size):
            batch = collate(encoded[start : start + batch_size], tokenizer.pad_token_id)
            model(
                input_ids=batch["input_ids"].to(device),
                attention_mask=batch["attention_mask"].to(device),
            )
    tokens = sum(len(e.input_ids) for e in encoded)
    return {name: record[name].double().mean(0) for name in record}, tokens


def own_expert_share(usage: dict[str, dict[str, torch.Tensor]], own: dict[str, int]) -> dict:
    """How much of each task's routing weight goes to its own expert (own[task]: its index), per
    layer and averaged over layers, the mean over tasks; usage: task -> layer ->
    mean weights (E,)."""
    tasks = list(own)
    layers = list(usage[tasks[0]])
    per_layer = {
        layer: statistics.mean(float(usage[t][layer][own[t]]) for t in tasks) for layer in layers
    }
    per_task = {
        t: statistics.mean(float(usage[t][layer][own[t]]) for layer in layers) for t in tasks
    }
    return {
        "per_task": per_task,
        "per_layer": per_layer,
        "mean": statistics.mean(per_layer.values()),
    }


def task_information(usage: dict[str, dict[str, torch.Tensor]], tokens: dict[str, int]) -> dict:
    """I(task; expert) in bits per layer (each task's mean routing, weighted by its
    tokens) and its mean."""
    tasks = list(usage)
    counts = torch.tensor([tokens[t] for t in tasks], dtype=torch.float64)
    per_layer = {
        layer: float(mutual_information(torch.stack([usage[t][layer] for t in tasks]), counts))
        for layer in usage[tasks[0]]
    }
    return {"per_layer": per_layer, "mean": statistics.mean(per_layer.values())}


def layer_names(model: nn.Module) -> list[str]:
    return [name for name, _ in lmoe_layers(model)]


# ---------------------------------------------------------------- the one queue of heavy jobs


@contextlib.contextmanager
def heavy(lock: str | None):
    """Hold an exclusive lock on the file `lock` (if given) while a heavy job runs: jobs of several
    scripts sharing the machine's cores then run one at a time (e.g.
    `flock FILE cmd` for the others)."""
    if not lock:
        yield
        return
    Path(lock).parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def share_cores(cores: int = 2) -> None:
    """Two torch threads stall each other's cores when another job runs (5-10x slower on 2 cores):
    take `cores` threads only when the load besides this process's own threads is under
    half a core, else 1."""
    others = os.getloadavg()[0] - torch.get_num_threads()
    torch.set_num_threads(cores if others < 0.5 else 1)
