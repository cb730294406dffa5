"""The training loop: frozen base + mixture of LoRA experts, AdamW with warm-up and cosine decay.

Read top to bottom: train() builds everything, then runs steps; each step averages grad_accum
micro-batches, clips, steps the optimizer, logs, and every save_every steps writes a checkpoint
(adapter + optimizer + scheduler + step) that train(cfg, resume=True) restores exactly. Each step
reseeds torch from (seed, step, process): dropout differs between processes, and a resumed run draws
what the uninterrupted one drew. The building blocks: config (TrainConfig), data and evaluation
(what a run reads and how it is scored), step (one step's micro-batches), checkpoint, metrics_log,
distributed (processes, DDP/FSDP2), start (what is checked before anything loads), resume
(--resume), interrupt (SIGINT/SIGTERM: the steps done saved).
"""

from __future__ import annotations

import logging
import math
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm

from ..data.benchmarks import task_names
from ..data.encoding import batch_stream
from ..data.question_fit import check_questions_fit
from ..evaluation.scoring import format_table, write_json
from ..inject import (
    AUX_COEFS,
    count_parameters,
    inject,
    lmoe_layers,
)
from ..io import load_adapter, save_adapter
from ..models import check_context, enable_activation_checkpointing, load_model
from ..modular.experts import freeze_experts
from .anneal import annealed_temperature, set_router_temperature
from .checkpoint import CHECKPOINT, TrainState, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .data import training_examples, validation_examples
from .distributed import clip_grad_norm, distribute, make_accelerator, single_process_model
from .evaluation import ROUTING_FILE, cached_eval, evaluate_all, held_out_routing, validation_loss
from .interrupt import Interrupts, TrainingInterrupted
from .metrics_log import ROUTING_COLUMNS, MetricsLog
from .objective import set_label_smoothing
from .optim import adamw, param_groups
from .resume import check_global_batch, resume_point
from .start import FirstStepGuard, check_inputs
from .step import accumulate, skip_step

logger = logging.getLogger(__name__)


