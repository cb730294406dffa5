"""lmoe as a PEFT method: peft.get_peft_model(model, lmoe.LMoEConfig(...)),
PeftModel.from_pretrained(base, dir), save_pretrained, disable_adapter, unload and merge_and_unload
(with a fixed routing).

PEFT has no plugin hook (register_peft_method accepts only members of its closed PeftType enum), so
register, run when lmoe is imported, puts a member of lmoe's own str enum, equal to "LMOE"
(adapter_config.json's peft_type), into PEFT's mapping tables. That rests on PEFT internals, hence
lmoe's pinned peft range (pyproject.toml). PEFT's weights loader is wrapped to check an lmoe
adapter's checksum first, and LMoEPeftConfig writes it, as lmoe.io's readers and writer do. The
tuner delegates to lmoe's own inject / remove / merge; the files are save_adapter's (lmoe.io).
"""

from __future__ import annotations

import functools
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from peft import PeftConfig, peft_model
from peft.mapping import (
    PEFT_TYPE_TO_CONFIG_MAPPING,
    PEFT_TYPE_TO_PREFIX_MAPPING,
    PEFT_TYPE_TO_TUNER_MAPPING,
)
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import Tensor, nn

from ..config import LMoEConfig, LMoEPeftType, saved_fields
from ..inject import _set_submodule, inject, lmoe_layers, remove
from ..io import (
    CONFIG_FILE,
    FORMAT_VERSION,
    WEIGHTS_FILE,
    adapter_meta,
    adapter_state_dict,
    atomic_write,
    is_lmoe_adapter,
    sha256_file,
    verify_adapter,
)
from ..layer import MoLoRALinear
from ..modular.merge import merge, unmerge

__all__ = ["LMoEPeftConfig", "LMoETuner", "register"]
PEFT_PREFIX = (
    "base_model.model."  # a PeftModel's keys: PeftModel.base_model (the tuner) .model (the LM)
)


def register() -> LMoEPeftType:
    """Put lmoe's config and tuner into PEFT's tables (lmoe's __init__ does, when lmoe is imported;
    again: no change); returns the peft_type they are filed under."""
    member = LMoEPeftType.LMOE
    PEFT_TYPE_TO_CONFIG_MAPPING[member] = LMoEPeftConfig
    PEFT_TYPE_TO_TUNER_MAPPING[member] = LMoETuner
    PEFT_TYPE_TO_PREFIX_MAPPING[member] = LMoETuner.prefix
    if not hasattr(peft_model.load_peft_weights, "lmoe_checked"):
        peft_model.load_peft_weights = checked(peft_model.load_peft_weights)
    return member


def checked(load_peft_weights):
    """PEFT's weights loader (PeftModel.load_adapter: from_pretrained, AutoPeftModel, lm-eval,
    Trainer's resume) that first checks a local lmoe adapter's weights against its config's
    checksum, as lmoe.load_adapter does."""

    @functools.wraps(load_peft_weights)
    def load(model_id, *args, **kwargs):
        directory = Path(model_id, kwargs.get("subfolder") or "")
        if is_lmoe_adapter(directory):
            verify_adapter(directory)
        return load_peft_weights(model_id, *args, **kwargs)

    load.lmoe_checked = True
    return load


@dataclass
class LMoEPeftConfig(PeftConfig):
    """adapter_config.json as PEFT reads it: PEFT's fields and lmoe's (`config`: the LMoEConfig as a
    dict; `layers`: the base layers' shapes). peft.get_peft_model turns an LMoEConfig
    into one of these."""

    lmoe_version: str | None = None
    format_version: int = FORMAT_VERSION
    base_model_type: str | None = None
    config: dict = field(default_factory=dict)
    layers: dict = field(default_factory=dict)
    weights_sha256: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = (
            register()
        )  # built directly (LMoEPeftConfig.from_lmoe), PEFT must find the tuner too
        if self.format_version > FORMAT_VERSION:
            raise ValueError(
                f"This lmoe adapter is in format {self.format_version} (lmoe {self.lmoe_version}); "
                f"the installed lmoe reads format {FORMAT_VERSION}. Upgrade lmoe to load it."
            )
        if self.config:  # read from a file: a field the adapter predates keeps its saved meaning
            self.config = saved_fields(self.config)
        LMoEConfig.from_dict(self.config)  # a bad field is an error here, naming it

    @property
    def lmoe(self) -> LMoEConfig:
        return LMoEConfig.from_dict(self.config)

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        """PEFT's adapter_config.json, sealed as save_adapter seals it: with the checksum of the
        weights file that PeftModel.save_pretrained has just written, and replacing the old config
        atomically (a crash in between leaves the old checksum beside the new weights:
        refused, never loaded)."""
        weights = Path(save_directory, WEIGHTS_FILE)
        self.weights_sha256 = sha256_file(weights) if weights.is_file() else None
        with (
            tempfile.TemporaryDirectory() as tmp
        ):  # PEFT's own writer, then the file moved in whole
            super().save_pretrained(tmp, **kwargs)
            text = Path(tmp, CONFIG_FILE).read_text()
        atomic_write(Path(save_directory, CONFIG_FILE), lambda path: Path(path).write_text(text))

    @classmethod
    def from_lmoe(cls, cfg: LMoEConfig) -> "LMoEPeftConfig":
        return cls(
            config=cfg.to_dict(),
            base_model_name_or_path=cfg.base_model_name_or_path,
            revision=cfg.revision,
            inference_mode=cfg.inference_mode,
        )


