"""The LM part of the training objective: next-token cross-entropy, optionally label-smoothed
(LD-MoLE's recipe uses 0.1). Installed as the model's `loss_function`, so
`model(..., labels=...).loss` carries it in any loop."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SmoothedCausalLMLoss:
    """transformers' ForCausalLMLoss with label smoothing eps: (1 - eps) * NLL + eps * mean_k(-log
    p_k) per answer token, then the mean over answer tokens (or their sum / num_items_in_batch,
    as Trainer asks)."""

    def __init__(self, eps: float) -> None:
        self.eps = eps

    @property
    def label_smoothing(self) -> float:
        """eps, by the name lmoe.inject reads from a model's loss_function (ReMix's rewards)."""
        return self.eps

    def __call__(
        self,
        logits: Tensor,
        labels: Tensor,
        vocab_size: int,
        num_items_in_batch: Tensor | int | None = None,
        ignore_index: int = -100,
        shift_labels: Tensor | None = None,
        **_,
    ) -> Tensor:
        if shift_labels is None:  # tokens < n predict token n
            shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        reduction = "mean" if num_items_in_batch is None else "sum"
        loss = F.cross_entropy(
            logits.float().reshape(-1, vocab_size),
            shift_labels.reshape(-1).to(logits.device),
            ignore_index=ignore_index,
            reduction=reduction,
            label_smoothing=self.eps,
        )
        if num_items_in_batch is not None:
            loss = loss / torch.as_tensor(num_items_in_batch, device=loss.device)
        return loss


def set_label_smoothing(model: nn.Module, eps: float) -> None:
    """Make model(..., labels=...).loss label-smoothed by eps (0: transformers' own
    loss, untouched)."""
    if eps == 0:
        return
    if not hasattr(type(model), "loss_function"):
        raise ValueError(
            f"label_smoothing={eps} needs a transformers model (it replaces model.loss_function); "
            f"{type(model).__name__} has none. Set label_smoothing=0."
        )
    model.loss_function = SmoothedCausalLMLoss(eps)
