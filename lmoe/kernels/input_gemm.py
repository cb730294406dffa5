"""Every product of a layer's input x in one GEMM: the frozen W0 x + b0, the experts' codes A x and
the router's gate products G x.

Why one GEMM: backward then gives x's gradient as one GEMM plus one accumulating GEMM,
dx = dy W0 + [dh, dG...] [A; G...], where autograd would run a GEMM per product and add their
(tokens, d_in) results. Not measured apart: it is part of the layer's time against PEFT LoRA's
(bench/RESULTS.md, "Speed and memory", "Layer level").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def cat_nonempty(tensors: list[Tensor], dim: int = 0) -> Tensor:
    """torch.cat of the tensors not empty along dim, and no copy where only one is left (e.g. the
    gate's W_g alone, copied per forward otherwise)."""
    kept = [t for t in tensors if t.shape[dim]] or tensors[:1]
    return kept[0] if len(kept) == 1 else torch.cat(kept, dim)


def expert_codes(x: Tensor, A: Tensor) -> Tensor | None:
    """h = A x (tokens, E*r): every expert's code (its r-vector A_i x), E blocks of r. None for an A
    without rows (the sparse kernels compute their pairs' codes themselves): no empty product per
    layer and token while generating."""
    return x @ A.t() if A.shape[0] else None


def input_products(
    x: Tensor,
    lora_x: Tensor | None,
    W0: Tensor | None,
    b0: Tensor | None,
    A: Tensor,
    *gates: Tensor,
) -> tuple[Tensor | None, ...]:
    """(y, h, G x for each gate weight G): what a mixture layer computes from its input.

    Args:
        x: (tokens, d_in), the layer's input.
        lora_x: the experts' input when it is not x (dropout), else None: then A and the gates run
            as one GEMM.
        W0, b0: the frozen weight (d_out, d_in) and bias; W0 None: y is None (the base runs itself).
        A: (E*r, d_in) the stacked experts' A, or no rows (the sparse kernels: h is None).
        gates: the router's gate weights (its stored W_g and, for LD-MoLE, its lambda head's first
            linear's, see Router.x_weights; the router scales them); none where the router reads
            another input (router_reads_dropout) and runs its own products.

    Returns:
        (y = W0 x + b0 (tokens, d_out) or None, h = A x (tokens, E*r) or None, *G x (tokens, rows)).
    """
    y = None if W0 is None else F.linear(x, W0, b0)
    sizes = [G.shape[0] for G in gates]
    if not gates:
        return (y, expert_codes(x if lora_x is None else lora_x, A))
    if lora_x is None:
        h, *gx = (x @ cat_nonempty([A, *gates]).t()).split([A.shape[0], *sizes], 1)
        # h and W_g x are kept (for backward, the aux losses): as views they would also keep the
        # lambda head's product, used once
        if len(gates) > 1:
            h, gx[0] = h.contiguous(), gx[0].contiguous()
    elif len(gates) == 1:  # one gate (top-k, softmax): its product as is, no one-piece split
        h, gx = expert_codes(lora_x, A), [x @ gates[0].t()]
    else:
        h, gx = expert_codes(lora_x, A), (x @ cat_nonempty(list(gates)).t()).split(sizes, 1)
    return (y, h, *gx)


def stacked_products_backward(
    grads: list[Tensor | None], weights: list[Tensor], inp: Tensor, need: list[bool]
) -> tuple[tuple[Tensor, Tensor] | None, list[Tensor | None]]:
    """Backward of outputs W_i inp that came from one GEMM on the stacked W_i.

    Args:
        grads: each output's gradient (tokens, rows_i), None where no loss reached it.
        weights: the W_i (rows_i, d_in).
        inp: (tokens, d_in), the input they multiplied.
        need: whether each W_i needs its gradient.

    Returns:
        ((G, W) with inp's gradient = G W, one GEMM, or None when no output got a gradient;
        each W_i's gradient where needed, from one GEMM too).
    """
    have = [i for i, grad in enumerate(grads) if grad is not None]
    if not have:
        return None, [None] * len(weights)
    to_input = (cat_nonempty([grads[i] for i in have], 1), cat_nonempty([weights[i] for i in have]))
    wanted = [i for i in have if need[i]]
    weight_grads: list[Tensor | None] = [None] * len(weights)
    if wanted:
        stacked = cat_nonempty([grads[i] for i in wanted], 1).t() @ inp
        for i, grad in zip(
            wanted, stacked.split([weights[i].shape[0] for i in wanted]), strict=True
        ):
            weight_grads[i] = grad
    return to_input, weight_grads


class InputProducts(torch.autograd.Function):
    """input_products() with the one-GEMM input gradient (the module's docstring). Saves x (which
    the base product saves anyway), lora_x if given, and the weights. An output no loss reached
    (e.g. h, when only a router loss is backpropagated) costs nothing."""

    @staticmethod
    def forward(ctx, x, lora_x, W0, b0, A, *gates):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, lora_x, W0, A, *gates)
        return input_products(x, lora_x, W0, b0, A, *gates)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y, grad_h, *grad_gates):
        x, lora_x, W0, A, *gates = ctx.saved_tensors
        need_x, need_lora_x, need_W0, need_b0, need_A, *need_gates = ctx.needs_input_grad
        if lora_x is None:  # h and the gates' products came from one GEMM: so do their gradients
            to_x, (grad_A, *grad_g) = stacked_products_backward(
                [grad_h, *grad_gates], [A, *gates], x, [need_A, *need_gates]
            )
            from_lora_x = None
        else:
            to_x, grad_g = (
                stacked_products_backward(list(grad_gates), gates, x, need_gates)
                if gates
                else (None, [])
            )
            from_lora_x, (grad_A,) = stacked_products_backward([grad_h], [A], lora_x, [need_A])
        grad_y = grad_y if W0 is not None else None
        terms = [(grad_y, W0)] if grad_y is not None else []
        terms += [to_x] if to_x is not None else []
        grad_x = None
        if need_x and terms:
            grad_x = terms[0][0] @ terms[0][1]
            for grad, W in terms[1:]:
                grad_x.addmm_(grad, W)
        grad_lora_x = (
            from_lora_x[0] @ from_lora_x[1] if need_lora_x and from_lora_x is not None else None
        )
        grad_W0 = grad_y.t() @ x if need_W0 and grad_y is not None else None
        grad_b0 = grad_y.sum(0) if need_b0 and grad_y is not None else None
        return grad_x, grad_lora_x, grad_W0, grad_b0, grad_A, *grad_g
