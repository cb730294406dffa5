"""LMoETrainer: transformers.Trainer for a model with lmoe layers. The router losses join the
objective and the logs; save_model and checkpoints write the adapter (save_adapter's two files),
not a copy of the base.

Imported on first use of `lmoe.LMoETrainer` (transformers.Trainer takes seconds to import).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn
from transformers import Trainer
from transformers.trainer import TRAINING_ARGS_NAME

from ..inject import aux_loss, aux_loss_apart, aux_losses, lmoe_layers
from ..io import load_adapter_weights, save_adapter
from ..training.optim import scale_router_lr


class LMoETrainer(Trainer):
    """Trainer whose objective per optimizer step is Trainer's LM loss plus the mean over the step's
    micro-batches of lmoe.aux_loss (weighted by the adapter's coefficients), as
    lmoe.training.loop has it.

    Logs aux_loss and each router loss (load_balance, z_loss, sparsity) averaged over the logging
    interval. Single process or DDP; not DataParallel, FSDP or DeepSpeed.
    """

    def __init__(self, *args, router_lr_scale: float = 1.0, **kwargs) -> None:
        """router_lr_scale: the routers (and lambda heads) get a parameter group at Trainer's
        learning rate times this; 1 (the default) keeps Trainer's single rate, at which the routers
        already learn LMoEConfig.router_param_scale times as fast as the experts
        (lmoe.training.optim)."""
        super().__init__(*args, **kwargs)
        check_has_experts(self.model)
        self.router_lr_scale = router_lr_scale
        if self.args.n_gpu > 1 or self.is_fsdp_enabled or self.is_deepspeed_enabled:
            raise ValueError(
                "LMoETrainer runs on one device or under DDP (torchrun / accelerate launch, one "
                "GPU per process); DataParallel (several GPUs in one process), FSDP and DeepSpeed "
                "are not supported. For FSDP use `lmoe train distributed=fsdp`."
            )
        self._aux_sums: dict[
            str, Tensor
        ] = {}  # per-step means of the aux terms, summed since the last log
        self._aux_steps = 0.0  # optimizer steps in those sums

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """Trainer's optimizer (its weight-decay groups), the routers split off at lr
        * router_lr_scale."""
        fresh = self.optimizer is None
        optimizer = super().create_optimizer(model)
        if fresh:
            scale_router_lr(optimizer, self.model if model is None else model, self.router_lr_scale)
        return optimizer

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict,
        return_outputs: bool = False,
        num_items_in_batch: Tensor | int | None = None,
    ):
        unwrapped = self.accelerator.unwrap_model(model)
        with aux_loss_apart(
            unwrapped
        ):  # Trainer's loss is the LM loss alone; the aux terms are added here
            loss, outputs = super().compute_loss(
                model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
            )
        if model.training:  # evaluation forwards keep no routing
            loss = loss + self._aux_share(unwrapped, num_items_in_batch)
        return (loss, outputs) if return_outputs else loss

    def _aux_share(self, model: nn.Module, num_items_in_batch: Tensor | int | None) -> Tensor:
        """This micro-batch's part of the step's mean aux loss, at the scale of the
        loss training_step gets.

        Not times the number of processes (as Trainer's token-averaged LM loss is): each process's
        aux loss averaged over processes, as DDP averages gradients, is already that
        of the global batch.
        """
        n = self.current_gradient_accumulation_steps  # micro-batches in this optimizer step
        aux = aux_loss(model)
        self._record(aux, aux_losses(model), n)
        return (
            aux / n if self._loss_is_scaled_for_ga(num_items_in_batch) else aux
        )  # else training_step divides

    def _loss_is_scaled_for_ga(self, num_items_in_batch: Tensor | int | None) -> bool:
        """Whether Trainer normalised the LM loss over the whole step (training_step's own test)."""
        if self.loss_is_scaled_for_ga is not None:
            return self.loss_is_scaled_for_ga
        return (
            self.model_accepts_loss_kwargs and num_items_in_batch is not None
        ) or self.compute_loss_func is not None

    def _record(self, aux: Tensor, terms: dict[str, Tensor], n: int) -> None:
        for key, value in {"aux_loss": aux, **terms}.items():
            self._aux_sums[key] = self._aux_sums.get(key, 0) + value.detach().float() / n
        self._aux_steps += 1 / n

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if (
            "loss" in logs and self._aux_sums
        ):  # a training log, reached by every process: gather here
            keys = list(self._aux_sums)
            sums = self.accelerator.reduce(torch.stack([self._aux_sums[k] for k in keys]), "mean")
            logs.update(zip(keys, (sums / self._aux_steps).tolist(), strict=True))
            self._aux_sums, self._aux_steps = {}, 0.0
        super().log(logs, start_time)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """The adapter files instead of the whole model; the tokenizer and
        training_args.bin as Trainer does."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        save_adapter(self.accelerator.unwrap_model(self.model), output_dir)
        tokenizer = self.processing_class or getattr(self.data_collator, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(
        self, resume_from_checkpoint: str, model: nn.Module | None = None
    ) -> None:
        load_adapter_weights(
            self.accelerator.unwrap_model(model or self.model), resume_from_checkpoint
        )

    def _load_best_model(self) -> None:
        load_adapter_weights(
            self.accelerator.unwrap_model(self.model), self.state.best_model_checkpoint
        )


def check_has_experts(model: nn.Module | None) -> None:
    if model is None or not any(True for _ in lmoe_layers(model)):
        raise ValueError(
            f"LMoETrainer needs a model with lmoe layers; this {type(model).__name__} has none. "
            "Call lmoe.inject(model, LMoEConfig(...)) for new experts, or "
            "lmoe.load_adapter(model, DIR) for a saved adapter, before building the trainer (or "
            "use transformers.Trainer)."
        )
