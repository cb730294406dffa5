"""The module names of lmoe before its subpackages (2026-12): they keep importing, each with a DeprecationWarning
that names the new place, so that a user's `import lmoe.train` or `from lmoe.data import collate` goes on working."""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED_MODULES = {
    "lmoe.compose": "lmoe.modular.compose",
    "lmoe.experts": "lmoe.modular.experts",
    "lmoe.export": "lmoe.modular.export",
    "lmoe.merge": "lmoe.modular.merge",
    "lmoe.mixture_edit": "lmoe.modular.edit",
    "lmoe.prototypes": "lmoe.modular.prototypes",
    "lmoe.choices": "lmoe.data.choices",
    "lmoe.benchmarks": "lmoe.data.benchmarks",
    "lmoe.skills": "lmoe.data.skills",
    "lmoe.splits": "lmoe.data.splits",
    "lmoe.train": "lmoe.training.loop",
    "lmoe.train_config": "lmoe.training.config",
    "lmoe.train_data": "lmoe.training.data",
    "lmoe.train_eval": "lmoe.training.evaluation",
    "lmoe.checkpoint": "lmoe.training.checkpoint",
    "lmoe.metrics_log": "lmoe.training.metrics_log",
    "lmoe.distributed": "lmoe.training.distributed",
    "lmoe.objective": "lmoe.training.objective",
    "lmoe.optim": "lmoe.training.optim",
    "lmoe.anneal": "lmoe.training.anneal",
    "lmoe.evaluate": "lmoe.evaluation.scoring",
    "lmoe.analysis": "lmoe.evaluation.analysis",
    "lmoe.peft_integration": "lmoe.integrations.peft_tuner",
    "lmoe.peft_hook": "lmoe.integrations.peft_fields",
    "lmoe.hf_trainer": "lmoe.integrations.hf_trainer",
    "lmoe.lm_eval_tasks": "lmoe.integrations.lm_eval_tasks",
}
MOVED_DATA_NAMES = {  # lmoe.data was one module; its names now live in these
    "IGNORE": "lmoe.data.encoding",
    "FALLBACK_TEMPLATE": "lmoe.data.encoding",
    "Example": "lmoe.data.encoding",
    "chat": "lmoe.data.encoding",
    "ensure_chat_template": "lmoe.data.encoding",
    "render_prompt": "lmoe.data.encoding",
    "chat_segments": "lmoe.data.encoding",
    "encode": "lmoe.data.encoding",
    "encode_all": "lmoe.data.encoding",
    "collate": "lmoe.data.encoding",
    "bucketed_batches": "lmoe.data.encoding",
    "batch_stream": "lmoe.data.encoding",
    "read_records": "lmoe.data.records",
    "to_record": "lmoe.data.records",
    "CORPUS_PACKAGE": "lmoe.data.builtin",
    "corpus_root": "lmoe.data.builtin",
    "conversation_pairs": "lmoe.data.builtin",
    "Mixture": "lmoe.data.builtin",
}


def moved(old: str, new: str) -> None:
    warnings.warn(f"{old} moved to {new}; import it from there.", DeprecationWarning, stacklevel=3)


class MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old module name and loads the module at its new place under it (sys.modules then holds that one)."""

    def find_spec(self, fullname, path=None, target=None):
        return importlib.util.spec_from_loader(fullname, self) if fullname in MOVED_MODULES else None

    def create_module(self, spec):
        return None

    def exec_module(self, module) -> None:
        new = MOVED_MODULES[module.__name__]
        if not isinstance(getattr(sys.modules["lmoe"], module.__name__.split(".")[1], sys), type(sys)):
            # lmoe.compose and lmoe.merge are functions: a module under the name would replace them
            raise ImportError(f"{module.__name__} moved to {new}; import it from there.")
        moved(module.__name__, new)
        sys.modules[module.__name__] = importlib.import_module(new)  # the import system returns this one


def install() -> None:
    if not any(isinstance(f, MovedModules) for f in sys.meta_path):
        sys.meta_path.append(MovedModules())


def data_attribute(name: str):
    """`lmoe.data.NAME` for a name of the old lmoe.data module."""
    if name not in MOVED_DATA_NAMES:
        raise AttributeError(f"module 'lmoe.data' has no attribute {name!r}")
    moved(f"lmoe.data.{name}", f"{MOVED_DATA_NAMES[name]}.{name}")
    return getattr(importlib.import_module(MOVED_DATA_NAMES[name]), name)