class AdapterSwitch(nn.Module, BaseTunerLayer):
    """What PEFT's get_model_status reads (disable_adapter asks it): whether lmoe's adapter is on.
    Holds nothing; lives on the tuner, not in the model (lmoe's layers are not
    PEFT tuner layers)."""

    def __init__(self, adapter_name: str) -> None:
        super().__init__()
        self._active_adapter = adapter_name
        self.merged_adapters: list[str] = []


class LMoETuner(BaseTuner):
    """PeftModel.base_model for an lmoe adapter: one adapter per model (named
    "default" or as given)."""

    prefix = "lmoe_"
    tuner_layer_cls = MoLoRALinear
    target_module_mapping: dict = {}
    uses_shared_state = (
        True  # LD-MoLE's lambda head is one module shared by every layer (as VeRA's vectors)
    )

    def __init__(
        self,
        model: nn.Module,
        peft_config,
        adapter_name: str,
        low_cpu_mem_usage: bool = False,
        state_dict: dict | None = None,
    ) -> None:
        configs = peft_config if isinstance(peft_config, dict) else {adapter_name: peft_config}
        configs = {
            name: c if isinstance(c, LMoEPeftConfig) else LMoEPeftConfig.from_lmoe(c)
            for name, c in configs.items()
        }
        super().__init__(
            model, configs, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict
        )

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: dict | None = None,
    ) -> None:
        if len(self.peft_config) > 1 or any(True for _ in lmoe_layers(model)):
            raise ValueError(
                "A model holds one lmoe adapter; PeftModel.add_adapter / load_adapter of a second "
                "one is not supported. Unload the first (peft_model.unload()), or build one "
                "mixture with more experts (lmoe.modular.compose, lmoe.add_experts)."
            )
        config = self.peft_config[adapter_name]
        inject(model, config.lmoe)
        meta = adapter_meta(
            model
        )  # the config as injected (LD-MoLE's lambda width fixed) and the base's shapes
        for key in ("config", "layers", "base_model_type", "lmoe_version"):
            setattr(config, key, meta[key])
        self.targeted_module_names = [name for name, _ in lmoe_layers(model)]
        self.adapter_switch = AdapterSwitch(adapter_name)

    def _create_and_replace(self, *args, **kwargs) -> None:
        raise NotImplementedError("lmoe injects all its layers at once (inject_adapter)")

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """Nothing to do: lmoe's experts and routers are created in float32 already."""

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        """Disabled, the base layers themselves run where the mixture layers were (base
        outputs exactly)."""
        disabled = self.__dict__.setdefault(
            "_lmoe_disabled", {}
        )  # name -> mixture layer, while disabled
        if enabled:
            for name, layer in disabled.items():
                _set_submodule(self.model, name, layer)
            disabled.clear()
        elif not disabled:
            disabled.update(lmoe_layers(self.model))
            for name, layer in disabled.items():
                _set_submodule(self.model, name, layer.base)
        self.adapter_switch._disable_adapters = not enabled

    def merge_and_unload(
        self,
        routing: Tensor | dict | None = None,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
    ) -> nn.Module:
        """The base model with a fixed routing folded into its weights (lmoe.modular.merge): routing
        (E,) for every layer, or {layer name: (E,)}, e.g. lmoe.mean_routing(record)."""
        if routing is None:
            raise ValueError(
                "merge_and_unload needs a fixed routing: lmoe routes every token on its own, "
                "which no single weight can hold. Pass merge_and_unload(routing=g) with g (E,) or "
                "{layer: (E,)} (e.g. lmoe.mean_routing(record)), or serve the PeftModel as it is."
            )
        self._enable_adapter_layers(True)
        merge(self.model, routing)
        return self._remove_layers()

    def unload(self) -> nn.Module:
        """The base model as it was, the adapter dropped."""
        self._enable_adapter_layers(True)
        unmerge(self.model)
        return self._remove_layers()

    def _remove_layers(self) -> nn.Module:
        remove(self.model)
        if hasattr(self.model, "peft_config"):
            del self.model.peft_config
        return self.model

    @classmethod
    def _get_adapter_state_dict(
        cls,
        model: nn.Module,
        config: PeftConfig,
        adapter_name: str,
        state_dict: dict[str, Tensor],
        unwanted_adapter_names: list[str],
    ) -> dict[str, Tensor]:
        """The tensors save_adapter writes, under its names (from state_dict, as Trainer or
        FSDP gathered it)."""
        prefix = PEFT_PREFIX if any(k.startswith(PEFT_PREFIX) for k in state_dict) else ""
        return {name: state_dict[prefix + name] for name in adapter_state_dict(model)}

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        return key  # lmoe's keys hold no adapter name

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: PeftConfig, adapter_name: str, state_dict: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        """File keys -> the PeftModel's keys; every adapter tensor must be there,
        and nothing else."""
        expected = set(adapter_state_dict(model))
        missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
        if missing or unexpected:
            raise ValueError(
                f"This lmoe adapter does not fit the model: missing {missing[:5]}, unexpected "
                f"{unexpected[:5]}. Load it onto the base model it was trained with."
            )
        return {PEFT_PREFIX + key: value for key, value in state_dict.items()}
