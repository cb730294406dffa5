"""Sparse execution of a mixture: only the (token, expert) pairs a token routes to (g > 0) are computed.

The dense path (layer.py) runs all E experts for every token as one rank-E*r LoRA. Here, for many tokens, the
pairs are sorted by expert, each expert's tokens are gathered, and its A and B multiply only those rows (one
grouped GEMM per product, torch's grouped_mm where the device takes it), forward and backward; for few tokens
(generation: fewer pairs than experts) each token's own experts' A and B are gathered instead. On the CPU in
float32/64 the grouped products run as sparse-matrix products instead (sparse_csr.py: no per-expert call). The maths is the
dense path's (docs/design.md sections 1-2), per pair p = (t, e) with weight w_p = g_te:
    h_p = A_e x_t;  outputs: v_p = w_p h_p;  params: z_t = sum_{p of t} w_p h_p, v_p = w_p z_t
    Delta_t = sum_{p of t} B_e v_p,  y = y0 + s Delta.
The gradient of g where g = 0 is left at 0: no router reads it (softmax's Jacobian carries a factor g_i, top-k's
and sparsegen's are restricted to their support).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

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
    """The pairs of routing g (tokens, E). per_token: how many experts every token routes to when the router
    fixes it (top-k: k): the k largest weights of each token, a size known without reading the device (a
    pair of weight 0 adds nothing); None: every g > 0, whose number is read from the device (one sync)."""
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
    """Whether torch's grouped_mm takes these operands: float32/16 or bfloat16 on the CPU, bfloat16 on a CUDA
    GPU of compute capability 8 or more (its documented kernels), every stride a multiple of 16 bytes."""
    if _GROUPED_MM is None:
        return False
    t = tensors[0]
    if t.device.type == "cuda":
        ok = t.dtype == torch.bfloat16 and torch.cuda.get_device_capability(t.device)[0] >= 8
    else:
        ok = t.device.type == "cpu" and t.dtype in (torch.float32, torch.float16, torch.bfloat16)
    return ok and all(u.dtype == t.dtype and u.data_ptr() % 16 == 0 and (u.stride(-1) == 1 or u.stride(-2) == 1)
                      and all(s == 1 or s * u.element_size() % 16 == 0 for s in u.stride()) for u in tensors)


def grouped_mm(a: Tensor, b: Tensor, pairs: Pairs) -> Tensor:
    """Per expert e, its pairs' rows of a times b[e]: a (N, K), b (E, K, M) -> (N, M); or, for weight gradients,
    a (K, N) and b (N, M) both cut by pairs along N -> (E, K, M) (zero for an expert without pairs).

    torch's grouped GEMM where it takes the operands (_grouped_ok), else a loop over the experts (float64, odd
    sizes; on a GPU it reads the counts, a sync)."""
    if _grouped_ok(a, b):
        return _GROUPED_MM(a, b, offs=pairs.ends)
    if b.dim() == 3:  # rows of a by expert
        parts = [part @ b[e] for e, part in enumerate(a.split(pairs.counts()))]
        return torch.cat(parts) if parts else a.new_zeros(0, b.shape[-1])
    return torch.stack([p @ q for p, q in zip(a.split(pairs.counts(), 1), b.split(pairs.counts()))])


def mixed_code(h: Tensor, w: Tensor, token: Tensor, tokens: int) -> Tensor:
    """The params composition's z = A(x) x (tokens, r): the sum over each token's pairs of w h."""
    return h.new_zeros(tokens, h.shape[1]).index_add_(0, token, w.unsqueeze(1) * h)


def pair_codes(h: Tensor, w: Tensor, z: Tensor | None, token: Tensor) -> Tensor:
    """What each pair's B_e multiplies (N, r): w h (outputs, z None) or w z_t (params)."""
    return w.unsqueeze(1) * (h if z is None else z.index_select(0, token))


def pair_codes_backward(grad_v: Tensor, h: Tensor, w: Tensor, z: Tensor | None,
                        token: Tensor) -> tuple[Tensor, Tensor]:
    """Gradients of pair_codes (with z = mixed_code(h, w) for params) with respect to h (N, r) and w (N,)."""
    if z is None:  # v = w h
        return w.unsqueeze(1) * grad_v, (grad_v * h).sum(1)
    # v_p = w_p z_t with z_t = sum_q w_q h_q: w enters twice, as the pair's weight and inside z
    grad_z = torch.zeros_like(z).index_add_(0, token, w.unsqueeze(1) * grad_v).index_select(0, token)
    return w.unsqueeze(1) * grad_z, (grad_v * z.index_select(0, token)).sum(1) + (h * grad_z).sum(1)


def grouped_mixture(y: Tensor, x: Tensor, A: Tensor, B: Tensor, g: Tensor, pairs: Pairs, scaling: float,
                   params: bool) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    """(y + s * Delta, h, z, w) from the pairs only: y (tokens, d_out), x the experts' input (tokens, d_in),
    A (E, r, d_in), B (E, d_out, r), g (tokens, E), one dtype; h (N, r) the pairs' codes A_e x_t, w (N,) their
    weights."""
    w = g[pairs.token, pairs.expert]  # (N,)
    h = grouped_mm(x.index_select(0, pairs.token), A.transpose(1, 2), pairs)  # (N, r)
    z = mixed_code(h, w, pairs.token, x.shape[0]) if params else None
    v = pair_codes(h, w, z, pairs.token)
    return y.index_add(0, pairs.token, grouped_mm(v, B.transpose(1, 2), pairs), alpha=scaling), h, z, w


