"""The mixture's execution kernels behind one interface: kernel(KernelInputs) -> y + s * Delta.

Every kernel computes lmoe.layer.mixture_delta's maths (the reference the tests hold each one to,
values and every gradient); they differ in what they compute and where that pays:

    dense.py     every expert for every token, as the two GEMMs of one LoRA of rank E*r
    grouped.py   only the routed (token, expert) pairs, grouped by expert (grouped GEMMs)
    csr.py       the routed pairs on the CPU in float32/64, as one block-sparse matrix
    gathered.py  few tokens (decoding): each token's own experts' A and B gathered
    pairs.py     the per-pair weighting the grouped and CSR kernels share
    input_gemm.py  the products of the layer's input (W0 x, A x, the gates) in one GEMM

choose_kernel picks one by lmoe.sparse's rule, from the layer's plan (MoLoRALinear._plan).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from ..sparse import active_counts, gathers, group_cost, prefer_sparse
from .csr import csr_kernel
from .dense import dense_kernel
from .gathered import gathered_kernel
from .grouped import grouped_kernel
from .interface import KernelInputs

Kernel = Callable[[KernelInputs], Tensor]
KERNELS: dict[str, Kernel] = {
    "dense": dense_kernel,
    "grouped": grouped_kernel,
    "csr": csr_kernel,
    "gathered": gathered_kernel,
}


def choose_kernel(plan: str, inputs: KernelInputs, csr: bool) -> str:
    """The kernel that runs this forward: "dense", "gathered", "csr" or "grouped".

    Args:
        plan: the layer's plan: "dense", "sparse", or "after_routing" (sparse only where the
            routing's count of active pairs makes it pay: the dynamic router's count is known only
            then).
        inputs: the forward's operands; sets inputs.most_per_token for a sparse kernel.
        csr: whether a sparse plan runs the CSR products (csr.csr_ok) rather than grouped GEMMs.

    Returns:
        A key of KERNELS.
    """
    if plan == "dense":
        return "dense"
    (tokens, E), rank = inputs.g.shape, inputs.lora_A.shape[1]
    per_token = inputs.per_token
    most, active = (per_token, per_token) if per_token is not None else active_counts(inputs.g)
    if plan == "after_routing" and not prefer_sparse(E, rank, active, tokens, group_cost(csr)):
        return "dense"
    inputs.most_per_token = most
    if gathers(E, most, tokens):  # few tokens (generation): gather each token's own experts
        return "gathered"
    return "csr" if csr else "grouped"  # CPU: one sparse product per product, no call per expert


def run_kernel(plan: str, inputs: KernelInputs, csr: bool) -> Tensor:
    """y + s * Delta (tokens, d_out) through the kernel choose_kernel picks; arguments as it."""
    return KERNELS[choose_kernel(plan, inputs, csr)](inputs)