def warmup_cosine(warmup: int, total: int) -> Callable[[int], float]:
    """LR multiplier: linear from 1/warmup to 1 over `warmup` steps, then cosine
    decay to 0 at `total`."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def seed_step(seed: int, step: int, rank: int) -> None:
    """Seed torch (CPU and GPUs) for one optimizer step of one process: the processes draw different
    dropout masks, and a resumed run (with any number of processes) draws the masks of the
    uninterrupted one."""
    torch.manual_seed(random.Random(f"{seed}/{step}/{rank}").getrandbits(63))


@dataclass
class TrainResult:
    """What train() returns. With several processes only the main one evaluates and holds the whole
    model: the others return results={} and their own copy (DDP) or shards (FSDP) of
    the trained model."""

    model: nn.Module
    tokenizer: Any
    adapter_dir: Path
    # run name ("base", "trained") -> metric -> task -> value
    # (multiple choice: -> protocol/template)
    results: dict


def train(
    cfg: TrainConfig,
    resume: bool = False,
    on_step: Callable[[dict], None] | None = None,
    evaluate: Callable[[nn.Module, Any, TrainConfig], dict] | None = None,
) -> TrainResult:
    """Train cfg.lmoe experts (fresh, or init_adapter's) on cfg.data (or the built-in mixture); save
    the adapter; evaluate. The main process alone evaluates and saves (see TrainResult).

    Args:
        cfg: the run. With resume, it may differ from the saved config of the run in cfg.output_dir
            only in resume.RESUMABLE's keys: else a ValueError, before anything loads or is written.
        resume: continue the run in cfg.output_dir from its checkpoint.
        on_step: called with each step's metrics (the metrics.csv row) on the main process.
        evaluate: scores the trained model (model, tokenizer, cfg) -> results in evaluate_all's
            place (lmoe compare keeps per-item scores); None: evaluate_all.

    SIGINT or SIGTERM saves a checkpoint and the adapter after the step in progress and raises
    TrainingInterrupted (lmoe.training.interrupt); a run that fails before its first step is done
    leaves nothing behind in cfg.output_dir (start.FirstStepGuard).
    """
    checkpoint = resume_point(cfg) if resume else None
    check_inputs(cfg)
    start = checkpoint["state"]["step"] if checkpoint else 0
    with Interrupts(start, cfg.steps, cfg.output_dir) as stop:
        return _train(cfg, checkpoint, on_step, stop, evaluate or evaluate_all)


def _train(
    cfg: TrainConfig, checkpoint: dict | None, on_step, stop: Interrupts, evaluate: Callable
) -> TrainResult:
    out = Path(cfg.output_dir)
    accelerator = make_accelerator(cfg)
    if checkpoint:
        ranks = accelerator.num_processes
        check_global_batch(TrainState(**checkpoint["state"]), cfg.batch_size * ranks, ranks)
    main = accelerator.is_main_process
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_model(cfg.model, load_in=cfg.load_in)
    check_context(model, cfg.max_length)
    scored = [d for d in cfg.data if task_names([d])] + cfg.eval_data  # benchmarks: test side
    check_questions_fit(tokenizer, scored, cfg.mc, cfg.max_length, cfg.eval_group)
    set_label_smoothing(model, cfg.label_smoothing)
    examples, held_out = training_examples(cfg, tokenizer), validation_examples(cfg, tokenizer)
    pad_id = tokenizer.pad_token_id
    with FirstStepGuard(out if main else None, stop.step) as guard:
        runs = {}
        if cfg.compare_base:
            model.to(accelerator.device)  # in every process: the experts are drawn on that device
            if main:  # the others wait at the first collective of training
                runs["base"] = cached_eval(
                    out / "eval_base.json",
                    checkpoint is not None,
                    lambda: evaluate_all(model, tokenizer, cfg),
                )
        add_adapter(model, cfg)
        if cfg.gradient_checkpointing:
            enable_activation_checkpointing(model)
        _print_size(accelerator, model, len(examples))
        model = distribute(cfg, accelerator, model)  # before the optimizer: FSDP swaps parameters
        optimizer = adamw(
            param_groups(model, cfg.lr, cfg.router_lr_scale), weight_decay=cfg.weight_decay
        )
        schedule = warmup_cosine(cfg.warmup_steps, cfg.steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        optimizer = accelerator.prepare_optimizer(optimizer)
        state = TrainState()
        if checkpoint:
            state = load_checkpoint(checkpoint, model, optimizer, scheduler)
            del checkpoint  # its tensors are in the model and optimizer now
        guard.state = state
        if main:
            cfg.save()  # on resume: the saved config with RESUMABLE's changes
        log = MetricsLog(out, state.step) if main else None
        score = partial(validation_loss, accelerator, model, held_out, pad_id) if held_out else None
        with stop.deferred():
            stopped = _run_steps(
                cfg,
                accelerator,
                model,
                optimizer,
                scheduler,
                examples,
                pad_id,
                state,
                log,
                on_step,
                stop,
                score,
            )
            model = _save_adapter(cfg, accelerator, model)
    stop.step = state.step
    if stopped:
        accelerator.print(f"lmoe: adapter saved to {out / 'adapter'}")
        signum = stop.signum or signal.SIGINT  # None: another process was signalled
        raise TrainingInterrupted(signum, state.step, cfg.steps, out)
    stop.raise_if_signalled()  # a signal after the last step's all-reduce (one process)
    _evaluate(cfg, accelerator, model, tokenizer, runs, evaluate)
    accelerator.print(f"lmoe: adapter saved to {out / 'adapter'}")
    return TrainResult(model, tokenizer, out / "adapter", runs)


def _print_size(accelerator: Accelerator, model: nn.Module, examples: int) -> None:
    """The run's one size line (inject logs its own at debug level: eval, generate, analyze print
    none)."""
    trainable, total = count_parameters(model)
    layers = sum(1 for _ in lmoe_layers(model))
    accelerator.print(
        f"lmoe: {examples} training examples; {layers} layers, trainable params "
        f"{trainable:,} of {total:,} ({100 * trainable / max(total, 1):.3f}%)"
    )


def _save_adapter(cfg: TrainConfig, accelerator: Accelerator, model: nn.Module) -> nn.Module:
    """Save the adapter from the main process, with the whole model; the others only wait.
    Returns this process's model."""
    model = single_process_model(
        accelerator, model, lambda: add_adapter(load_model(cfg.model)[0], cfg)
    )
    if accelerator.is_main_process:
        save_adapter(model, Path(cfg.output_dir) / "adapter")
    accelerator.wait_for_everyone()  # the adapter is on disk when train() returns in any process
    return model


def _evaluate(
    cfg: TrainConfig,
    accelerator: Accelerator,
    model: nn.Module,
    tokenizer,
    runs: dict,
    evaluate: Callable,
) -> None:
    """Add runs["trained"] (evaluate's results) on the main process; write eval.json and print the
    table when there are results."""
    if accelerator.is_main_process:
        out = Path(cfg.output_dir)
        runs["trained"] = evaluate(model, tokenizer, cfg)
        if not cfg.data and (cfg.mixture.skills or cfg.mixture.domains):
            runs["trained"]["routing"] = held_out_routing(model, tokenizer, cfg, out / ROUTING_FILE)
        if runs["trained"]:
            write_json(runs, out / "eval.json")
            print(format_table(runs))
    accelerator.wait_for_everyone()


