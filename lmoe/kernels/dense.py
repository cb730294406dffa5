"""The dense kernel: every expert for every token, as the two GEMMs of one LoRA of rank E*r.

Stack the experts: A = [A_1; ...; A_E] (E*r, d_in), B = [B_1 ... B_E] (d_out, E*r). Per token, with
h = A x (E blocks of r, the experts' codes) and routing g (E,):
    outputs: c_i = g_i h_i;   params: z = sum_i g_i h_i (r,), c_i = g_i z
    y + s * B c               (docs/design.md section 2)
Where it wins: whenever most experts carry weight, and at the sizes most runs use (E*r up to
sparse.DENSE_UP_TO_RANK always runs here); bench/RESULTS.md, "Sparse routing: cost as the number of
experts grows" (the auto rule's grid, and the "forced dense" rows against the sparse kernels).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .interface import KernelInputs


def stacked_A(lora_A: Tensor) -> Tensor:
    """A = [A_1; ...; A_E] (E*r, d_in) from lora_A (E, r, d_in): a view."""
    return lora_A.reshape(-1, lora_A.shape[-1])


def stacked_B(lora_B: Tensor) -> Tensor:
    """B = [B_1 ... B_E] (d_out, E*r) from lora_B (E, d_out, r): a view of the parameter in its own
    layout (layer.expert_bank_B); a copy only if lora_B was replaced by one in another layout."""
    return lora_B.transpose(1, 2).reshape(-1, lora_B.shape[1]).t()


def mixed_code(h: Tensor, g: Tensor) -> Tensor:
    """The params composition's z = A(x) x = sum_i g_i A_i x = sum_i g_i h_i:
    h (tokens, E, r), g (tokens, E) -> (tokens, 1, r)."""
    return torch.bmm(g.unsqueeze(1), h)


def weighted_codes(h: Tensor, weight: Tensor, z: Tensor | None) -> Tensor:
    """What the stacked B multiplies: the codes weighted by the routing.

    Args:
        h: (tokens, E, r), the experts' codes A_i x.
        weight: (tokens, E), g, or s*g where the LoRA scale s is wanted inside.
        z: the params composition's mixed_code(h, g) (tokens, 1, r), or None for outputs.

    Returns:
        c (tokens, E*r): block i is weight_i * z (params) or weight_i * h_i (outputs).
    """
    return (weight.unsqueeze(-1) * (h if z is None else z)).flatten(1)


def weighted_codes_backward(
    grad_c: Tensor, h: Tensor, g: Tensor, scaling: float, z: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Gradients of s * weighted_codes(h, g, z) with respect to h (tokens, E, r) and g (tokens, E).

    Args:
        grad_c: (tokens, E, r), the gradient of the weighted codes, without the scale s.
        h, g, z: as weighted_codes (z: the params composition's mixed code, else None).
        scaling: s.

    Returns:
        (grad_h (tokens, E, r), grad_g (tokens, E)).
    """
    sg = scaling * g  # (tokens, E)
    if z is None:  # outputs: c_j = s g_j h_j
        return sg.unsqueeze(-1) * grad_c, scaling * (grad_c * h).sum(-1)
    grad_z = torch.bmm(sg.unsqueeze(1), grad_c)  # (tokens, 1, r): sum_j s g_j dc_j
    # c_j = s g_j z with z = sum_i g_i h_i: g enters twice, as the mixing weight and inside z
    grad_g = scaling * torch.bmm(grad_c, z.transpose(1, 2)) + torch.bmm(h, grad_z.transpose(1, 2))
    return g.unsqueeze(-1) * grad_z, grad_g.squeeze(-1)


def dense_mixture(
    y: Tensor, h: Tensor, B: Tensor, g: Tensor, scaling: float, params: bool
) -> tuple[Tensor, Tensor | None]:
    """y + s * B c with the routing's weighted codes c; the scale and the residual add ride on the
    GEMM.

    Args:
        y: (tokens, d_out), the frozen output.
        h: (tokens, E*r), the experts' codes A x.
        B: (d_out, E*r), the stacked B.
        g: (tokens, E), the routing weights, all in one dtype.
        scaling: s.
        params: the params composition (else outputs).

    Returns:
        (y + s * Delta (tokens, d_out), z: the params composition's mixed code (tokens, 1, r), None
        for outputs).
    """
    h = h.view(h.shape[0], g.shape[-1], -1)  # (tokens, E, r)
    z = mixed_code(h, g) if params else None
    return torch.addmm(y, weighted_codes(h, g, z), B.t(), alpha=scaling), z


class DenseMixture(torch.autograd.Function):
    """dense_mixture: the second GEMM of one rank-E*r LoRA, with the routing's weighting before it.

    Saves h, g (tokens, E) and, for params, z (tokens, r); the weighted codes (tokens, E*r) are
    recomputed in backward rather than kept, so memory matches plain LoRA. Arguments as
    dense_mixture.
    """

    @staticmethod
    def forward(ctx, y, h, B, g, scaling, params):
        out, z = dense_mixture(y, h, B, g, scaling, params)
        ctx.save_for_backward(h, B, g, z)
        ctx.scaling = scaling
        return out

    @staticmethod
    def backward(ctx, grad_out):
        h, B, g, z = ctx.saved_tensors
        s = ctx.scaling
        h = h.view(h.shape[0], g.shape[-1], -1)  # (tokens, E, r)
        need_h, need_B, need_g = ctx.needs_input_grad[1:4]
        grad_c = (grad_out.to(h.dtype) @ B).view_as(h)  # (tokens, E, r), without the scale s
        # as (c^T grad)^T: in the layout of the stacked B's storage (expert_bank_B), so no copy to
        # match it
        grad_B = (weighted_codes(h, s * g, z).t() @ grad_out.to(h.dtype)).t() if need_B else None
        grad_h, grad_g = weighted_codes_backward(grad_c, h, g, s, z)
        return (
            grad_out,
            grad_h.flatten(1) if need_h else None,
            grad_B,
            grad_g if need_g else None,
            None,
            None,
        )


def dense_kernel(inputs: KernelInputs) -> Tensor:
    """y + s * Delta with every expert for every token. The codes h = A x come from the input GEMM
    where the plan was dense from the start, else (the plan decided after routing) they run here."""
    dtype = inputs.y.dtype
    h = inputs.codes
    if h is None:  # (tokens, E*r)
        h = inputs.experts_x @ stacked_A(inputs.lora_A).to(dtype).t()
    B = stacked_B(inputs.lora_B).to(dtype)  # (d_out, E*r)
    args = (inputs.y, h, B, inputs.g, inputs.scaling, inputs.params)
    return DenseMixture.apply(*args) if inputs.autograd else dense_mixture(*args)[0]
