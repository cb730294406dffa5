"""The grouped kernel: only the routed (token, expert) pairs (g > 0), grouped by expert.

The pairs are sorted by expert, each expert's tokens gathered, and its A and B multiply only those
rows: one grouped GEMM per product (torch's grouped_mm where the device takes it, else a loop over
the experts), forward and backward; the per-pair weighting is pairs.py's. Where it wins: many
experts with few active a token, off the CPU's float32/64 (bfloat16, any GPU), where the CSR kernel
does not run; bench/RESULTS.md, "Sparse routing: cost as the number of experts grows" (the kernels
in one process, and the auto rule's grouped-kernel constant).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .interface import KernelInputs
from .pairs import pairs_mixed_code, weighted_pair_codes, weighted_pair_codes_backward

_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


@dataclass
class Pairs:
    """The (token, expert) pairs to compute, ordered by expert: N pairs, E experts."""

    token: Tensor  # (N,) int64
    expert: Tensor  # (N,) int64, ascending
    ends: Tensor  # (E,) int32: expert e's pairs are [ends[e-1], ends[e]) (ends[-1] = 0)

    def counts(self) -> list[int]:
        """Pairs per expert, on the host (for the per-expert fallback of grouped_mm)."""
        return torch.diff(self.ends, prepend=self.ends.new_zeros(1)).tolist()


def route_pairs(g: Tensor, per_token: int | None) -> Pairs:
    """The pairs of routing g (tokens, E). per_token: how many experts every token routes to when
    the router fixes it (top-k: k): the k largest weights of each token, a size known without
    reading the device (a pair of weight 0 adds nothing); None: every g > 0, whose number is read
    from the device (one sync)."""
    E = g.shape[-1]
    if per_token is None:
        expert, token = (g.t() > 0).nonzero().unbind(1)  # row-major: by expert, then token
    else:
        flat = torch.topk(g, per_token, dim=-1, sorted=False).indices.flatten()  # (tokens * k,)
        order = torch.argsort(flat, stable=True)
        expert, token = flat[order], order.div(per_token, rounding_mode="floor")
    ends = torch.searchsorted(expert, torch.arange(E, device=g.device), right=True).to(torch.int32)
    return Pairs(token, expert, ends)


def _grouped_ok(*tensors: Tensor) -> bool:
    """Whether torch's grouped_mm takes these operands: float32/16 or bfloat16 on the CPU, bfloat16
    on a CUDA GPU of compute capability 8 or more (its documented kernels), every stride a multiple
    of 16 bytes."""
    if _GROUPED_MM is None:
        return False
    t = tensors[0]
    if t.device.type == "cuda":
        ok = t.dtype == torch.bfloat16 and torch.cuda.get_device_capability(t.device)[0] >= 8
    else:
        ok = t.device.type == "cpu" and t.dtype in (torch.float32, torch.float16, torch.bfloat16)
    return ok and all(
        u.dtype == t.dtype
        and u.data_ptr() % 16 == 0
        and (u.stride(-1) == 1 or u.stride(-2) == 1)
        and all(s == 1 or s * u.element_size() % 16 == 0 for s in u.stride())
        for u in tensors
    )


def grouped_mm(a: Tensor, b: Tensor, pairs: Pairs) -> Tensor:
    """Per expert, the product of its pairs' slices: torch's grouped GEMM where it takes the
    operands (_grouped_ok), else a loop over the experts (float64, odd sizes; on a GPU it reads the
    counts, a sync).

    Args:
        a: (N, K), rows by expert; or, for weight gradients, (K, N), columns by expert.
        b: (E, K, M), one matrix an expert; or (N, M), rows by expert.
        pairs: the pairs (by expert) that cut a and b.

    Returns:
        (N, M): each pair's row of a times b[e]; or (E, K, M): each expert's slice of a times its
        rows of b (zero for an expert without pairs).
    """
    if _grouped_ok(a, b):
        return _GROUPED_MM(a, b, offs=pairs.ends)
    if b.dim() == 3:  # rows of a by expert
        parts = [part @ b[e] for e, part in enumerate(a.split(pairs.counts()))]
        return torch.cat(parts) if parts else a.new_zeros(0, b.shape[-1])
    return torch.stack(
        [p @ q for p, q in zip(a.split(pairs.counts(), 1), b.split(pairs.counts()), strict=True)]
    )


def grouped_mixture(
    y: Tensor,
    x: Tensor,
    A: Tensor,
    B: Tensor,
    g: Tensor,
    pairs: Pairs,
    scaling: float,
    params: bool,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    """y + s * Delta from the pairs only.

    Args:
        y: (tokens, d_out); x: the experts' input (tokens, d_in).
        A: (E, r, d_in); B: (E, d_out, r); g: (tokens, E); all in one dtype.
        pairs: route_pairs(g, ...).
        scaling: s; params: the params composition (else outputs).

    Returns:
        (y + s * Delta, h (N, r) the pairs' codes A_e x_t, z (tokens, r) or None, w (N,) the
        pairs' weights).
    """
    w = g[pairs.token, pairs.expert]  # (N,)
    h = grouped_mm(x.index_select(0, pairs.token), A.transpose(1, 2), pairs)  # (N, r)
    z = pairs_mixed_code(h, w, pairs.token, x.shape[0]) if params else None
    v = weighted_pair_codes(h, w, z, pairs.token)
    out = y.index_add(0, pairs.token, grouped_mm(v, B.transpose(1, 2), pairs), alpha=scaling)
    return out, h, z, w


class GroupedMixture(torch.autograd.Function):
    """grouped_mixture with its backward over the same pairs: every product of the dense kernel's
    backward, for the pairs only. Saves the pairs, their weights and codes h (N, r), and z
    (tokens, r); x (which the base product saves anyway) is gathered again rather than kept per
    pair."""

    @staticmethod
    def forward(ctx, y, x, A, B, g, pairs, scaling, params):
        out, h, z, w = grouped_mixture(y, x, A, B, g, pairs, scaling, params)
        ctx.save_for_backward(x, A, B, w, h, z, pairs.token, pairs.expert, pairs.ends)
        ctx.scaling, ctx.routing_shape = scaling, g.shape
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, A, B, w, h, z, token, expert, ends = ctx.saved_tensors
        pairs, s = Pairs(token, expert, ends), ctx.scaling
        need_x, need_A, need_B, need_g = ctx.needs_input_grad[1:5]
        grad_rows = grad_out.to(h.dtype).index_select(0, token)  # (N, d_out)
        grad_v = s * grouped_mm(grad_rows, B, pairs)  # (N, r); B_e is one block in B's layout
        # as (v^T grad)^T: the products' row-major operand on the right (the faster order), and the
        # result in lora_B's own layout (layer.expert_bank_B); s rides on the (N, r) codes
        grad_B = None
        if need_B:
            v = s * weighted_pair_codes(h, w, z, token)
            grad_B = grouped_mm(v.t(), grad_rows, pairs).transpose(1, 2)
        grad_h, grad_w = weighted_pair_codes_backward(grad_v, h, w, z, token)
        grad_g = (
            w.new_zeros(ctx.routing_shape).index_put_((token, expert), grad_w) if need_g else None
        )
        grad_A = grouped_mm(grad_h.t(), x.index_select(0, token), pairs) if need_A else None
        grad_x = (
            torch.zeros_like(x).index_add_(0, token, grouped_mm(grad_h, A, pairs))
            if need_x
            else None
        )
        return grad_out, grad_x, grad_A, grad_B, grad_g, None, None, None


def grouped_kernel(inputs: KernelInputs) -> Tensor:
    """y + s * Delta over the routed pairs, grouped by expert (the module's docstring)."""
    dtype = inputs.y.dtype
    A, B = inputs.lora_A.to(dtype), inputs.lora_B.to(dtype)
    pairs = route_pairs(inputs.g, inputs.per_token)
    args = (inputs.y, inputs.experts_x, A, B, inputs.g, pairs, inputs.scaling, inputs.params)
    return GroupedMixture.apply(*args) if inputs.autograd else grouped_mixture(*args)[0]
