"""What keeping freed memory (lmoe/allocator.py, on by default in `lmoe train` on a CPU) saves a training step.

mallopt changes a whole process, so the two allocators cannot share one: each round runs one process per allocator,
alternating, each timing SmolLM2-135M training steps (top-k params, every linear layer, 2 x 128 tokens, fused
AdamW, gradients set to None as `lmoe train` does) and reporting its median step and peak RSS.

    python bench/bench_allocator.py --experts 4 --rounds 3 --threads 2
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
ALLOCATORS = ("default", "kept")


def one_process(allocator: str, experts: int, steps: int, threads: int) -> dict:
    """In this process: the allocator, then `steps` training steps; median of all but the first two."""
    from lmoe.allocator import keep_freed_memory
    if allocator == "kept" and not keep_freed_memory():
        raise SystemExit("no glibc here: nothing to compare")
    torch.set_num_threads(threads)
    from bench.bench_model import load_base, loss_of, ours
    from lmoe.training.optim import adamw
    base = load_base(torch.device("cpu"))
    ids = torch.randint(0, base.config.vocab_size, (2, 128), generator=torch.Generator().manual_seed(0))
    model = ours(base, experts, 8, "topk", "params").train()
    optimizer = adamw([{"params": [p for p in model.parameters() if p.requires_grad]}], lr=1e-5)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss_of(model, ids).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return {"step_s": statistics.median(times[2:]), "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path)
    p.add_argument("--child", choices=ALLOCATORS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(one_process(args.child, args.experts, args.steps, args.threads)))
        return
    runs = {name: [] for name in ALLOCATORS}
    for _ in range(args.rounds):
        for name in ALLOCATORS:
            cmd = [sys.executable, __file__, "--child", name, "--experts", str(args.experts), "--steps", str(args.steps),
                   "--threads", str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            runs[name].append(json.loads(out.strip().splitlines()[-1]))
            print(name, runs[name][-1], flush=True)
    step = {n: statistics.mean(r["step_s"] for r in rs) for n, rs in runs.items()}
    rss = {n: statistics.mean(r["peak_rss_mib"] for r in rs) for n, rs in runs.items()}
    print(f"E={args.experts}: step {step['default']:.3f} s default, {step['kept']:.3f} s kept "
          f"({step['kept'] / step['default']:.2f}x); peak RSS {rss['default']:.0f} / {rss['kept']:.0f} MiB "
          f"({rss['kept'] / rss['default']:.2f}x); means over {args.rounds} processes each")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
