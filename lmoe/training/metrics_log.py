"""The per-step log of a training run: metrics.csv (one row a step, cut back to the checkpoint's
step on resume), TensorBoard if installed."""

from __future__ import annotations

import csv
from pathlib import Path

from ..inject import AUX_COEFS
from ..io import atomic_write
from ..routing_stats import TOKEN_STATISTICS

METRICS = "metrics.csv"
ROUTING_COLUMNS = list(TOKEN_STATISTICS)  # means per token and layer (lmoe.routing_stats)
COLUMNS = [
    "step",
    "loss",
    "lm_loss",
    "aux_loss",
    *AUX_COEFS,
    *ROUTING_COLUMNS,
    "eval_loss",
    "lr",
    "grad_norm",
    "tokens",
    "tokens_per_s",
    "elapsed_s",
]


class MetricsLog:
    """metrics.csv (rows after the resumed step are dropped) and TensorBoard
    when it is installed."""

    def __init__(self, directory: Path, resume_step: int) -> None:
        self.path = directory / METRICS
        rows = []
        if resume_step and self.path.is_file():
            with open(self.path, newline="") as f:
                kept = {
                    int(r["step"]): r for r in csv.DictReader(f) if int(r["step"]) <= resume_step
                }
            rows = [kept[step] for step in sorted(kept)]  # each step once: its last row written

        def write(tmp: str) -> None:
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, COLUMNS)
                writer.writeheader()
                writer.writerows(rows)

        atomic_write(self.path, write)  # an interrupt here keeps the old rows
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.board = SummaryWriter(str(directory / "tensorboard"))
        except ImportError:  # tensorboard is optional
            self.board = None

    def write(self, row: dict) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, COLUMNS).writerow(row)
        if self.board is not None:
            for key, value in row.items():
                if key != "step" and value != "":
                    self.board.add_scalar(f"train/{key}", value, row["step"])

    def close(self) -> None:
        if self.board is not None:
            self.board.close()


def read_metrics(directory: str | Path) -> list[dict]:
    """The rows of a run's metrics.csv as dicts of floats ('' for a missing aux term)."""
    with open(Path(directory) / METRICS, newline="") as f:
        return [
            {k: float(v) if v != "" else "" for k, v in row.items()} for row in csv.DictReader(f)
        ]
