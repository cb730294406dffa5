"""Adapter files: the expert and router weights as safetensors, the config and base
fingerprint as JSON.

Nothing here unpickles code: adapters are safetensors + JSON, and training checkpoints are read with
torch.load(weights_only=True) after their checksum is verified.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import PEFT_TYPE, LMoEConfig, saved_fields
from .inject import get_config, inject, lmoe_layers
from .layer import linear_shape
from .version import __version__

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = (
    "adapter_model.safetensors"  # PEFT's names, so PeftModel.from_pretrained reads the directory
)
WEIGHTS_FILE_V1 = "adapter.safetensors"  # format 1 (lmoe before PEFT's names); still read
FORMAT_VERSION = 2
log = logging.getLogger(__name__)


class WriteError(OSError):
    """A file could not be written (disk full, permissions); keeps errno, reads as
    its message alone."""

    def __str__(self) -> str:
        return self.strerror


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call write(tmp_path) then rename over path, so a crash never leaves a half-written file.
    The file gets the mode an ordinary write gives (0o666 less the umask), not mkstemp's 0o600:
    a serving process or another user can read the adapter where the umask lets them."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_orphaned_temps(path)
    try:
        fd, tmp = tempfile.mkstemp(
            dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp"
        )
    except OSError as err:
        raise WriteError(
            err.errno,
            f"Could not write {path} ({err.strerror}); check that the directory is writable.",
        ) from err
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:  # disk full, quota, permissions: the old file (if any) is left as it was
        kept = "the previous file is kept" if path.exists() else "nothing was written"
        raise WriteError(
            err.errno,
            f"Could not write {path} ({err.strerror or err}); {kept}. "
            "Free disk space (or fix permissions) and run again.",
        ) from err
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def current_umask() -> int:
    """The process's umask, read without changing it where Linux shows it (/proc/self/status);
    elsewhere set and put back at once (os.umask can only be read by setting it)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def remove_orphaned_temps(path: Path) -> None:
    """Delete temp files of `path` whose writer process is gone (a run killed mid-write leaves one,
    as large as a checkpoint); a live writer's file is left alone. Names:
    .{name}.{pid}.{random}.tmp"""
    for temp in path.parent.glob(f".{path.name}.*.tmp"):
        pid = temp.name[len(path.name) + 2 :].split(".", 1)[0]
        if pid.isdigit() and not _process_alive(int(pid)):
            temp.unlink(missing_ok=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


CHECKED_MAGIC = b"LMOE-SHA256 "


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_state(path: str | Path, blob: dict) -> None:
    """torch.save(blob) behind a line holding its SHA-256, written atomically: a torn
    file never loads."""
    buffer = io.BytesIO()
    torch.save(blob, buffer)
    payload = buffer.getvalue()
    header = CHECKED_MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n"
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(header + payload))


def load_state(path: str | Path) -> dict:
    """What save_state wrote, checksum verified; only tensors and plain data are
    unpickled (weights_only)."""
    data = Path(path).read_bytes()
    if data.startswith(
        CHECKED_MAGIC
    ):  # files from before checksums start with the zip header and load as they are
        header, _, data = data.partition(b"\n")
        if hashlib.sha256(data).hexdigest().encode() != header[len(CHECKED_MAGIC) :]:
            raise ValueError(
                f"Checkpoint {path} fails its checksum: it was changed or cut short after it was "
                "written. Delete it and train without --resume (or restore a copy)."
            )
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"Checkpoint {path} holds objects other than tensors and plain data; refusing to "
            "unpickle it (that could run code). Use a checkpoint written by lmoe train."
        ) from err
    except (RuntimeError, EOFError) as err:
        raise ValueError(
            f"Checkpoint {path} is corrupt or truncated ({err}); delete it and train without "
            "--resume."
        ) from err


