"""What every execution kernel takes: the layer's inputs, its experts' weights and the routing.

A kernel is a function `kernel(inputs: KernelInputs) -> Tensor` that returns y + s * Delta(x)
(tokens, d_out), with Delta the mixture of lmoe.layer.mixture_delta (the reference every kernel is
tested against, values and gradients). Kernels differ only in how they run it (see lmoe.kernels).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..routing import Routing


@dataclass
class KernelInputs:
    """One forward's operands, in the compute dtype except the expert weights (a kernel casts what
    it reads, so a bank is never copied twice)."""

    y: Tensor  # (tokens, d_out): the frozen layer's output W0 x + b0, to which s * Delta is added
    experts_x: Tensor  # (tokens, d_in): the experts' input: x, or dropout(x)
    lora_A: Tensor  # (E, r, d_in): the layer's parameter
    lora_B: Tensor  # (E, d_out, r): the layer's parameter, in its storage layout (expert_bank_B)
    routing: Routing  # the router's output; top-k's index and weights (tokens, k) where it fixes k
    g: Tensor  # (tokens, E): routing.weights in the compute dtype
    per_token: int | None  # experts a token where the router fixes it (top-k: k), else None
    scaling: float  # s = alpha / r
    params: bool  # composition "params" (True) or "outputs" (False)
    autograd: bool  # through the kernel's autograd Function (training) or plain ops (generation)
    codes: Tensor | None = None  # (tokens, E*r): A x where the input GEMM computed it (dense plan)
    most_per_token: int | None = None  # the most experts any token routes to, where counted
