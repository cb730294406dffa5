"""A rejected kernel, kept with its measurement: the CPU sparse path as batched GEMMs over padded slots.

Each expert's pairs sit in C slots (C = its largest count; a host read, free on the CPU), so each of the six
products of a mixture's forward and backward is one torch.bmm on the banks' own (E, r, d) storage instead of one
MKL CSR product (lmoe/sparse_csr.py): X (E, C, d) = x at the slots' tokens, H = A X^T, Delta = V B^T added back
with index_add; backward dV = B^T dY^T, dB = V^T dY, dA = dH^T X, dx = dH A. An empty slot reads token 0 and
carries a zero code. Exact (tested below against CsrMixture in float64, values and every gradient); timed here
against CsrMixture on the same routing, forward + backward, interleaved medians. Result (bench/RESULTS.md,
"Sparse routing"): no gain large enough to carry a third kernel, so the library does not use it.

    python bench/bench_padded.py --threads 2
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import cpu_run, interleaved_medians  # noqa: E402
from lmoe.sparse import mixed_code, pair_codes, pair_codes_backward  # noqa: E402
from lmoe.sparse_csr import CsrMixture, Pattern, pattern  # noqa: E402


@dataclass
class Slots:
    dest: Tensor  # (N,) each pair's slot, e * C + its place among expert e's pairs
    token: Tensor  # (E * C,) each slot's token (0 when empty)
    experts: int
    capacity: int

    def gather(self, rows: Tensor) -> Tensor:
        return rows.index_select(0, self.token).view(self.experts, self.capacity, -1)

    def spread(self, values: Tensor) -> Tensor:
        out = values.new_zeros(self.experts * self.capacity, values.shape[1])
        return out.index_copy_(0, self.dest, values).view(self.experts, self.capacity, -1)

    def collect(self, per_slot: Tensor) -> Tensor:  # (E, r, C) -> (N, r)
        return per_slot.transpose(1, 2).reshape(-1, per_slot.shape[1]).index_select(0, self.dest)

    def add_to(self, rows: Tensor, per_slot: Tensor) -> Tensor:  # the scale rides on the codes, not on index_add
        return rows.index_add(0, self.token, per_slot.view(-1, per_slot.shape[-1]))


def slots(pat: Pattern) -> Slots:
    E = pat.shape[1] // pat.rank
    by_expert = torch.argsort(pat.expert, stable=True)
    counts = torch.bincount(pat.expert, minlength=E)
    capacity = int(counts.max())
    expert = pat.expert.index_select(0, by_expert)
    within = torch.arange(by_expert.shape[0]) - (counts.cumsum(0) - counts).index_select(0, expert)
    dest = torch.empty_like(by_expert).index_copy_(0, by_expert, expert * capacity + within)
    return Slots(dest, pat.token.new_zeros(E * capacity).index_copy_(0, dest, pat.token), E, capacity)


class PaddedMixture(torch.autograd.Function):
    """y + s * Delta over the pattern's pairs in their slots; arguments as lmoe.sparse_csr.CsrMixture plus the slots."""

    @staticmethod
    def forward(ctx, y, x, A, B, g, pat, sl, s, params):
        w = g[pat.token, pat.expert]
        h = sl.collect(torch.bmm(A, sl.gather(x).transpose(1, 2)))
        z = mixed_code(h, w, pat.token, x.shape[0]) if params else None
        out = sl.add_to(y, torch.bmm(sl.spread(s * pair_codes(h, w, z, pat.token)), B.transpose(1, 2)))
        ctx.save_for_backward(x, A, B, w, h, z)
        ctx.pattern, ctx.slots, ctx.s, ctx.shape = pat, sl, s, g.shape
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, A, B, w, h, z = ctx.saved_tensors
        pat, sl, s = ctx.pattern, ctx.slots, ctx.s
        dY = sl.gather(grad_out)
        grad_v = sl.collect(torch.bmm(B.transpose(1, 2), dY.transpose(1, 2))).mul_(s)
        grad_B = torch.bmm(sl.spread(s * pair_codes(h, w, z, pat.token)).transpose(1, 2), dY).transpose(1, 2)
        grad_h, grad_w = pair_codes_backward(grad_v, h, w, z, pat.token)
        grad_g = w.new_zeros(ctx.shape).index_put_((pat.token, pat.expert), grad_w)
        dH = sl.spread(grad_h)
        grad_A = torch.bmm(dH.transpose(1, 2), sl.gather(x))
        grad_x = sl.add_to(torch.zeros_like(x), torch.bmm(dH, A))
        return grad_out, grad_x, grad_A, grad_B, grad_g, None, None, None, None


def inputs(tokens: int, d: int, E: int, r: int, k: int, dtype: torch.dtype, seed: int = 0):
    """Leaf tensors (y, x, A, B in lora_B's layout, g from a top-k gate at init) and the routing's pattern."""
    gen = torch.Generator().manual_seed(seed)
    y, x = torch.randn(tokens, d, generator=gen, dtype=dtype), torch.randn(tokens, d, generator=gen, dtype=dtype)
    A = torch.randn(E, r, d, generator=gen, dtype=dtype) * 0.02
    B = (torch.randn(E, r, d, generator=gen, dtype=dtype) * 0.02).transpose(1, 2)
    u = x @ (torch.randn(E, d, generator=gen, dtype=dtype) * d ** -0.5).t()
    top, index = u.topk(k, -1)
    g = torch.zeros_like(u).scatter(1, index, torch.softmax(top, -1))
    leaves = [t.requires_grad_() for t in (y, x, A, B, g)]
    return leaves, pattern(g.detach(), k, r, index), index


def check(params: bool) -> None:
    """float64: the padded kernel's values and gradients equal CsrMixture's."""
    (y, x, A, B, g), pat, _ = inputs(50, 7, 16, 3, 2, torch.float64)
    a = PaddedMixture.apply(y, x, A, B, g, pat, slots(pat), 1.5, params)
    b = CsrMixture.apply(y, x, A, B, g, pat, 1.5, params)
    grad = torch.randn_like(a)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for p, q in zip(torch.autograd.grad(a, (y, x, A, B, g), grad), torch.autograd.grad(b, (y, x, A, B, g), grad)):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dim", type=int, default=576)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--tokens", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--repeats", type=int, default=21)
    args, device = cpu_run(p, argv)
    for params in (True, False):
        check(params)
    results = {}
    for tokens in args.tokens:
        (y, x, A, B, g), pat, index = inputs(tokens, args.dim, args.experts, 8, 2, torch.float32)
        sl = slots(pat)
        grad = torch.randn(tokens, args.dim)

        def step(kernel):
            def run():  # the pattern (and slots) built each time, as a layer builds them each forward
                pattern_now = pattern(g.detach(), 2, 8, index)
                extra = (slots(pattern_now),) if kernel is PaddedMixture else ()
                out = kernel.apply(y, x, A, B, g, pattern_now, *extra, 2.0, True)
                torch.autograd.grad(out, (x, A, B, g), grad)
            return run
        t = interleaved_medians({"csr": step(CsrMixture), "padded": step(PaddedMixture)}, args.repeats, 3, device)
        waste = sl.experts * sl.capacity / pat.token.shape[0]
        results[tokens] = {**t, "slots_per_pair": waste}
        print(f"{tokens:5d} tokens, E={args.experts}: slots / pairs {waste:.2f}; fwd+bwd csr {t['csr'] * 1e3:.2f} ms, "
              f"padded {t['padded'] * 1e3:.2f} ms ({t['padded'] / t['csr']:.2f}x csr)")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=1))


if __name__ == "__main__":
    main()
