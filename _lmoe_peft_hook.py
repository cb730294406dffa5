"""Imports lmoe (which files itself in PEFT's tables) when a program that never imports lmoe
imports peft, so that lm-eval's CLI or any script's PeftModel.from_pretrained reads an lmoe
adapter: installing lmoe puts _lmoe_peft_hook.pth into site-packages (build_pth.py), whose one line
runs install() at interpreter start-up.

A module outside the package, of the standard library only: importing lmoe at every start-up would
import torch and peft (seconds). Here the start-up cost is this file and a finder that compares one
name per later import."""

import sys


class ImportLmoeAfterPeft:
    """A meta path finder: finds `peft` as Python would, then imports lmoe once peft's own import
    has run. Stays in place until then: a probe (transformers' is_peft_available calls
    importlib.util.find_spec) imports nothing."""

    searching = False

    def find_spec(self, name, path=None, target=None):
        if name != "peft" or self.searching:
            return None
        import importlib.util

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
                import_lmoe()

            spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    """Import lmoe right after peft's import (one finder, also where site runs the .pth twice)."""
    if not any(isinstance(finder, ImportLmoeAfterPeft) for finder in sys.meta_path):
        sys.meta_path.insert(0, ImportLmoeAfterPeft())


def import_lmoe() -> None:
    """`import lmoe`, which registers it with PEFT; a failure is a warning: `import peft` must go on
    working."""
    if "lmoe" in sys.modules:  # lmoe itself is importing peft (lmoe.config); it registers when done
        return
    try:
        import lmoe  # noqa: F401
    except Exception as err:
        import logging

        logging.getLogger("lmoe").warning(
            "lmoe could not register with PEFT (%s: %s); `import lmoe` will say more.",
            type(err).__name__,
            err,
        )
