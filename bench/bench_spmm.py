"""The sparse path's SpMM on the CPU: the routed pairs' CSR matrix V (tokens, E*r) times a dense matrix, and V^T
times one, as MKL's CSR product (torch.addmm on a sparse CSR tensor, what lmoe/sparse_csr.py ran before) against
the weighted embedding-bag sum it runs now (F.embedding_bag with per-sample weights); same pattern, same values,
interleaved medians in one process. Top-2 of E experts of rank r, a random routing.

    python bench/bench_spmm.py --threads 2          # E = 64, r = 8, d = 576 and 1536, 16 / 256 / 1024 tokens
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import cpu_run, interleaved_medians  # noqa: E402
from lmoe.sparse_csr import bag_sums, pattern  # noqa: E402


def mkl_product(rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, shape, dense: torch.Tensor):
    """S @ dense through MKL's CSR product, written once into a fresh result (beta 0)."""
    S = torch.sparse_csr_tensor(rows, cols, values, shape, check_invariants=False)
    out = dense.new_empty(shape[0], dense.shape[1])
    return torch.addmm(out, S, dense, beta=0.0, out=out)


def bag_product(rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, shape, dense: torch.Tensor):
    """S @ dense as lmoe.sparse_csr runs it (the shape is implied by the pattern)."""
    return bag_sums(cols, rows, values, dense)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--dims", type=int, nargs="+", default=[576, 1536])
    p.add_argument("--tokens", type=int, nargs="+", default=[16, 256, 1024])
    p.add_argument("--rounds", type=int, default=15)
    args, device = cpu_run(p, argv)
    E, r, result = args.experts, args.rank, {}
    for d in args.dims:
        for tokens in args.tokens:
            gen = torch.Generator().manual_seed(tokens)
            pat = pattern(torch.softmax(torch.randn(tokens, E, generator=gen), -1), 2, r)
            values = torch.randn(pat.cols.shape[0], generator=gen)
            t_rows, t_cols, t_order = pat.transpose()
            B, x = torch.randn(E * r, d, generator=gen), torch.randn(tokens, d, generator=gen)
            cases = {"V @ B": (pat.rows, pat.cols, values, pat.shape, B),
                     "V^T @ x": (t_rows, t_cols, values[t_order], pat.shape[::-1], x)}
            for case, operands in cases.items():
                torch.testing.assert_close(bag_product(*operands), mkl_product(*operands), rtol=1e-4, atol=1e-4)
                calls = max(1, 4096 // tokens)
                runs = {kind: (lambda f=f, o=operands: [f(*o) for _ in range(calls)])
                        for kind, f in (("mkl csr", mkl_product), ("embedding bag", bag_product))}
                seconds = interleaved_medians(runs, args.rounds, 2, device)
                us = {kind: s / calls * 1e6 for kind, s in seconds.items()}
                result[f"d={d} tokens={tokens} {case}"] = us
                print(f"d={d:5d} tokens={tokens:5d} {case:8s} mkl csr {us['mkl csr']:8.1f} us  embedding bag "
                      f"{us['embedding bag']:8.1f} us  ({us['embedding bag'] / us['mkl csr']:.2f}x)", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "us": result}, indent=1))


if __name__ == "__main__":
    main()
