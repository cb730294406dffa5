"""Soak test (not in CI): train a tiny model for a long time and check that memory does not grow.

Samples, every --every steps: process RSS, Python heap (tracemalloc, current), and CUDA allocated
bytes when on a GPU. After a warm-up (the first 20% of the run: allocator pools and caches fill),
the growth of each from its first to its last sample must stay under --max-growth-mb, and the
least-squares slope over the samples after warm-up under --max-slope-kb per step. Exit code 1
if either is exceeded.

    .venv/bin/python bench/soak.py --steps 3000 --every 100  # about 15 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import psutil
import torch

sys.path.insert(
    0, str(Path(__file__).resolve().parents[1] / "tests")
)  # the tiny local model (no downloads)
from tiny import tiny_model_dir, write_jsonl  # noqa: E402

from lmoe.training.config import TrainConfig  # noqa: E402
from lmoe.training.loop import train  # noqa: E402

MB = 1 << 20


def sample(step: int) -> dict:
    row = {
        "step": step,
        "rss_mb": psutil.Process().memory_info().rss / MB,
        "python_heap_mb": tracemalloc.get_traced_memory()[0] / MB,
    }
    if torch.cuda.is_available():
        row["cuda_allocated_mb"] = torch.cuda.memory_allocated() / MB
    return row


def slope(xs: list[float], ys: list[float]) -> float:
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0


def verdict(samples: list[dict], max_growth_mb: float, max_slope_kb: float) -> dict:
    """Growth and slope of every measure over the samples after warm-up, and whether they pass."""
    after = samples[max(1, len(samples) // 5) :]
    result = {}
    for key in (k for k in after[0] if k != "step"):
        values = [s[key] for s in after]
        per_step = slope([s["step"] for s in after], values) * 1024
        growth = values[-1] - values[0]
        result[key] = {
            "first_mb": round(values[0], 2),
            "last_mb": round(values[-1], 2),
            "peak_mb": round(max(values), 2),
            "growth_mb": round(growth, 2),
            "slope_kb_per_step": round(per_step, 3),
            "ok": growth < max_growth_mb and per_step < max_slope_kb,
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--every", type=int, default=100, help="sample memory every N steps")
    parser.add_argument(
        "--save-every",
        type=int,
        default=250,
        help="checkpoint every N steps (exercises saving too)",
    )
    parser.add_argument("--max-growth-mb", type=float, default=20.0)
    parser.add_argument("--max-slope-kb", type=float, default=4.0, help="KiB per step")
    parser.add_argument("--router", default="dynamic", choices=["softmax", "topk", "dynamic"])
    parser.add_argument("--json", help="write the samples and the verdict here")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="lmoe-soak-"))
    rows = [
        {"prompt": f"What is {a} + {b}?", "completion": str(a + b)}
        for a in range(10, 40)
        for b in range(20, 30)
    ]
    cfg = TrainConfig.from_dict(
        {
            "model": str(tiny_model_dir(root / "model")),
            "data": [str(write_jsonl(root / "sums.jsonl", rows))],
            "output_dir": str(root / "run"),
            "steps": args.steps,
            "batch_size": 8,
            "lr": 1e-3,
            "warmup_steps": 10,
            "save_every": args.save_every,
            "compare_base": False,
            "lmoe": {
                "num_experts": 4,
                "rank": 4,
                "router": args.router,
                "target_modules": "all-linear",
                "lambda_hidden": 16,
                "load_balance_coef": 0.01,
                "z_loss_coef": 0.001,
            },
        }
    )
    samples: list[dict] = []
    snapshots = []  # Python heap after warm-up and at the end: where it grew, if it did
    started = time.perf_counter()
    tracemalloc.start()

    def on_step(row: dict) -> None:
        if row["step"] % args.every == 0:
            samples.append(sample(int(row["step"])))
            print(json.dumps(samples[-1]), flush=True)
        if row["step"] == max(1, args.steps // 5):
            snapshots.append(tracemalloc.take_snapshot())

    train(cfg, on_step=on_step)
    growth = [
        f"{stat.size_diff / 1024:+.1f} KiB {stat.traceback}"
        for stat in tracemalloc.take_snapshot().compare_to(snapshots[0], "lineno")[:5]
    ]
    tracemalloc.stop()
    result = verdict(samples, args.max_growth_mb, args.max_slope_kb)
    report = {
        "steps": args.steps,
        "router": args.router,
        "seconds": round(time.perf_counter() - started, 1),
        "torch": torch.__version__,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "verdict": result,
        "python_heap_growth_top5": growth,
        "samples": samples,
    }
    print(json.dumps({k: v for k, v in report.items() if k != "samples"}, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    sys.exit(0 if all(v["ok"] for v in result.values()) else 1)


if __name__ == "__main__":
    main()