class GroupedMixture(torch.autograd.Function):
    """grouped_mixture with its backward over the same pairs: every product of the dense path's backward, for
    the pairs only. Saves the pairs, their weights and codes h (N, r), and z (tokens, r); x (which the base
    product saves anyway) is gathered again rather than kept per pair."""

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
        grad_v = s * grouped_mm(grad_rows, B, pairs)  # (N, r); B_e is one block in the layer's layout
        # as (v^T grad)^T: the products' row-major operand on the right (1.1 vs 3.0 ms at E = 64, d = 576, 2048
        # pairs), and the result in lora_B's own layout (layer.expert_bank_B); s rides on the (N, r) codes
        grad_B = grouped_mm((s * pair_codes(h, w, z, token)).t(), grad_rows, pairs).transpose(1, 2) if need_B else None
        grad_h, grad_w = pair_codes_backward(grad_v, h, w, z, token)
        grad_g = w.new_zeros(ctx.routing_shape).index_put_((token, expert), grad_w) if need_g else None
        grad_A = grouped_mm(grad_h.t(), x.index_select(0, token), pairs) if need_A else None
        grad_x = torch.zeros_like(x).index_add_(0, token, grouped_mm(grad_h, A, pairs)) if need_x else None
        return grad_out, grad_x, grad_A, grad_B, grad_g, None, None, None


def gathered_mixture(y: Tensor, x: Tensor, A: Tensor, B: Tensor, g: Tensor, k: int, scaling: float,
                     params: bool, top: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """y + s * Delta from each token's k largest weights with its own experts' A and B gathered, (tokens, k, r,
    d): for few tokens (generation), where it reads less than the whole bank. Plain autograd ops, as few as
    the maths allows (each costs a layer several us a token). Arguments as grouped_mixture; k at least each
    token's number of experts with g > 0; top: (weights, index) (tokens, k) of those experts when the router
    gave them (top-k), else found here."""
    (tokens, d_in), r = x.shape, A.shape[1]
    w, index = torch.topk(g, k, dim=-1) if top is None else top  # (tokens, k)
    flat = index.flatten()
    h = torch.bmm(A.index_select(0, flat).view(tokens, k * r, d_in), x.unsqueeze(2)).view(tokens, k, r)
    codes = torch.bmm(w.unsqueeze(1), h) if params else h  # params: z = sum_j w_j h_j, (tokens, 1, r)
    m = (w.unsqueeze(2) * codes).view(tokens, 1, k * r)
    # B's own layout stores (E, r, d_out) (layer.expert_bank_B): the gathered experts come out (tokens, k*r,
    # d_out), and Delta^T = m^T B_tokens^T is one batched product on them as they are
    B_tokens = B.transpose(1, 2).index_select(0, flat).view(tokens, k * r, -1)
    return torch.baddbmm(y.unsqueeze(1), m, B_tokens, alpha=scaling).view_as(y)


# The auto rule's constants, fitted to bench/bench_sparse.py (d = 576, 1 CPU thread; bench/RESULTS.md, "Sparse
# routing: cost as the number of experts grows"), in units of one rank of one token's dense LoRA (2 d
# multiply-adds each way): a pair's row gathered and scattered costs PAIR_COST more than its r ranks, an expert's
# group GROUP_COST; gathering each token's own experts pays once the dense bank has GATHER_MIN_RANK ranks.
PAIR_COST, GROUP_COST, GATHER_MIN_RANK = 64, 512, 512
# sparse_csr's products make no call per expert: refitted to bench/bench_sparse.py at d = 576, E 8-64, r 8, k 2,
# 16-1024 tokens (bench/results/sparse_rule_fit.txt): the same pair cost, an expert's share 32
CSR_GROUP_COST = 32


def group_cost(csr: bool) -> int:
    """prefer_sparse's cost of an expert's group for the kernel that runs: CSR products or grouped GEMMs."""
    return CSR_GROUP_COST if csr else GROUP_COST

DENSE_UP_TO_RANK = PAIR_COST  # prefer_sparse is false whenever E * r is at most this: grouping needs E r > r + PAIR_COST


def gathers(experts: int, active: float, tokens: int) -> bool:
    """Whether the sparse path gathers each token's experts (few tokens: at most a quarter as many pairs as
    experts) rather than grouping the pairs by expert."""
    return 4 * tokens * active <= experts


def prefer_sparse(experts: int, rank: int, active: float, tokens: int, group_cost: int = GROUP_COST) -> bool:
    """Whether the sparse path is the faster for E experts of rank r with `active` experts a token on average
    (top-k: k) over this many tokens: the dense path costs tokens * E * r; grouping costs each pair r + PAIR_COST
    and each expert group_cost (GROUP_COST; CSR_GROUP_COST for sparse_csr's products); gathering (gathers) pays
    from E * r = GATHER_MIN_RANK. At E = 4-8 experts of rank 4-8 it is always dense."""
    if gathers(experts, active, tokens):
        return experts * rank >= GATHER_MIN_RANK
    return tokens * experts * rank > tokens * active * (rank + PAIR_COST) + experts * group_cost


def active_counts(g: Tensor) -> tuple[int, float]:
    """(the most experts any token routes to, the mean per token) for routing g (tokens, E): one host read."""
    per_token = (g > 0).sum(-1)
    most, total = torch.stack([per_token.max(), per_token.sum()]).tolist()
    return int(most), total / max(1, g.shape[0])
