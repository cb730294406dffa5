"""`lmoe train` runs of the tiny model for the fault, resume and interrupt tests: the command line,
and how far a run (perhaps in another process) has got."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tiny import tiny_model_dir, write_jsonl

import lmoe

ROWS = [
    {"prompt": f"What is {a} + {b}?", "completion": str(a + b)}
    for a in range(10, 16)
    for b in range(20, 23)
]
STEPS = 12


def model_and_data(root: Path) -> tuple[Path, Path]:
    """The tiny model's directory and a data file of sums under root: the `setup` of these tests."""
    return tiny_model_dir(root / "model"), write_jsonl(root / "sums.jsonl", ROWS)


def train_argv(setup, out, *overrides) -> list[str]:
    """`lmoe train` of the tiny model on the sums: STEPS steps, a checkpoint every 2."""
    model, data = setup
    return [
        "train",
        f"model={model}",
        f"data=[{data}]",
        f"output_dir={out}",
        f"steps={STEPS}",
        "batch_size=4",
        "lr=0.01",
        "warmup_steps=2",
        "save_every=2",
        "compare_base=false",
        "lmoe.num_experts=3",
        "lmoe.rank=2",
        "lmoe.target_modules=all-linear",
        "lmoe.dropout=0.1",
        *overrides,
    ]


def steps_logged(out: Path) -> int:
    """The rows of out/metrics.csv so far (0 before it exists)."""
    try:
        return max(0, len((out / "metrics.csv").read_text().splitlines()) - 1)
    except FileNotFoundError:
        return 0


def start_cli(argv: list[str], **popen) -> subprocess.Popen:
    """`python -m lmoe.cli ARGV` in a new process, running this checkout's lmoe."""
    env = {**os.environ, "PYTHONPATH": str(Path(lmoe.__file__).parents[1])}
    return subprocess.Popen([sys.executable, "-m", "lmoe.cli", *argv], env=env, **popen)
