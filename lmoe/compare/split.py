"""held_out_fraction: each data file split into a train and a held-out side by a stable hash of
each record (lmoe.data.splits), written as JSONL beside the runs, the same on every invocation."""

from __future__ import annotations

import json
from pathlib import Path

from ..data.benchmarks import task_names
from ..data.records import read_records
from ..data.splits import held_out
from ..io import atomic_write
from .config import CompareConfig


def split_files(cfg: CompareConfig, directory: Path) -> dict[str, list[str]]:
    """{"data": train sides (benchmark entries as given: they have their own test side),
    "eval_data": held-out sides}; a file whose held-out side would be empty is refused."""
    data, eval_data = [], []
    for entry in cfg.data:
        if task_names([entry]):
            data.append(entry)
            continue
        records = [_row(r) for r in read_records(entry)]
        test = [held_out(json.dumps(r, sort_keys=True), cfg.held_out_fraction) for r in records]
        if all(test) or not any(test):
            raise ValueError(
                f"CompareConfig.held_out_fraction={cfg.held_out_fraction}: {entry}'s "
                f"{len(records)} records give an empty side; give eval_data=[...] instead, or "
                "more records."
            )
        stem = Path(entry).stem
        for side, keep, names in (("train", False, data), ("test", True, eval_data)):
            path = directory / f"{stem}.{side}.jsonl"
            rows = [r for r, t in zip(records, test, strict=True) if t == keep]
            text = "".join(json.dumps(r) + "\n" for r in rows)
            atomic_write(path, lambda tmp, text=text: Path(tmp).write_text(text))
            names.append(str(path))
    return {"data": data, "eval_data": eval_data}


def _row(record: dict) -> dict:
    """A record as a row that read_records reads back to it (questions: answer = gold index)."""
    if "choices" in record:
        keys = ("question", "choices", "domain")
        return {**{k: record[k] for k in keys}, "answer": record["gold"]}
    return record