def adapter_state_dict(model: nn.Module) -> dict:
    """Only the trainable adapter tensors (experts + router), keyed by qualified name.

    A tensor shared by several layers (the dynamic router's lambda head) is saved once, under the
    first layer that holds it; loading it there fills every layer, since they hold the same tensor.
    """
    state, seen = {}, set()
    for name, layer in lmoe_layers(model):
        for key, tensor in layer.state_dict(keep_vars=True).items():
            if not key.startswith("base.") and id(tensor) not in seen:
                seen.add(id(tensor))
                state[f"{name}.{key}"] = tensor.detach().contiguous()
    return state


def base_fingerprint(model: nn.Module) -> dict[str, list[int]]:
    """layer name -> [d_in, d_out] of every wrapped base layer: what an adapter
    needs from its base."""
    return {name: [layer.in_features, layer.out_features] for name, layer in lmoe_layers(model)}


def adapter_meta(model: nn.Module) -> dict:
    """adapter_config.json of the model's adapter: lmoe's keys, and PEFT's (peft_type, base
    model) beside them."""
    return {
        "peft_type": PEFT_TYPE,
        "task_type": None,
        "inference_mode": True,
        "base_model_name_or_path": getattr(model, "name_or_path", None) or None,
        "lmoe_version": __version__,
        "format_version": FORMAT_VERSION,
        "base_model_type": _model_type(model),
        "config": get_config(model).to_dict(),
        "layers": base_fingerprint(model),
        "auto_mapping": _auto_mapping(model),
    }


def _auto_mapping(model: nn.Module) -> dict | None:
    """The base model's class, as PeftModel.save_pretrained records it: AutoPeftModelForCausalLM
    builds it from this."""
    inner = (
        model.get_base_model() if hasattr(model, "get_base_model") else model
    )  # a PeftModel: the model inside
    if (
        getattr(inner, "config", None) is None
    ):  # not a transformers model: nothing an Auto class could load
        return None
    return {"base_model_class": type(inner).__name__, "parent_library": type(inner).__module__}


def save_adapter(model: nn.Module, directory: str | Path) -> Path:
    """Write directory/adapter_config.json and directory/adapter_model.safetensors (atomically), the
    files PeftModel.save_pretrained writes for this adapter."""
    directory = Path(directory)
    meta = adapter_meta(model)
    state = adapter_state_dict(model)
    atomic_write(
        directory / WEIGHTS_FILE, lambda tmp: save_file(state, tmp, metadata={"format": "pt"})
    )
    meta["weights_sha256"] = sha256_file(
        directory / WEIGHTS_FILE
    )  # the config is written last: it seals the pair
    atomic_write(
        directory / CONFIG_FILE, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2) + "\n")
    )
    return directory


def is_lmoe_adapter(directory: str | Path) -> bool:
    """Whether directory holds an lmoe adapter (either format), not e.g. a PEFT LoRA."""
    path = Path(directory) / CONFIG_FILE
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return (Path(directory) / WEIGHTS_FILE_V1).is_file()
    return isinstance(meta, dict) and {"config", "layers"} <= set(meta)


def read_adapter_meta(directory: str | Path) -> dict:
    """The adapter_config.json of a saved adapter, checked for a format this version reads; config
    fields the adapter predates at the values it was saved with (config.saved_fields)."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"No adapter at {directory}: {CONFIG_FILE} is missing. "
            "Pass the directory that save_adapter (or `lmoe train`) wrote."
        )
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{path} is not valid JSON ({err}); the adapter is corrupt, save it again."
        ) from err
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(
            f"{path} was written by lmoe {meta.get('lmoe_version')} in adapter format "
            f"{meta['format_version']}; this lmoe {__version__} reads format {FORMAT_VERSION}. "
            "Upgrade lmoe to load it."
        )
    if isinstance(meta.get("config"), dict):
        meta["config"] = saved_fields(meta["config"])
    return meta


def load_adapter(base_model: nn.Module, directory: str | Path) -> nn.Module:
    """Inject the saved mixture into base_model (in place) and load its weights.
    Returns the model."""
    meta = read_adapter_meta(directory)
    check_base_matches(base_model, meta, directory)
    inject(base_model, LMoEConfig.from_dict(meta["config"]))
    _load_weights(base_model, directory, meta)
    return base_model


def load_adapter_weights(model: nn.Module, directory: str | Path) -> nn.Module:
    """Copy a saved adapter's weights into a model that has its mixture already (e.g. a checkpoint
    of this run, resumed). Returns the model."""
    meta = read_adapter_meta(directory)
    if meta["config"] != get_config(model).to_dict():
        raise ValueError(
            f"The adapter in {directory} has another mixture than this model ({meta['config']} vs "
            f"{get_config(model).to_dict()}); resume with the LMoEConfig it was trained with."
        )
    _load_weights(model, directory, meta)
    return model


def read_adapter_weights(directory: str | Path, meta: dict) -> dict:
    """The adapter's tensors keyed as adapter_state_dict keys them, from either format's file."""
    return _read_weights(weights_path(directory, meta), meta.get("weights_sha256"))


def weights_path(directory: str | Path, meta: dict) -> Path:
    return Path(directory) / (
        WEIGHTS_FILE if meta.get("format_version", 1) >= 2 else WEIGHTS_FILE_V1
    )


def verify_adapter(directory: str | Path) -> None:
    """Check a saved adapter's weights file against the checksum its config holds (what PEFT's
    loader is given before it reads the file; lmoe's own readers check in _read_weights)."""
    meta = read_adapter_meta(directory)
    verify_weights(weights_path(directory, meta), meta.get("weights_sha256"))


