"""lmoe in PEFT without importing it: PEFT (seconds to import) is registered with lmoe when it is imported,
before or after lmoe, and when an LMoEConfig is handed to peft.get_peft_model. The work is in peft_integration."""
from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import sys

log = logging.getLogger(__name__)


class PeftFields:
    """What peft.get_peft_model reads from a config before lmoe's tuner takes it over (LMoEConfig has these)."""

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


class _RegisterAfterPeftImport(importlib.abc.MetaPathFinder):
    """Finds `peft` as Python would, then registers lmoe once peft's own import has run. Stays in place until
    then: a probe (transformers' is_peft_available calls importlib.util.find_spec) imports nothing."""

    searching = False

    def find_spec(self, name, path=None, target=None):
        if name != "peft" or self.searching:
            return None
        self.searching = True  # the search below asks every finder, this one too
        try:
            spec = importlib.util.find_spec(name)
        finally:
            self.searching = False
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                if self in sys.meta_path:
                    sys.meta_path.remove(self)
                register_quietly()

            spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    """Register lmoe with PEFT now if it is imported already, else right after its import."""
    if "peft" in sys.modules:
        register_quietly()
    elif not any(isinstance(f, _RegisterAfterPeftImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterPeftImport())


def register_quietly() -> None:
    """Register where the installed peft is supported; otherwise leave PEFT alone (LMoEConfig.peft_type says why)."""
    try:
        from .peft_integration import register, supported_peft
        if supported_peft():
            register()
    except Exception as err:  # never break `import peft` for its own methods
        log.warning("lmoe could not register with PEFT (%s); peft.get_peft_model(model, LMoEConfig(...)) will "
                    "say more.", err)
