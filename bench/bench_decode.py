"""One mixture layer while generating: a no-grad forward of a few tokens, E = 4 (dense) against
large E (its experts gathered per token), beside the frozen base product alone; interleaved
medians in one process.

    python bench/bench_decode.py --threads 2  # d = 576, 2 tokens, top-2, E 4 / 16 / 64
    # lambda held where 2 experts a token are on
    python bench/bench_decode.py --router dynamic --threads 2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.bench_layer import hold_active, ours  # noqa: E402
from bench.common import cpu_run, interleaved_medians  # noqa: E402


def repeated(run, calls: int):
    """run called `calls` times: one timed unit, so that a call of a few microseconds
    is timed in bulk."""

    def many():
        for _ in range(calls):
            run()

    return many


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dim", type=int, default=576)
    p.add_argument("--tokens", type=int, default=2)
    p.add_argument("--experts", type=int, nargs="+", default=[4, 16, 64])
    p.add_argument("--composition", default="params", choices=["params", "outputs"])
    p.add_argument("--router", default="topk", choices=["topk", "dynamic"])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--calls", type=int, default=200)
    args, device = cpu_run(p, argv)
    torch.manual_seed(0)
    base = nn.Linear(args.dim, args.dim, bias=False).requires_grad_(False)
    x = torch.randn(1, args.tokens, args.dim)
    runs = {"base alone": repeated(lambda: base(x), args.calls)}
    for e in args.experts:
        layer = ours(base, e, 8, args.router, args.composition).eval()
        nn.init.normal_(layer.lora_B, std=0.02)
        if (
            args.router == "dynamic"
        ):  # lambda held where 2 experts a token are on, as after training
            hold_active(layer, torch.randn(1, 64, args.dim), 2.0)
        runs[f"E={e}"] = repeated((lambda m: lambda: m(x))(layer), args.calls)
    with torch.no_grad():
        seconds = interleaved_medians(runs, args.rounds, 2, device)
    result = {name: s / args.calls * 1e6 for name, s in seconds.items()}
    ref = result[f"E={args.experts[0]}"]
    for e in args.experts:
        name = f"E={e}"
        print(f"{name:12s} {result[name]:8.1f} us  {result[name] / ref:5.2f}x E={args.experts[0]}")
    print(f"{'base alone':12s} {result['base alone']:8.1f} us")
    if args.json:
        args.json.write_text(
            json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "us": result}, indent=1)
        )


if __name__ == "__main__":
    main()
