"""The CSR kernel: the grouped kernel's pairs on the CPU as one block-sparse (tokens, E*r) matrix.

Grouping pairs by expert (grouped.py) runs one small GEMM per expert and product, each with a fixed
call overhead whatever its size. Here the pairs' weighted codes are the values of a CSR matrix V
(tokens, E*r) whose row t holds, at the columns e*r .. e*r + r-1 of each of its experts e, that
pair's r-vector; then every product of the mixture is one sparse-dense product, whose cost is the
pairs' multiply-adds:
    h = (x A^T) sampled at V's pattern        (SDDMM: MKL's, torch.sparse.sampled_addmm)
    y + s V B                                  (SpMM)
    backward: dV = s (dy B^T) at the pattern; dB = s V^T dy; dA = dH^T x; dx = dH A
    (dH: dh at V's pattern)
with A (E*r, d_in) and B (E*r, d_out) the banks' own storage (lora_A, layer.expert_bank_B), so no
weight is copied or gathered and no (pairs, d) row is gathered or scattered. Each SpMM is a weighted
embedding-bag sum (row t of V @ D sums the rows of D at V's columns, weighted by V's values:
F.embedding_bag with per-sample weights), faster than MKL's CSR product (bench/RESULTS.md, "Settled
questions and rejected designs"). The transposed products read V^T's pattern (rows e*r + j, columns
the expert's tokens), built once from a fixed permutation of the values. The per-pair weighting is
pairs.py's, on (pairs, r) values in token order.

Where it wins: many experts with few active a token, on the CPU in float32/64 (what MKL's sparse
products take); bench/RESULTS.md, "Sparse routing: cost as the number of experts grows" (the
kernels in one process, and the auto rule's CSR constant).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .interface import KernelInputs
from .pairs import pairs_mixed_code, weighted_pair_codes, weighted_pair_codes_backward


def csr_ok(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the CSR path runs a layer computing in dtype on device: CPU float32 / float64 (what
    MKL's sparse products take)."""
    return device.type == "cpu" and dtype in (torch.float32, torch.float64)


@dataclass
class CsrPattern:
    """The pairs in token order and the CSR pattern V they make for experts of rank r; V^T's pattern
    is built on first use (backward), so a forward without autograd (generation's prompt) does
    not pay for it."""

    token: Tensor  # (N,) int64, ascending
    expert: Tensor  # (N,) int64
    shape: tuple[int, int]  # (tokens, E*r)
    rank: int
    rows: Tensor  # (tokens + 1,) V's row pointers (int32 where the sizes allow, as cols and V^T's)
    cols: Tensor  # (N*r,) V's column indices
    _transpose: tuple[Tensor, Tensor, Tensor] | None = None

    def times(self, values: Tensor, dense: Tensor) -> Tensor:
        """V @ dense (tokens, d) for V with these (N, r) values."""
        return bag_sums(self.cols, self.rows, values.reshape(-1), dense)

    def transposed_times(self, values: Tensor, dense: Tensor) -> Tensor:
        """V^T @ dense (E*r, d) for V with these (N, r) values."""
        t_rows, t_cols, t_order = self.transpose()
        return bag_sums(t_cols, t_rows, values.reshape(-1).index_select(0, t_order), dense)

    def sampled(self, a: Tensor, b: Tensor) -> Tensor:
        """(a @ b) at V's pattern, as (N, r) values."""
        # torch's once-a-process "CSR support is in beta": this op is stable
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta", UserWarning)
            zero = torch.sparse_csr_tensor(
                self.rows,
                self.cols,
                a.new_zeros(self.cols.shape[0]),
                self.shape,
                check_invariants=False,
            )
        return torch.sparse.sampled_addmm(zero, a, b, beta=0.0).values().view(-1, self.rank)

    def transpose(self) -> tuple[Tensor, Tensor, Tensor]:
        """V^T's (row pointers (E*r + 1,), column indices = tokens (N*r,), t_order (N*r,)): row e*r
        + j holds expert e's pairs in token order, value v[p, j]; V^T's values are V's
        (flattened) at t_order."""
        if self._transpose is None:
            r, E, device = self.rank, self.shape[1] // self.rank, self.token.device
            j = torch.arange(r, device=device)
            by_expert = torch.argsort(self.expert, stable=True)
            counts = torch.bincount(self.expert, minlength=E)
            start = counts.cumsum(0) - counts
            e = self.expert.index_select(0, by_expert)
            within = torch.arange(e.shape[0], device=device) - start.index_select(0, e)
            dest = (start.index_select(0, e) * r + within).unsqueeze(1) + j * counts.index_select(
                0, e
            ).unsqueeze(1)
            dest = dest.flatten()
            source = (by_expert.unsqueeze(1) * r + j).flatten()
            t_order = torch.empty_like(dest).index_copy_(0, dest, source)
            tokens = self.token.index_select(0, by_expert).repeat_interleave(r)
            t_cols = torch.empty_like(dest).index_copy_(0, dest, tokens)
            t_rows = torch.cat(
                [
                    (start.unsqueeze(1) * r + j * counts.unsqueeze(1)).flatten(),
                    start.new_full((1,), dest.shape[0]),
                ]
            )
            self._transpose = (t_rows.to(self.rows.dtype), t_cols.to(self.rows.dtype), t_order)
        return self._transpose


