"""Routing functions, the maths: a token's gate logits u (tokens, E) to expert weights g on the
simplex: softmax (L-MoE), top-k, and LD-MoLE's sparsegen with its closed-form Jacobian; and
Routing, what a router hands the layer. The routers themselves (the gate W_g, LD-MoLE's lambda
head, which losses apply) are in lmoe.routers.

All routing maths runs in float32 (or float64) whatever the model dtype; nothing here knows about
models or training.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class Routing:
    """What a router produced for a flat batch of tokens; every tensor is float32,
    shape (tokens, E)."""

    weights: Tensor  # g: non-negative, rows sum to 1
    logits: Tensor  # u
    probs: (
        Tensor | Callable[[], Tensor]
    )  # dense router probabilities for the load-balance loss, or what gives them
    extras: dict[str, Tensor] = field(default_factory=dict)  # per-router values (e.g. lambda)
    top_index: Tensor | None = (
        None  # (tokens, k) int64: the experts of weight g > 0 where the router fixes k
    )
    top_weights: Tensor | None = None  # (tokens, k): their weights, g at top_index

    def dense_probs(self) -> Tensor:
        """probs, computed on first use where the router passed a function: top-k's full softmax,
        which only the load-balance loss reads (not generation, where it was one op a
        layer and token)."""
        if callable(self.probs):
            self.probs = self.probs()
        return self.probs


def at_least_float32(t: Tensor) -> Tensor:
    """Routing maths runs in float32 for half-precision models (float64 stays float64)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def softmax_route(u: Tensor, temperature: float = 1.0) -> Tensor:
    """Dense L-MoE gate: g = softmax(u / T)."""
    return torch.softmax(scaled(u, temperature), dim=-1)


def scaled(u: Tensor, temperature: float) -> Tensor:
    """u / T, and u itself at T = 1 (exact either way; one op fewer per layer and token
    when generating)."""
    return u if temperature == 1.0 else u / temperature


def topk_route(u: Tensor, k: int, temperature: float = 1.0) -> Tensor:
    """Keep the k largest logits, softmax over them, exact zeros elsewhere."""
    return topk_route_indexed(u, k, temperature)[0]


def topk_route_indexed(
    u: Tensor, k: int, temperature: float = 1.0
) -> tuple[Tensor, Tensor, Tensor]:
    """(topk_route(u, k), the k experts' indices (tokens, k), their weights (tokens, k)): the sparse
    path reads them instead of a second topk or a gather."""
    top, index = torch.topk(u, k, dim=-1)
    weights = torch.softmax(scaled(top, temperature), dim=-1)
    return torch.zeros_like(u).scatter(-1, index, weights), index, weights


def sparsegen_route(u: Tensor, lam: Tensor | float) -> Tensor:
    """LD-MoLE routing (Proposition 1): p = argmin_{p in simplex} ||p - u||^2 -
    lam ||p||^2, lam < 1.

    Closed form, row by row: sort u descending; the support size is
    k(u) = max{k : 1 - lam + k u_(k) > sum_{j<=k} u_(j)} (k = 1 always qualifies, so every token
    keeps at least one expert); tau = (sum_{j<=k(u)} u_(j) - 1 + lam) / k(u);
    p_i = max(u_i - tau, 0) / (1 - lam). Equivalently sparsemax(u / (1 - lam)). lam -> -inf gives
    uniform weights, lam -> 1 one-hot.
    u: (tokens, E); lam: (tokens, 1) or a number. Gradients: the exact Jacobian in closed form
    (_Sparsegen).
    """
    lam = torch.as_tensor(lam, dtype=u.dtype, device=u.device)
    if torch.is_grad_enabled() and (u.requires_grad or lam.requires_grad):
        return _Sparsegen.apply(u, lam)
    return sparsegen_weights(
        u, 1 - lam
    )  # nothing to differentiate (e.g. generation): no Function bookkeeping


def sparsegen_weights(u: Tensor, d: Tensor) -> Tensor:
    """The closed form of sparsegen_route given d = 1 - lam (> 0); plain tensor maths."""
    # p is invariant to shifting u; measuring from the top logit keeps the support's values within
    # about d of 0, so float32 keeps sum(p) = 1 even for large logits and lambda near 1
    u = u - u.amax(dim=-1, keepdim=True)
    u_sorted = torch.sort(u, dim=-1, descending=True).values
    cumsum = u_sorted.cumsum(dim=-1)
    ks = torch.arange(1, u.shape[-1] + 1, device=u.device, dtype=u.dtype)
    support = (d + ks * u_sorted > cumsum).sum(dim=-1, keepdim=True)  # (tokens, 1), >= 1
    tau = (cumsum.gather(-1, support - 1) - d) / support.to(u.dtype)
    return torch.clamp(u - tau, min=0) / d


class _Sparsegen(torch.autograd.Function):
    """sparsegen_route with its Jacobian in closed form: only p and 1 - lam are saved (autograd
    through the sort / cumsum / gather would keep about five (tokens, E) tensors and
    replay each op backward).

    With v = u / d (d = 1 - lam) and S the support (p > 0), p = sparsemax(v), so
    dL/dv_i = [i in S] (dL/dp_i - mean_{j in S} dL/dp_j), dL/du = dL/dv / d and, because dL/dv sums
    to zero and v_i - tau / d = p_i on S, dL/dlam = sum_i dL/dv_i p_i / d.
    """

    @staticmethod
    def forward(ctx, u: Tensor, lam: Tensor) -> Tensor:
        d = 1 - lam
        p = sparsegen_weights(u, d)
        ctx.save_for_backward(p, d)
        ctx.lam_shape = lam.shape
        return p

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_p: Tensor) -> tuple[Tensor | None, Tensor | None]:
        p, d = ctx.saved_tensors
        support = p > 0
        grad_p = torch.where(support, grad_p, 0)
        mean = grad_p.sum(-1, keepdim=True) / support.sum(-1, keepdim=True)
        grad_v = torch.where(support, grad_p - mean, 0)
        grad_u = grad_v / d if ctx.needs_input_grad[0] else None
        grad_lam = None
        if ctx.needs_input_grad[1]:
            grad_lam = ((grad_v * p).sum(-1, keepdim=True) / d).sum_to_size(ctx.lam_shape)
        return grad_u, grad_lam
