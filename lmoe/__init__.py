"""lmoe: fine-tune causal LMs with a mixture of LoRA experts, trained end to end (L-MoE, LD-MoLE).

The mixture itself lives here (config, routing, layer, sparse, inject, io); the subpackages hold
what builds on it: modular (skills as experts), data, training, evaluation, integrations (PEFT,
Trainer, lm-eval)."""

from .config import LMoEConfig
from .inject import (
    aux_loss,
    aux_losses,
    count_parameters,
    inject,
    lmoe_layers,
    remove,
)
from .integrations.peft_tuner import register as _register_with_peft
from .io import load_adapter, load_adapter_weights, save_adapter
from .layer import MoLoRALinear
from .modular.compose import compose, load_experts
from .modular.edit import add_adapters, describe_mixture
from .modular.experts import (
    add_experts,
    freeze_experts,
    frozen_experts,
    remove_experts,
    unfreeze_experts,
)
from .modular.export import export_peft, mean_routing
from .modular.merge import merge, unmerge
from .routing_record import record_routing
from .training.optim import param_groups, scale_router_lr
from .version import __version__

_register_with_peft()  # for peft.get_peft_model(model, LMoEConfig(...)), PeftModel.from_pretrained

__all__ = [
    "LMoEConfig",
    "MoLoRALinear",
    "inject",
    "remove",
    "aux_loss",
    "aux_losses",
    "count_parameters",
    "lmoe_layers",
    "record_routing",
    "save_adapter",
    "load_adapter",
    "load_adapter_weights",
    "__version__",
]
__all__ += [
    "compose",
    "load_experts",
    "add_experts",
    "remove_experts",
    "freeze_experts",
    "unfreeze_experts",
    "frozen_experts",
    "mean_routing",
    "export_peft",
    "merge",
    "unmerge",
    "param_groups",
    "scale_router_lr",
    "add_adapters",
    "describe_mixture",
]


def __getattr__(name: str):
    if name == "LMoETrainer":  # imports transformers.Trainer (seconds), so only on first use
        from .integrations.hf_trainer import LMoETrainer

        return LMoETrainer
    raise AttributeError(f"module 'lmoe' has no attribute {name!r}")