def csr_pattern(
    g: Tensor, per_token: int | None, rank: int, index: Tensor | None = None
) -> CsrPattern:
    """The CSR pattern of the pairs of routing g.

    Args:
        g: (tokens, E), the routing weights.
        per_token: top-k's k: each token's k largest weights (a pair of weight 0 adds nothing);
            None: every g > 0.
        rank: r, the experts' rank (each pair is r columns of V).
        index: (tokens, k), top-k's experts when the router gave them, else found here.

    Returns:
        The pattern of V (tokens, E*r), its pairs in token order.
    """
    (tokens, E), device = g.shape, g.device
    if per_token is None:
        token, expert = (g > 0).nonzero().unbind(1)  # row-major: by token, then expert
        per_row = torch.bincount(token, minlength=tokens)
    else:
        index = torch.topk(g, per_token, dim=-1, sorted=False).indices if index is None else index
        expert = index.sort(-1).values.flatten()  # CSR: each row's columns ascending
        token = torch.arange(tokens, device=device).repeat_interleave(per_token)
        per_row = torch.full((tokens,), per_token, device=device)
    rows = torch.cat([per_row.new_zeros(1), per_row.cumsum(0)]) * rank
    cols = (expert.unsqueeze(1) * rank + torch.arange(rank, device=device)).flatten()
    # MKL's sampled product takes 32-bit indices (torch would convert 64-bit ones at every call);
    # embedding_bag either
    index_dtype = torch.int32 if max(cols.shape[0], E * rank, tokens) < 2**31 else torch.int64
    return CsrPattern(
        token, expert, (tokens, E * rank), rank, rows.to(index_dtype), cols.to(index_dtype)
    )


def bag_sums(cols: Tensor, rows: Tensor, values: Tensor, dense: Tensor) -> Tensor:
    """S @ dense for a CSR matrix S, as a weighted embedding-bag sum.

    Args:
        cols: S's column indices (nnz,).
        rows: S's row pointers (rows + 1,).
        values: S's values (nnz,).
        dense: (S's columns, d).

    Returns:
        (S's rows, d): row i the sum of dense's rows cols[rows[i]:rows[i+1]] weighted by those
        values (zero for an empty row).
    """
    return F.embedding_bag(
        cols, dense, rows, mode="sum", per_sample_weights=values, include_last_offset=True
    )


def flat_banks(A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    """A (E, r, d_in) and B (E, d_out, r) in their storage's (E*r, d) layout (views for the
    parameters)."""
    return A.reshape(-1, A.shape[-1]), B.transpose(1, 2).reshape(-1, B.shape[1])


def csr_mixture(
    y: Tensor,
    x: Tensor,
    A: Tensor,
    B: Tensor,
    g: Tensor,
    pat: CsrPattern,
    scaling: float,
    params: bool,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    """(y + s * Delta, h, z, w) over the pattern's pairs: arguments and results as
    grouped.grouped_mixture's, with the pattern for its pairs."""
    A2, B2 = flat_banks(A, B)
    w = g[pat.token, pat.expert]  # (N,)
    h = pat.sampled(x, A2.t())  # (N, r): A_e x_t
    z = pairs_mixed_code(h, w, pat.token, x.shape[0]) if params else None
    v = weighted_pair_codes(h, w, z, pat.token)
    return torch.add(y, pat.times(v, B2), alpha=scaling), h, z, w


class CsrMixture(torch.autograd.Function):
    """csr_mixture with its backward as the same sparse products. Saves x (which the base product
    saves anyway), the banks, the pairs' weights w (N,), codes h (N, r) and, for params, z
    (tokens, r)."""

    @staticmethod
    def forward(ctx, y, x, A, B, g, pat, scaling, params):
        out, h, z, w = csr_mixture(y, x, A, B, g, pat, scaling, params)
        ctx.save_for_backward(x, A, B, w, h, z)
        ctx.pattern, ctx.scaling, ctx.routing_shape = pat, scaling, g.shape
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, A, B, w, h, z = ctx.saved_tensors
        pat, s = ctx.pattern, ctx.scaling
        need_x, need_A, need_B, need_g = ctx.needs_input_grad[1:5]
        A2, B2 = flat_banks(A, B)
        grad_out = grad_out.to(h.dtype).contiguous()
        grad_v = pat.sampled(grad_out, B2.t()).mul_(s)  # (N, r)
        grad_B = None
        if need_B:  # (E*r, d_out): lora_B's storage layout (layer.expert_bank_B)
            v = s * weighted_pair_codes(h, w, z, pat.token)
            grad_B = pat.transposed_times(v, grad_out).view(B.shape[0], -1, B.shape[1])
            grad_B = grad_B.transpose(1, 2)
        grad_h, grad_w = weighted_pair_codes_backward(grad_v, h, w, z, pat.token)
        grad_g = (
            w.new_zeros(ctx.routing_shape).index_put_((pat.token, pat.expert), grad_w)
            if need_g
            else None
        )
        grad_A = pat.transposed_times(grad_h, x).view_as(A) if need_A else None
        grad_x = pat.times(grad_h, A2) if need_x else None
        return grad_out, grad_x, grad_A, grad_B, grad_g, None, None, None


def csr_kernel(inputs: KernelInputs) -> Tensor:
    """y + s * Delta over the routed pairs as sparse-matrix products (the module's docstring)."""
    dtype = inputs.y.dtype
    A, B = inputs.lora_A.to(dtype), inputs.lora_B.to(dtype)
    rank = inputs.lora_A.shape[1]
    pat = csr_pattern(inputs.g, inputs.per_token, rank, inputs.routing.top_index)
    args = (inputs.y, inputs.experts_x, A, B, inputs.g, pat, inputs.scaling, inputs.params)
    return CsrMixture.apply(*args) if inputs.autograd else csr_mixture(*args)[0]
