"""One optimizer step's work: forward and backward of its micro-batches, the losses and routing
statistics summed over processes in one all-reduce (accumulate), and a step with a NaN/inf loss or
gradient skipped, the run stopped after max_bad_steps in a row (skip_step)."""

from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path

import torch

from ..data.encoding import IGNORE, collate
from ..inject import AUX_COEFS, aux_loss, aux_loss_apart, aux_losses
from ..routing_record import routing_counts
from .checkpoint import CHECKPOINT
from .config import TrainConfig
from .metrics_log import ROUTING_COLUMNS

logger = logging.getLogger(__name__)


class NonFiniteLoss(ValueError):
    """max_bad_steps steps in a row had a NaN/inf loss or gradient; the last good
    checkpoint is kept."""


def skip_step(cfg: TrainConfig, step: int, bad: int, skipped: int) -> tuple[int, int]:
    """Log a step whose update was dropped for a NaN/inf loss or gradient; stop after
    max_bad_steps in a row."""
    logger.warning(
        "lmoe: step %d skipped: the loss or gradient is NaN/inf (%d in a row, %d in this run)",
        step,
        bad,
        skipped,
    )
    if bad >= cfg.max_bad_steps:
        checkpoint = Path(cfg.output_dir) / CHECKPOINT
        kept = (
            f"the last good checkpoint {checkpoint} is kept"
            if checkpoint.is_file()
            else "no checkpoint was written"
        )
        raise NonFiniteLoss(
            f"Training stopped at step {step}: the loss or gradient was NaN/inf for {bad} steps in "
            f"a row (max_bad_steps={cfg.max_bad_steps}); {kept}. Lower lr, check the data, or use "
            "precision=no, then train again (--resume continues from the checkpoint)."
        )
    return bad, skipped


def accumulate(
    accelerator, model, batches, pad_id, stop: bool = False
) -> tuple[float, float, dict, int, bool]:
    """Forward + backward of each micro-batch; returns the step's LM and aux loss, the aux terms and
    the routing's means per token and layer (ROUTING_COLUMNS: experts in use, normalised entropy,
    share with top weight > 0.5, effective support size, top expert's share),
    tokens, and whether any process asked to stop (its `stop`): all over all processes.

    Each micro-batch's LM loss is its mean over the answer tokens of all processes (as one process
    would compute it on the whole global batch): the local mean is weighted by local / global count,
    times the number of processes because DDP averages gradients. Micro-batches then count equally.
    """
    ranks, model_ = accelerator.num_processes, accelerator.unwrap_model(model)
    batches = [
        {k: v.to(accelerator.device) for k, v in collate(ex, pad_id).items()} for ex in batches
    ]
    counts = torch.stack(
        [(b["labels"][:, 1:] != IGNORE).sum() for b in batches]
    ).float()  # loss tokens
    weights = ranks * counts / accelerator.reduce(counts.clone(), "sum") / len(batches)
    # lm, aux, tokens, routing_counts (ROUTING_COLUMNS, then pairs), aux terms, stop
    routed = len(ROUTING_COLUMNS)
    totals = torch.zeros(3 + routed + 1 + len(AUX_COEFS) + 1, device=accelerator.device)
    for i, batch in enumerate(batches):
        sync = i == len(batches) - 1  # all-reduce gradients once, after the last micro-batch
        with (
            accelerator.no_sync(model) if not sync else nullcontext(),
            accelerator.autocast(),
            aux_loss_apart(model_),
        ):  # the LM loss alone in out.loss: the aux terms are weighted here
            out = model(**batch)
            aux = aux_loss(model_)
            terms = aux_losses(
                model_
            )  # before backward: gradient checkpointing re-runs the layers' forward
            routing = routing_counts(model_)  # sums of ROUTING_COLUMNS, (token, layer) pairs
            accelerator.backward(out.loss * weights[i] + aux / len(batches))
        totals += torch.stack(
            [
                out.loss.detach() * weights[i] / ranks,
                aux.detach() / len(batches) / ranks,
                batch["attention_mask"].sum().float(),
                *routing,
                *[
                    terms[k].detach() / len(batches) / ranks if k in terms else torch.zeros(())
                    for k in AUX_COEFS
                ],
                torch.zeros(()),
            ]
        ).to(totals)
    totals[-1] = float(stop)
    # the one sync of the step
    lm, aux, tokens, *sums, stops = accelerator.reduce(totals, "sum").tolist()
    routing, pairs, values = sums[:routed], sums[routed], sums[routed + 1 :]
    stats = {k: v for k, v in zip(AUX_COEFS, values, strict=True) if k in terms} | {
        k: v / max(pairs, 1) for k, v in zip(ROUTING_COLUMNS, routing, strict=True)
    }
    return lm, aux, stats, int(tokens), stops > 0