def verify_weights(path: Path, sha256: str | None) -> None:
    """Refuse a weights file whose SHA-256 is not the recorded one; one warning line where
    none is recorded."""
    if not path.is_file():
        raise FileNotFoundError(
            f"Adapter weights {path} are missing; the adapter directory is incomplete."
        )
    if sha256 is None:
        log.warning(
            "lmoe: adapter %s has no checksum of its weights (saved by an older lmoe): they "
            "cannot be verified. Save it again (save_adapter or save_pretrained) to seal it.",
            path.parent,
        )
    elif sha256_file(path) != sha256:
        raise ValueError(
            f"Adapter weights {path} are corrupt or truncated: they do not match the checksum in "
            f"{CONFIG_FILE} (changed or written only half-way). Save the adapter again or restore "
            "a copy."
        )


def _load_weights(model: nn.Module, directory: str | Path, meta: dict) -> None:
    weights = read_adapter_weights(directory, meta)
    expected = adapter_state_dict(model)
    missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"Adapter {directory} does not fit this model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}."
        )
    model.load_state_dict(weights, strict=False)  # copy_ casts to the model's dtype


def check_base_matches(model: nn.Module, meta: dict, directory: str | Path) -> None:
    """Every saved layer must exist in the base with the same shape; say which do not."""
    modules = dict(model.named_modules())
    problems = []
    for name, (d_in, d_out) in meta["layers"].items():
        module = modules.get(name)
        if module is None:
            problems.append(f"{name}: not in this model")
            continue
        shape = list(linear_shape(module))
        if shape != [d_in, d_out]:
            problems.append(
                f"{name}: adapter expects (d_in, d_out)=({d_in}, {d_out}), model has {tuple(shape)}"
            )
    if problems:
        raise ValueError(
            f"Adapter {directory} was trained on a different base model "
            f"({meta.get('base_model_type')}, this one is {_model_type(model)}): "
            + "; ".join(problems[:5])
            + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
            + ". Load it onto the base model it was trained with."
        )


def _read_weights(path: Path, sha256: str | None = None) -> dict:
    """The tensors of the weights file, checked against the config's checksum and
    for NaN/inf values."""
    verify_weights(path, sha256)
    try:
        weights = load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for truncated/corrupt headers
        raise ValueError(
            f"Adapter weights {path} are corrupt or truncated ({err}); save the adapter again."
        ) from err
    bad = [name for name, tensor in weights.items() if not torch.isfinite(tensor).all()]
    if bad:
        raise ValueError(
            f"Adapter weights {path} hold NaN/inf values in {bad[:3]}"
            f"{f' and {len(bad) - 3} more' if len(bad) > 3 else ''}; the training diverged. "
            "Retrain (lower lr) or use an earlier adapter."
        )
    return weights


def _model_type(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) or type(model).__name__
