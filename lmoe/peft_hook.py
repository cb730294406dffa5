"""lmoe in PEFT without importing PEFT (seconds): what PEFT reads from an LMoEConfig, and the registration that runs
when peft is imported, before or after lmoe (_lmoe_peft_hook, outside the package so that site-packages' .pth can
run it without importing lmoe). The work is in peft_integration."""
from __future__ import annotations

from _lmoe_peft_hook import install, register_quietly

__all__ = ["PeftFields", "install", "register_quietly"]


class PeftFields:
    """What peft.get_peft_model reads from a config before lmoe's tuner takes it over (LMoEConfig has these).
    Once peft is imported, LMoEConfig is a peft.PeftConfig as well (peft_integration.register)."""

    task_type = None
    base_model_name_or_path = None
    revision = None
    inference_mode = False
    is_prompt_learning = False
    is_adaption_prompt = False

    @property
    def peft_type(self):
        """lmoe's member of PEFT's method types; reading it registers lmoe with PEFT (or says which peft to use)."""
        from .peft_integration import register
        return register()
