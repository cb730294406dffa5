"""lmoe files itself in PEFT's tables as soon as peft is imported, before or after lmoe, also in a program that
never imports lmoe: installing lmoe puts _lmoe_peft_hook.pth into site-packages, whose one line runs install() at
interpreter start-up, so lm-eval's CLI or any script's PeftModel.from_pretrained reads an lmoe adapter.

A module outside the package: importing lmoe.anything would import lmoe and torch at every start-up. Here the
start-up cost is this file (the standard library only) and a finder that compares one name per later import;
lmoe (and so torch) is imported only after the program has imported peft itself. The work is in
lmoe.integrations.peft_tuner."""
import sys

SUPPORTED_PEFT = ("0.21.0", "0.22.0")  # [from, below): the peft versions whose internals lmoe is tested against
PEFT_TYPE = "LMOE"  # adapter_config.json's peft_type for an lmoe adapter (lmoe.io writes it)


class RegisterAfterPeftImport:
    """A meta path finder: finds `peft` as Python would, then registers lmoe once peft's own import has run. Stays
    in place until then: a probe (transformers' is_peft_available calls importlib.util.find_spec) imports nothing."""

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
                register_quietly()

            spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    """Register lmoe with PEFT now if peft is imported already, else right after its import."""
    if "peft" in sys.modules:
        register_quietly()
    elif not any(isinstance(f, RegisterAfterPeftImport) for f in sys.meta_path):
        sys.meta_path.insert(0, RegisterAfterPeftImport())


def peft_range_error() -> str | None:
    """None where the imported peft is one lmoe supports; else the one line that says what to install."""
    import peft
    from packaging.version import Version
    low, high = SUPPORTED_PEFT
    installed = peft.__version__
    if Version(low) <= Version(installed) < Version(high):
        return None
    return (f"lmoe's PEFT entry points support peft>={low},<{high}; peft {installed} is installed. pip install "
            f"'peft>={low},<{high}', or use lmoe.inject / save_adapter / load_adapter without PEFT.")


class UnsupportedPeft:
    """Filed in PEFT's config table under LMOE where that peft is not supported, so that loading an lmoe adapter
    says which peft to install instead of PEFT's KeyError: 'LMOE'."""

    def __init__(self, *args, **kwargs):
        raise RuntimeError(peft_range_error())

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        return cls()


def register_quietly() -> None:
    """Register where the installed peft is supported, else file the one-line refusal; never break `import peft`."""
    try:
        if peft_range_error() is None:
            from lmoe.integrations.peft_tuner import register
            register()
        else:
            from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
            PEFT_TYPE_TO_CONFIG_MAPPING.setdefault(PEFT_TYPE, UnsupportedPeft)
            if "lmoe.config" in sys.modules:  # get_peft_model(model, LMoEConfig()) then names the peft to install
                from lmoe.integrations.peft_fields import attach
                attach()
    except Exception as err:  # peft's own methods must go on working whatever lmoe's state
        import logging
        logging.getLogger("lmoe").warning("lmoe could not register with PEFT (%s: %s); peft.get_peft_model(model, "
                                          "lmoe.LMoEConfig(...)) will say more.", type(err).__name__, err)
