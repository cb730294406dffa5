"""lmoe: fine-tune causal LMs with a mixture of LoRA experts, trained end to end (L-MoE, LD-MoLE)."""
__version__ = "0.1.0"

from .config import LMoEConfig
from .inject import aux_loss, aux_losses, count_parameters, inject, lmoe_layers, record_routing, remove
from .io import load_adapter, save_adapter
from .layer import MoLoRALinear

__all__ = ["LMoEConfig", "MoLoRALinear", "inject", "remove", "aux_loss", "aux_losses", "count_parameters",
           "lmoe_layers", "record_routing", "save_adapter", "load_adapter", "__version__"]
