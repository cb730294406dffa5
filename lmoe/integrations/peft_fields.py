"""What PEFT reads from an LMoEConfig, given to the config class when peft is imported (before or after lmoe:
_lmoe_peft_hook, outside the package so that site-packages' .pth can run it without importing lmoe), so that the
mixture's own config knows nothing of PEFT. The tuner itself is in peft_tuner."""
from __future__ import annotations

from _lmoe_peft_hook import peft_range_error

from ..config import Extensible, LMoEConfig


class PeftFields:
    """What peft.get_peft_model reads from a config before lmoe's tuner takes it over."""

    task_type = None
    base_model_name_or_path = None
    revision = None
    inference_mode = False
    is_prompt_learning = False
    is_adaption_prompt = False
    member = None  # lmoe's member of PEFT's method types, once peft_tuner.register has filed lmoe

    @property
    def peft_type(self):
        """lmoe's member of PEFT's method types, or the one line that says which peft to install."""
        error = peft_range_error()
        if error is not None:
            raise RuntimeError(error)
        return PeftFields.member


def attach(peft_config: type | None = None, member=None) -> None:
    """Give LMoEConfig, and so every config made before or after, PEFT's fields (first, so that peft_type is
    ours, not PeftConfig's None) and, where given, peft.PeftConfig as a base (TRL's peft_config= asks for one)."""
    if member is not None:  # a later refusal (unsupported peft) keeps an earlier registration's member
        PeftFields.member = member
    bases = (PeftFields, peft_config) if peft_config is not None else (PeftFields,)
    if LMoEConfig.__bases__ in ((Extensible,), (PeftFields,)) and LMoEConfig.__bases__ != bases:
        LMoEConfig.__bases__ = bases
