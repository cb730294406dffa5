"""One mixture layer while generating: a no-grad forward of a few tokens, E = 4 (dense) against large E (its
experts gathered per token), beside the frozen base product alone; interleaved medians in one process.

    python bench/bench_decode.py --threads 2                  # d = 576, 2 tokens, top-2, E 4 / 16 / 64
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.bench_layer import ours  # noqa: E402
from bench.common import cpu_run  # noqa: E402


def medians_us(runs: dict, rounds: int, calls: int) -> dict[str, float]:
    """Median over rounds of the mean time of `calls` calls, each round running every variant in turn."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            for _ in range(calls):
                run()
            times[name].append((time.perf_counter() - start) / calls * 1e6)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dim", type=int, default=576)
    p.add_argument("--tokens", type=int, default=2)
    p.add_argument("--experts", type=int, nargs="+", default=[4, 16, 64])
    p.add_argument("--composition", default="params", choices=["params", "outputs"])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--calls", type=int, default=200)
    args, device = cpu_run(p, argv)
    torch.manual_seed(0)
    base = nn.Linear(args.dim, args.dim, bias=False).requires_grad_(False)
    x = torch.randn(1, args.tokens, args.dim)
    runs = {"base alone": lambda: base(x)}
    for e in args.experts:
        layer = ours(base, e, 8, "topk", args.composition).eval()
        nn.init.normal_(layer.lora_B, std=0.02)
        runs[f"E={e}"] = (lambda m: lambda: m(x))(layer)
    with torch.no_grad():
        medians_us(runs, 2, args.calls)  # warm-up
        result = medians_us(runs, args.rounds, args.calls)
    ref = result[f"E={args.experts[0]}"]
    for name, us in result.items():
        print(f"{name:12s} {us:8.1f} us  {us / ref:5.2f}x E={args.experts[0]}")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "us": result}, indent=1))


if __name__ == "__main__":
    main()
