"""The routing's weighting per (token, expert) pair, shared by the sparse kernels (grouped, csr).

The dense kernel's maths (docs/design.md section 2) per pair p = (t, e) with weight w_p = g_te:
    h_p = A_e x_t;  outputs: v_p = w_p h_p;  params: z_t = sum_{p of t} w_p h_p, v_p = w_p z_t
    Delta_t = sum_{p of t} B_e v_p,  y = y0 + s Delta.
The gradient of g where g = 0 is left at 0: no router reads it (softmax's Jacobian carries a factor
g_i, top-k's and sparsegen's are restricted to their support).
"""

from __future__ import annotations

import torch
from torch import Tensor


def pairs_mixed_code(h: Tensor, w: Tensor, token: Tensor, tokens: int) -> Tensor:
    """The params composition's z_t = A(x_t) x_t: the sum over each token's pairs of w_p h_p.

    Args:
        h: (N, r), the pairs' codes A_e x_t.
        w: (N,), the pairs' weights g_te.
        token: (N,), the pairs' tokens.
        tokens: the number of tokens.

    Returns:
        z (tokens, r).
    """
    return h.new_zeros(tokens, h.shape[1]).index_add_(0, token, w.unsqueeze(1) * h)


def weighted_pair_codes(h: Tensor, w: Tensor, z: Tensor | None, token: Tensor) -> Tensor:
    """What each pair's B_e multiplies.

    Args:
        h, w, token: as pairs_mixed_code.
        z: the params composition's pairs_mixed_code (tokens, r), or None for outputs.

    Returns:
        v (N, r): w h (outputs) or w z_t (params).
    """
    return w.unsqueeze(1) * (h if z is None else z.index_select(0, token))


def weighted_pair_codes_backward(
    grad_v: Tensor, h: Tensor, w: Tensor, z: Tensor | None, token: Tensor
) -> tuple[Tensor, Tensor]:
    """Backward of weighted_pair_codes, with z = pairs_mixed_code(h, w, ...) for params.

    Args:
        grad_v: (N, r), the gradient of the weighted codes v.
        h, w, z, token: as weighted_pair_codes.

    Returns:
        (grad_h (N, r), grad_w (N,)).
    """
    if z is None:  # v = w h
        return w.unsqueeze(1) * grad_v, (grad_v * h).sum(1)
    # v_p = w_p z_t with z_t = sum_q w_q h_q: w enters twice, as the pair's weight and inside z
    grad_z = torch.zeros_like(z).index_add_(0, token, w.unsqueeze(1) * grad_v)  # (tokens, r)
    grad_z = grad_z.index_select(0, token)  # (N, r): each pair's token's
    return w.unsqueeze(1) * grad_z, (grad_v * z.index_select(0, token)).sum(1) + (h * grad_z).sum(1)
