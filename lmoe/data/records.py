"""Records from user files: JSONL (prompt/completion, messages, text, or a multiple-choice row),
CSV, JSON or Parquet, each row checked and normalised, a bad one named by file and line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from .choices import choice_record
from .encoding import chat


def read_records(
    path: str | Path, domain: str | None = None, group: str | None = None
) -> list[dict]:
    """Records from JSONL (prompt/completion, messages or text), or CSV/JSON/Parquet (`datasets`).

    Each record's "domain" (what evaluation and analysis group by) is the row's value of the key
    `group` when one is named (every row must have it), else the row's "domain", else `domain`,
    else the file name."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Data file {path} does not exist.")
    domain = domain or path.stem
    if path.suffix == ".jsonl":
        rows = _read_jsonl(path)
    elif path.suffix in (".csv", ".json", ".parquet"):
        rows = _read_with_datasets(path)
    else:
        raise ValueError(
            f"Data file {path}: expected .jsonl, .csv, .json or .parquet, got "
            f"{path.suffix or 'no suffix'}."
        )
    records = [
        to_record(grouped(row, group, f"{path}:{i}"), domain, f"{path}:{i}") for i, row in rows
    ]
    if not records:
        raise ValueError(
            f"Data file {path} holds no records; add one per line, e.g. "
            '{"prompt": "...", "completion": "..."}, {"messages": [...]} or {"text": "..."}.'
        )
    return records


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"{path}:{number}: not valid JSON ({err.msg} at column {err.colno}); "
                    "each line must be one JSON object."
                ) from err
            yield number, row


def _read_with_datasets(path: Path) -> Iterator[tuple[int, dict]]:
    from datasets import (
        load_dataset,
    )  # imported here: slow to import, and only these formats need it

    kind = {".csv": "csv", ".json": "json", ".parquet": "parquet"}[path.suffix]
    table = load_dataset(kind, data_files=str(path), split="train")
    for number, row in enumerate(table, start=1):
        yield number, row


def grouped(row: object, group: str | None, where: str) -> object:
    """The row with its "domain" set to its value of the key `group` (None: the row as it is);
    a row without that key is an error, not a silent group of its own."""
    if group is None or not isinstance(row, dict):
        return row
    value = row.get(group)
    if value is None or value == "":
        raise ValueError(
            f"{where}: no {group!r} key to group by (--group / eval_group={group}); "
            "give every row one, or group by another key."
        )
    return {**row, "domain": str(value)}


def to_record(row: object, domain: str, where: str) -> dict:
    """Normalise one row ({prompt, completion} | {messages} | {text} | {question, choices, answer})
    to a record; say where a bad one is."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}.")
    if "choices" in row:
        return choice_record(row, domain, where)
    domain = str(row.get("domain") or domain)
    if "messages" in row:
        messages = row["messages"]
        ok = (
            isinstance(messages, list)
            and messages
            and all(
                isinstance(m, dict)
                and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)
                for m in messages
            )
        )
        if not ok or not any(m["role"] == "assistant" for m in messages):
            raise ValueError(
                f"{where}: 'messages' must be a list of {{'role', 'content'}} strings "
                "with at least one assistant turn."
            )
        return {
            "messages": [{"role": m["role"], "content": m["content"]} for m in messages],
            "domain": domain,
        }
    if isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str):
        return {"messages": chat(row["prompt"], row["completion"]), "domain": domain}
    if isinstance(row.get("text"), str):
        return {"text": row["text"], "domain": domain}
    raise ValueError(
        f"{where}: expected keys prompt+completion, messages, or text (strings), "
        "or question+choices+answer; "
        f"got {sorted(row)}."
    )
