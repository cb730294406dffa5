"""The gathered kernel: for few tokens (decoding), each token's own experts' A and B gathered.

Where it wins: a few tokens against many experts (at most a quarter as many pairs as experts,
sparse.gathers), where it reads less than the whole bank; bench/RESULTS.md, "Sparse routing: cost as
the number of experts grows" ("One layer while generating").
"""

from __future__ import annotations

import torch
from torch import Tensor

from .interface import KernelInputs


def gathered_mixture(
    y: Tensor,
    x: Tensor,
    A: Tensor,
    B: Tensor,
    g: Tensor,
    k: int,
    scaling: float,
    params: bool,
    top: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """y + s * Delta from each token's k largest weights with its own experts' A and B gathered,
    (tokens, k, r, d). Plain autograd ops, as few as the maths allows (each costs a layer time for
    every generated token).

    Args:
        y, x, A, B, g, scaling, params: as grouped.grouped_mixture.
        k: at least each token's number of experts with g > 0.
        top: (weights, index) (tokens, k) of those experts when the router gave them (top-k), else
            None: found here.

    Returns:
        y + s * Delta (tokens, d_out).
    """
    (tokens, d_in), r = x.shape, A.shape[1]
    w, index = torch.topk(g, k, dim=-1) if top is None else top  # (tokens, k)
    flat = index.flatten()
    A_tokens = A.index_select(0, flat).view(tokens, k * r, d_in)  # each token's experts' A
    h = torch.bmm(A_tokens, x.unsqueeze(2)).view(tokens, k, r)  # (tokens, k, r): their codes
    z = torch.bmm(w.unsqueeze(1), h) if params else h  # params: z = sum_j w_j h_j, (tokens, 1, r)
    c = (w.unsqueeze(2) * z).view(tokens, 1, k * r)  # the weighted codes
    # B's own layout stores (E, r, d_out) (layer.expert_bank_B): the gathered experts come out
    # (tokens, k*r, d_out), and Delta^T = c^T B_tokens^T is one batched product on them as they are
    B_tokens = B.transpose(1, 2).index_select(0, flat).view(tokens, k * r, -1)
    return torch.baddbmm(y.unsqueeze(1), c, B_tokens, alpha=scaling).view_as(y)


def gathered_kernel(inputs: KernelInputs) -> Tensor:
    """y + s * Delta with each token's experts gathered, as many a token as the most any token
    routes to (inputs.most_per_token)."""
    dtype = inputs.y.dtype
    A, B = inputs.lora_A.to(dtype), inputs.lora_B.to(dtype)
    routing = inputs.routing
    top = None if routing.top_index is None else (routing.top_weights.to(dtype), routing.top_index)
    return gathered_mixture(
        inputs.y,
        inputs.experts_x,
        A,
        B,
        inputs.g,
        inputs.most_per_token,
        inputs.scaling,
        inputs.params,
        top,
    )