def add_adapter(model: nn.Module, cfg: TrainConfig) -> nn.Module:
    """The mixture training starts from: the saved init_adapter, or fresh experts seeded alike in
    every process; train_experts=False then freezes every expert, so only the routers learn, and
    frozen_experts the experts it names, so the others and the routers learn."""
    if cfg.init_adapter:
        load_adapter(model, cfg.init_adapter)
    else:
        torch.manual_seed(cfg.seed)
        inject(model, cfg.lmoe)
    if not cfg.train_experts:
        freeze_experts(model)
    elif cfg.frozen_experts:
        freeze_experts(model, cfg.frozen_experts)
    return model


def _run_steps(
    cfg,
    accelerator,
    model,
    optimizer,
    scheduler,
    examples,
    pad_id,
    state,
    log,
    on_step,
    stop: Interrupts,
    score: Callable[[], float] | None = None,
) -> bool:
    """Optimizer steps state.step+1 .. cfg.steps; each averages grad_accum micro-batches per
    process. score: the held-out loss, logged every cfg.eval_every steps. Returns whether a signal
    (stop, in any process) ended the run early, after a step whose checkpoint it saved."""
    ranks, rank = accelerator.num_processes, accelerator.process_index
    global_batch = (
        cfg.batch_size * ranks
    )  # each process takes a disjoint slice of every global batch
    stream = batch_stream(examples, global_batch, cfg.seed, start=state.batches)
    bar = tqdm(
        total=cfg.steps, initial=state.step, desc="train", disable=not accelerator.is_main_process
    )
    bad = skipped = 0  # steps with a NaN/inf loss or gradient: in a row, and in this run
    stopping = False  # a signal in any process, agreed on in the step's all-reduce
    model.train()
    while state.step < cfg.steps:
        started = time.perf_counter()
        if cfg.temperature_start is not None:
            set_router_temperature(
                model,
                annealed_temperature(
                    cfg.temperature_start,
                    cfg.lmoe.temperature,
                    cfg.temperature_anneal_steps,
                    state.step,
                ),
            )
        seed_step(cfg.seed, state.step, rank)
        batches = [next(stream)[rank::ranks] for _ in range(cfg.grad_accum)]
        lm, aux, terms, tokens, stopping = accumulate(
            accelerator, model, batches, pad_id, stop=stop.signum is not None
        )
        state.batches, state.global_batch = state.batches + cfg.grad_accum, global_batch
        grad_norm = float(clip_grad_norm(accelerator, model, cfg.max_grad_norm))
        lr = scheduler.get_last_lr()[0]
        finite = math.isfinite(lm + aux) and math.isfinite(grad_norm)  # both on the host already
        if finite:
            optimizer.step()
        bad, skipped = (
            (0, skipped) if finite else skip_step(cfg, state.step + 1, bad + 1, skipped + 1)
        )
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        seconds = time.perf_counter() - started
        state.elapsed_s += seconds
        row = {
            "step": state.step,
            "loss": lm + aux,
            "lm_loss": lm,
            "aux_loss": aux,
            **{k: terms.get(k, "") for k in AUX_COEFS},
            **{k: terms[k] for k in ROUTING_COLUMNS},
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": tokens,
            "tokens_per_s": tokens / seconds,
            "elapsed_s": state.elapsed_s,
        }
        if score is not None and state.step % cfg.eval_every == 0:
            row["eval_loss"] = score()
        if log is not None:
            log.write(row)
            if on_step is not None:
                on_step(row)
        bar.set_postfix(
            loss=f"{lm:.3f}",
            aux=f"{aux:.4f}",
            experts=f"{terms['active_experts']:.2f}",
            H=f"{terms['routing_entropy']:.2f}",
            tok_s=f"{tokens / seconds:.0f}",
        )
        bar.update()
        due = cfg.save_every and state.step % cfg.save_every == 0 or state.step == cfg.steps
        if stopping or finite and due:  # a stop saves a non-finite step too: its update was dropped
            save_checkpoint(
                Path(cfg.output_dir) / CHECKPOINT,
                model,
                optimizer,
                scheduler,
                state,
                accelerator.is_main_process,
            )
            accelerator.wait_for_everyone()
        if stopping:
            break
    bar.close()
    if (
        cfg.temperature_start is not None
    ):  # the saved adapter serves at lmoe.temperature, where training ended
        set_router_temperature(model, cfg.lmoe.temperature)
    if log is not None:
        log.close()
    return stopping
