"""Settings over dataclasses: `key=value` words and YAML/JSON files read into one, unknown keys
refused, and the --help text and the default YAML file written from metadata={"help": ...}.

Every `lmoe` command takes its settings this way (docs/cli.md says why): a setting is a field of the
command's dataclass, `key=value` on the command line (a nested dataclass's fields as `lmoe.rank=8`),
`key: value` in the file given with --config; the command line wins over the file.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import re
import textwrap
import types
import typing
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import yaml

HELP = "help"  # field metadata: the setting's one line of help (as PEFT's LoraConfig)
REQUIRED = "required"  # field metadata: True where the command cannot run without the setting


def setting(default: Any = None, help: str = "", factory: Any = None, required: bool = False):
    """A dataclass field with its --help line (metadata, as PEFT's LoraConfig); factory: a default
    built per instance (list, a dataclass); required: the command refuses to run without it (its
    default, None or [], only stands for "not given")."""
    metadata = {HELP: help, REQUIRED: True} if required else {HELP: help}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


class Setting(NamedTuple):
    """One field as --help and the default file show it; name dotted for a nested dataclass's."""

    name: str
    type: str
    default: Any
    help: str
    required: bool


def setting_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of dataclass cls that are settings: all but those named in its NOT_SETTINGS (an
    LMoEConfig's peft.PeftConfig fields, which PEFT fills)."""
    hidden = getattr(cls, "NOT_SETTINGS", frozenset())
    return [f for f in dataclasses.fields(cls) if f.name not in hidden]


def check_known_keys(cls: type, data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """data itself if every key is a setting of dataclass cls; else an error naming the key and
    the closest settings."""
    known = [f.name for f in setting_fields(cls)]
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=3)
            hint = (
                f" Did you mean {' or '.join(repr(prefix + c) for c in close)}?"
                if close
                else f" Known keys: {', '.join(known)}."
            )
            raise ValueError(f"{cls.__name__} has no field '{prefix}{key}'.{hint}")
    return data


class _Loader(yaml.SafeLoader):
    """yaml.safe_load's loader, except that 1e-4 and 2E5 are numbers (as in YAML 1.2 and JSON),
    not strings."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


def read_config_file(path: str | Path | None) -> dict:
    """The settings a YAML or JSON file sets ({} for None)."""
    if not path:
        return {}
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"Config file {path} does not exist; pass an existing YAML/JSON file to --config."
        )
    try:
        data = load_yaml(Path(path).read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"Config {path} is not valid YAML ({err}); fix the file.") from err
    if not isinstance(data, dict):
        raise ValueError(f"Config {path} must be a mapping of fields, got {type(data).__name__}.")
    return data


def apply_overrides(data: dict, overrides: Iterable[str], cls: type | None = None) -> dict:
    """data (copied) with "a.b=value" words set in it. The value is read as YAML ("3" -> 3,
    "[a, b]" -> a list, true, null), guided by the type of cls's field where cls is given: a text
    setting keeps the text as written (model=123, prompts="Say: hi"), a list setting takes a
    single value as a one-item list, and None is null."""
    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(
                f"Setting {item!r} must look like key=value, e.g. max_length=256 or lmoe.rank=8 "
                "(--help lists every setting)."
            )
        node, parts = data, key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = parse_value(item, text, field_type(cls, parts))
    return data


def flatten_settings(data: dict, prefix: str = "") -> dict:
    """{"lmoe": {"rank": 2}} -> {"lmoe.rank": 2}."""
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat |= flatten_settings(value, f"{prefix}{key}.")
        else:
            flat[prefix + key] = value
    return flat


def merge_settings(base: dict, top: dict) -> dict:
    """base with top's values on top, nested sections merged key by key."""
    merged = dict(base)
    for key, value in top.items():
        nested = isinstance(value, dict) and isinstance(base.get(key), dict)
        merged[key] = merge_settings(base[key], value) if nested else value
    return merged


def parse_value(item: str, text: str, hint: Any = None) -> Any:
    """The value of the word `item` (text: what follows its "="), as field type `hint` takes it."""
    try:
        value, error = load_yaml(text), None
    except yaml.YAMLError as err:
        value, error = None, err
    if hint is not None and text.strip() == "None" and fits(None, hint):
        return None
    if error is None and (hint is None or fits(value, hint)):
        return value
    if hint is not None:
        if fits(text, hint):
            return text
        if typing.get_origin(hint) is list:
            return [parse_value(item, text, typing.get_args(hint)[0])]
    if error is not None:
        raise ValueError(
            f"Setting {item!r}: the value is not valid YAML ({error}); quote it or fix it."
        ) from error
    return value  # the dataclass's own checks name what is wrong


def fits(value: Any, hint: Any) -> bool:
    """Whether value is of the field type hint (an int where a float is asked for too)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(fits(value, arg) for arg in args)
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if origin is list:
        return isinstance(value, list) and all(fits(v, args[0]) for v in value if args)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if dataclasses.is_dataclass(hint):
        return isinstance(value, (dict, hint))
    return not isinstance(hint, type) or isinstance(value, hint)


def field_type(cls: type | None, parts: list[str]) -> Any:
    """The type of the field cls.a.b (parts ["a", "b"]), or None where there is no such field."""
    for i, part in enumerate(parts):
        if cls is None or not dataclasses.is_dataclass(cls):
            return None
        hint = typing.get_type_hints(cls).get(part)
        if i == len(parts) - 1:
            return hint
        cls = hint if isinstance(hint, type) else None
    return None


def build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """An instance of dataclass cls from a mapping of its settings: a class with from_dict builds
    itself (its own checks); else an unknown key, a value of the wrong type or a missing required
    setting is an error naming it, and a nested dataclass's section is built alike."""
    if hasattr(cls, "from_dict"):
        return cls.from_dict(data)
    check_known_keys(cls, data, prefix)
    hints, values = typing.get_type_hints(cls), {}
    for f in setting_fields(cls):
        if f.metadata.get(REQUIRED) and data.get(f.name) in (None, [], ""):
            raise ValueError(f"{cls.__name__} needs {prefix}{f.name}=...: {f.metadata[HELP]}.")
        if f.name not in data:
            continue
        value, hint = data[f.name], hints[f.name]
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            value = build(hint, value, f"{prefix}{f.name}.")
        elif typing.get_origin(hint) is list and not isinstance(value, list):
            value = [value]
        if not fits(value, hint):
            raise ValueError(
                f"{cls.__name__}.{prefix}{f.name}={value!r} is invalid: expected {f.type}."
            )
        values[f.name] = value
    return cls(**values)


def load_settings(cls: type, path: str | Path | None, words: Iterable[str] = ()) -> Any:
    """cls's settings from a YAML/JSON file (None: the defaults) and key=value words on top."""
    return build(cls, apply_overrides(read_config_file(path), words, cls))


def settings(cls: type) -> Iterator[Setting]:
    """Every setting of dataclass cls, a nested dataclass's fields flattened to dotted names."""
    yield from _settings(cls, cls(), "")


def _settings(cls: type, instance: Any, prefix: str) -> Iterator[Setting]:
    """instance: the parent's default of this section. Where it equals a bare cls() in a field,
    the field's declared default is shown (None, say, rather than what __post_init__ made of it)."""
    bare = cls()
    for f in setting_fields(cls):
        value = getattr(instance, f.name)
        if dataclasses.is_dataclass(value):
            yield from _settings(type(value), value, f"{prefix}{f.name}.")
            continue
        if value == getattr(bare, f.name):
            value = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        required = bool(f.metadata.get(REQUIRED))  # its None only stands for "not given"
        kind = kind.removesuffix(" | None") if required else kind
        yield Setting(prefix + f.name, kind, value, f.metadata.get(HELP, ""), required)


def yaml_value(value: Any) -> str:
    """value as one line of YAML (flow style): [a, b], null, true, 0.002."""
    return yaml.safe_dump([value], default_flow_style=True, width=10**9).strip()[1:-1]


def _wrap(text: str, indent: str) -> list[str]:
    """text in lines of at most 100 characters, each after indent (words and paths unbroken)."""
    return textwrap.wrap(
        text, 100, initial_indent=indent, subsequent_indent=indent, break_on_hyphens=False
    )


def help_text(cls: type, command: str | None = None) -> str:
    """The settings part of `lmoe COMMAND --help`: every setting, its type, default and help."""
    files = (
        f"; or in a YAML/JSON file given with --config FILE: `lmoe config {command}` writes one"
        if command
        else ""
    )
    lines = textwrap.wrap(f"settings (key=value, a nested one as lmoe.rank=8{files}):", 100)
    for s in settings(cls):
        if s.required:
            lines.append(f"  {s.name}: {s.type} (required)")
        else:
            lines.append(f"  {s.name}: {s.type} = {yaml_value(s.default)}")
        lines += _wrap(s.help, " " * 6)
    return "\n".join(lines)


def default_yaml(cls: type, command: str) -> str:
    """cls's default settings as a YAML file, each setting's help as a comment above it."""
    lines = [
        f"# Settings of `lmoe {command}`, every one at its default: edit, then run",
        f"# `lmoe {command} --config FILE`; key=value words on the command line win over the file.",
    ]
    section: list[str] = []
    for s in settings(cls):
        *path, name = s.name.split(".")
        depth = 0
        while depth < min(len(path), len(section)) and path[depth] == section[depth]:
            depth += 1
        for level in range(depth, len(path)):
            lines.append("  " * level + f"{path[level]}:")
        section = path
        indent = "  " * len(path)
        required = " Required." if s.required else ""
        comment = f"({s.type}) {s.help}.{required}"
        lines += _wrap(comment, f"{indent}# ")
        lines.append(f"{indent}{name}: {yaml_value(s.default)}")
    return "\n".join(lines) + "\n"
