"""Dense against sparse execution of one mixture layer (LMoEConfig.execution), the measurements behind the
auto rule (lmoe.sparse.prefer_sparse): a top-k layer (k experts a token) forced dense and forced sparse,
interleaved in one process, training step (fwd+bwd) and no-grad forward (generation), over E, r, k and the
token count. Prints the time ratio sparse / dense (< 1: sparse is faster) and what the rule picks.

    python bench/bench_sparse.py                         # d = 576: E 4..64, r 4/8/16, k 1/2, 1..1024 tokens
    python bench/bench_sparse.py --dim 3072 --tokens 1024 --ranks 8
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import add_cpu_options, environment, interleaved_medians, prepare_cpu  # noqa: E402
from lmoe import LMoEConfig, MoLoRALinear  # noqa: E402
from lmoe.sparse import prefer_sparse  # noqa: E402


def layers(base: nn.Linear, experts: int, rank: int, k: int, composition: str) -> dict[str, MoLoRALinear]:
    cfg = LMoEConfig(num_experts=experts, rank=rank, alpha=2 * rank, router="topk", top_k=k,
                     composition=composition, target_modules="all-linear", load_balance_coef=0.0)
    dense = MoLoRALinear(base, cfg)
    nn.init.normal_(dense.lora_B, std=0.02)
    sparse = MoLoRALinear(base, cfg)
    sparse.load_state_dict(dense.state_dict())
    dense.execution, sparse.execution = "dense", "sparse"
    return {"dense": dense, "sparse": sparse}


def measure(experts: int, rank: int, k: int, tokens: int, args, device: torch.device) -> dict:
    torch.manual_seed(0)
    base = nn.Linear(args.dim, args.dim, bias=False, device=device).requires_grad_(False)
    pair = {n: m.to(device) for n, m in layers(base, experts, rank, k, args.composition).items()}
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

    repeats = args.repeats if tokens >= 128 else 3 * args.repeats  # short runs: more of them, same wall time
    fb = interleaved_medians({n: train(m) for n, m in pair.items()}, repeats, args.warmup, device, clear)
    fwd = interleaved_medians({n: infer(m) for n, m in pair.items()}, repeats, args.warmup, device)
    return {"experts": experts, "rank": rank, "k": k, "tokens": tokens, "fwd_bwd_s": fb, "fwd_s": fwd,
            "rule": "sparse" if prefer_sparse(experts, rank, k, tokens) else "dense"}


def main(argv: list[str] | None = None) -> None:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    print(f"d={args.dim} composition={args.composition} repeats={args.repeats} (x3 under 128 tokens)")
    print(f"{'E':>4s} {'r':>3s} {'k':>2s} {'tokens':>6s} {'dense fb ms':>11s} {'sparse/dense':>12s} "
          f"{'dense fwd ms':>12s} {'sparse/dense':>12s}  rule")
    results = []
    for e, r, k, t in itertools.product(args.experts, args.ranks, args.k, args.tokens):
        if k >= e:
            continue
        res = measure(e, r, k, t, args, device)
        results.append(res)
        fb, fwd = res["fwd_bwd_s"], res["fwd_s"]
        print(f"{e:4d} {r:3d} {k:2d} {t:6d} {1e3 * fb['dense']:11.3f} {fb['sparse'] / fb['dense']:12.2f} "
              f"{1e3 * fwd['dense']:12.3f} {fwd['sparse'] / fwd['dense']:12.2f}  {res['rule']}", flush=True)
        if args.json:
            args.json.write_text(json.dumps({"env": environment(device), "args": {k: str(v) for k, v in
                                                                                  vars(args).items()},
                                             "results": results}, indent=1))


if __name__ == "__main__":
    main()
