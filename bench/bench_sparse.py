"""Dense against sparse execution of one mixture layer (LMoEConfig.execution), the measurements
behind the auto rule (lmoe.sparse.prefer_sparse): a top-k layer (k experts a token) forced dense and
forced sparse, interleaved in one process, training step (fwd+bwd) and no-grad forward (generation),
over E, r, k and the token count. Prints the time ratio sparse / dense (< 1: sparse is faster) and
what the rule picks.

    python bench/bench_sparse.py  # d = 576: E 4..64, r 4/8/16, k 1/2, 1..1024 tokens
    python bench/bench_sparse.py --dim 3072 --tokens 1024 --ranks 8
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import add_cpu_options, environment, interleaved_medians, prepare_cpu  # noqa: E402
from lmoe import LMoEConfig, MoLoRALinear  # noqa: E402
from lmoe.kernels.csr import csr_ok  # noqa: E402
from lmoe.sparse import group_cost, prefer_sparse  # noqa: E402


def layers(base: nn.Linear, point: dict) -> dict[str, nn.Module]:
    """The two layers a point compares, with the same weights: forced dense and forced sparse."""
    cfg = LMoEConfig(
        num_experts=point["experts"],
        rank=point["rank"],
        alpha=2 * point["rank"],
        router=point["router"],
        top_k=point["k"],
        composition=point["composition"],
        target_modules="all-linear",
    )
    pair = {}
    for name in ("dense", "sparse"):
        torch.manual_seed(0)
        pair[name] = MoLoRALinear(base, cfg)
        nn.init.normal_(pair[name].lora_B, std=0.02)
        pair[name].execution = name
    return pair


def measure(point: dict, args, device: torch.device) -> dict:
    tokens = point["tokens"]
    torch.manual_seed(0)
    base = nn.Linear(args.dim, args.dim, bias=False, device=device).requires_grad_(False)
    pair = {n: m.to(device) for n, m in layers(base, point).items()}
    x = torch.randn(tokens, args.dim, device=device, requires_grad=True)
    dy = torch.randn(tokens, args.dim, device=device)

    def train(m):
        def run():
            m(x).backward(dy)

        return run

    def infer(m):
        def run():
            with torch.no_grad():
                m(x)

        return run

    def clear():
        for m in pair.values():
            m.zero_grad(set_to_none=True)
        x.grad = None

    repeats = (
        args.repeats if tokens >= 128 else 3 * args.repeats
    )  # short runs: more of them, same wall time
    fb = interleaved_medians(
        {n: train(m) for n, m in pair.items()}, repeats, args.warmup, device, clear
    )
    fwd = interleaved_medians({n: infer(m) for n, m in pair.items()}, repeats, args.warmup, device)
    cost = group_cost(
        csr_ok(device, torch.float32)
    )  # the kernel the layer runs here: its rule's constant
    rule = (
        "sparse"
        if prefer_sparse(point["experts"], point["rank"], point["k"], tokens, cost)
        else "dense"
    )
    return {**point, "fwd_bwd_s": fb, "fwd_s": fwd, "rule": rule}


def points(args) -> list[dict]:
    """Every (E, r, k, tokens) to measure: a top-k layer in --composition."""
    return [
        dict(experts=e, rank=r, k=k, tokens=t, router="topk", composition=args.composition)
        for e, r, k, t in itertools.product(args.experts, args.ranks, args.k, args.tokens)
        if k < e
    ]


def main(argv: list[str] | None = None) -> None:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--dim", type=int, default=576)
    p.add_argument("--experts", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    p.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--k", type=int, nargs="+", default=[1, 2])
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 128, 1024])
    p.add_argument("--composition", default="params", choices=["params", "outputs"])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    add_cpu_options(p)
    p.add_argument("--json", type=Path, help="write every figure here (rewritten after each point)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    prepare_cpu(args, device)
    print(environment(device))
    a, b = "dense", "sparse"
    print(
        f"d={args.dim} repeats={args.repeats} (x3 under 128 tokens); ratios {b} / {a} (< 1: {b} "
        "is faster)"
    )
    print(
        f"{'E':>4s} {'r':>3s} {'k':>2s} {'tokens':>6s} {'router':>8s} {'comp.':>8s} "
        f"{a + ' fb ms':>11s} {'ratio':>6s} {a + ' fwd ms':>12s} {'ratio':>6s}  rule"
    )
    results = []
    for point in points(args):
        res = measure(point, args, device)
        results.append(res)
        fb, fwd = res["fwd_bwd_s"], res["fwd_s"]
        print(
            f"{res['experts']:4d} {res['rank']:3d} {res['k']:2d} {res['tokens']:6d} "
            f"{res['router']:>8s} {res['composition']:>8s} {1e3 * fb[a]:11.3f} "
            f"{fb[b] / fb[a]:6.2f} {1e3 * fwd[a]:12.3f} {fwd[b] / fwd[a]:6.2f}  {res['rule']}",
            flush=True,
        )
        if args.json:
            args.json.write_text(
                json.dumps(
                    {
                        "env": environment(device),
                        "args": {k: str(v) for k, v in vars(args).items()},
                        "results": results,
                    },
                    indent=1,
                )
            )
    for key in ("fwd_bwd_s", "fwd_s"):
        ratios = [r[key][b] / r[key][a] for r in results]
        print(
            f"{key}: geometric mean of {b} / {a} over {len(ratios)} points: "
            f"{math.exp(sum(map(math.log, ratios)) / len(ratios)):.3f}"
        )


if __name__ == "__main__":
    main()
