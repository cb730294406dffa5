"""MoLoRALinear: a frozen linear layer plus E LoRA experts, mixed per token by a router.

For a token x (d_in,) with routing weights g (E,) on the simplex (from the router), experts
A_i (r, d_in), B_i (d_out, r) and the LoRA scale s, the layer computes y = W0 x + b0 + s Delta(x):

    params  (L-MoE):  Delta(x) = (sum_i g_i B_i) (sum_i g_i A_i) x
    outputs (MoLoRA): Delta(x) = sum_i g_i B_i A_i x

mixture_delta below is that formula as written, over all tokens at once; reference_forward is the
layer's forward with it. The layer runs the same maths through an execution kernel (lmoe.kernels:
one rank-E*r LoRA, or only the routed pairs), each tested against mixture_delta in values and
every gradient. docs/design.md sections 1-2 derive both.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .config import AUX_COEFS, LMoEConfig
from .kernels import KernelInputs, run_kernel
from .kernels.csr import csr_ok
from .kernels.dense import stacked_A, stacked_B
from .kernels.input_gemm import InputProducts, input_products
from .router_losses import AuxStats
from .routers import build_router
from .routing import Routing
from .sparse import DENSE_UP_TO_RANK, group_cost, prefer_sparse


def mixture_delta(x: Tensor, A: Tensor, B: Tensor, g: Tensor, composition: str) -> Tensor:
    """Delta(x) (tokens, d_out), without the scale s: the reference every kernel is tested against.

    Args:
        x: (tokens, d_in), the experts' input.
        A: (E, r, d_in), the experts' A_i.
        B: (E, d_out, r), the experts' B_i.
        g: (tokens, E), the routing weights.
        composition: "params" or "outputs".

    Returns:
        (tokens, d_out).
    """
    if composition == "params":
        A_x = torch.einsum("te,erd->trd", g, A)  # (tokens, r, d_in): sum_i g_i A_i per token
        B_x = torch.einsum("te,eor->tor", g, B)  # (tokens, d_out, r): sum_i g_i B_i per token
        return torch.einsum("tor,trd,td->to", B_x, A_x, x)
    h = torch.einsum("erd,td->ter", A, x)  # (tokens, E, r): each expert's code A_i x
    return torch.einsum("te,eor,ter->to", g, B, h)


def expert_bank_B(B: Tensor) -> Tensor:
    """B (E, d_out, r) in the layout a layer keeps lora_B in: its values stored as (E, r, d_out),
    shown as the (E, d_out, r) transpose.

    Why: then the dense kernel's stacked B (d_out, E*r) is a view, each expert's B_e one block (the
    sparse kernels read it in place), and every kernel's gradient comes out in this layout, so
    autograd never copies a bank-sized gradient to match the parameter. Adapter files store the
    (E, d_out, r) values, whatever the layout."""
    return B.transpose(1, 2).contiguous().transpose(1, 2)


def linear_shape(base: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of an nn.Linear (or subclass, e.g. bitsandbytes) or a
    transformers GPT-2 Conv1D."""
    if isinstance(base, nn.Linear) or hasattr(base, "in_features"):
        return base.in_features, base.out_features
    if type(base).__name__ == "Conv1D":  # weight is (d_in, d_out); y = x @ W + b
        return base.weight.shape[0], base.weight.shape[1]
    raise TypeError(
        f"MoLoRALinear wraps nn.Linear or transformers' Conv1D, not {type(base).__name__}."
    )


def _cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t.to(dtype)


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the adapter GEMMs run in: autocast's where it is on, else the input's."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


def frozen_product(base: nn.Module) -> tuple[Tensor, Tensor | None] | None:
    """(W (d_out, d_in), bias) when the base is a plain nn.Linear or GPT-2 Conv1D, whose product the
    layer then runs itself (in one GEMM with the experts' and the gate's, kernels.input_gemm); None
    for anything else (e.g. 8/4-bit), and for a base with hooks or a replaced forward (e.g.
    accelerate's offloading): the base runs as itself."""
    if (
        base._forward_pre_hooks
        or base._forward_hooks
        or "forward" in vars(base)
        or hasattr(base, "_hf_hook")
    ):
        return None
    if type(base) is nn.Linear:
        return base.weight, base.bias
    if type(base).__name__ == "Conv1D":
        return base.weight.t(), base.bias
    return None


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ in (
        "Conv1D",
        "Linear8bitLt",
        "Linear4bit",
    )


class TokenMask:
    """The attention mask (batch, seq) of the model forward in progress, or None. inject shares one
    between a model's forward hooks and all its layers, so layers can leave padding out of their
    statistics."""

    def __init__(self) -> None:
        self.value: Tensor | None = None


class MoLoRALinear(nn.Module):
    """y = W0 x + s * Delta(x), Delta mixing E LoRA experts with per-token router weights g(x)
    (mixture_delta; the module's docstring)."""

    def __init__(self, base: nn.Module, cfg: LMoEConfig, lambda_heads: dict | None = None) -> None:
        """lambda_heads: the dynamic router's lambda heads shared across layers (inject
        passes one dict)."""
        super().__init__()
        self.base = base
        self.in_features, self.out_features = linear_shape(base)
        self.num_experts, self.rank = cfg.num_experts, cfg.rank
        self.scaling = cfg.scaling
        self.composition = cfg.composition
        self.execution = cfg.execution  # "auto", "dense" or "sparse": see _plan
        weight = base.weight
        factory = {
            "device": weight.device,
            "dtype": weight.dtype if weight.dtype.is_floating_point else torch.float32,
        }
        self.lora_A = nn.Parameter(
            torch.empty(self.num_experts, self.rank, self.in_features, **factory)
        )
        self.lora_B = nn.Parameter(
            expert_bank_B(torch.zeros(self.num_experts, self.out_features, self.rank, **factory))
        )
        self.router = build_router(self.in_features, cfg, lambda_heads, **factory)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.router_reads_dropout = cfg.router_reads_dropout
        self.reset_experts()
        self.aux_names = {
            name for name, coef in AUX_COEFS.items() if getattr(cfg, coef)
        }  # losses that count
        self.last_routing: tuple[Routing, Tensor | None] | None = (
            None  # last training forward's, and its mask
        )
        self._aux: AuxStats | None = None  # last_aux, once computed
        self.recorder: list[tuple[Tensor, Tensor | None]] | None = None  # set by record_routing
        self.token_mask = TokenMask()  # inject replaces it with the model's
        self.merged_routing: Tensor | None = (
            None  # set by lmoe.modular.merge: base holds W0 + s Delta W(g)
        )

    def reset_experts(self) -> None:
        """LoRA init: each A_i Kaiming-uniform (independently drawn), B_i = 0, so
        Delta starts at 0."""
        for a in self.lora_A.data:  # init only, not a hot path
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def stacked(self) -> tuple[Tensor, Tensor]:
        """A as (E*r, d_in) and B as (d_out, E*r): the experts side by side as one LoRA (views)."""
        return stacked_A(self.lora_A), stacked_B(self.lora_B)

    def reference_forward(self, x: Tensor) -> Tensor:
        """forward's maths in plain autograd ops (mixture_delta): the oracle the kernels are tested
        against. Keeps the routing as forward does; x (..., d_in) -> (..., d_out)."""
        x2 = x.reshape(-1, self.in_features)  # (tokens, d_in)
        experts_x = self.dropout(x2)  # (tokens, d_in): what the experts read
        reads_dropout = self.router_reads_dropout and self.training
        routing = self.router.route(experts_x if reads_dropout else x2)
        self._keep_routing(routing, self._real_tokens(x))
        y = self.base(x).reshape(-1, self.out_features)  # (tokens, d_out)
        g = routing.weights  # (tokens, E)
        delta = mixture_delta(experts_x, self.lora_A, self.lora_B, g, self.composition)
        return (y + self.scaling * delta).view(*x.shape[:-1], self.out_features)

    def forward(self, x: Tensor) -> Tensor:
        """reference_forward's values, fast: route, then the kernel the plan picks runs the
        experts."""
        if self.merged_routing is not None:  # routing fixed and folded into the base weight
            return self.base(x)
        dtype = _compute_dtype(x)
        x2 = x.reshape(-1, self.in_features)  # (tokens, d_in)
        # without autograd (generation) the same maths runs directly: no Function bookkeeping
        autograd = torch.is_grad_enabled()
        # the experts' input where it is not x itself (dropout, or generation's separate GEMMs)
        lora_x = (
            None
            if autograd and isinstance(self.dropout, nn.Identity)
            else self.dropout(x2).to(dtype)
        )
        gates_read_x = lora_x is None or not self.router_reads_dropout or not self.training
        csr = csr_ok(x2.device, dtype)  # what a sparse plan runs: CSR products or grouped GEMMs
        plan = self._plan(x2.shape[0], csr)
        y, codes, *gate_products = self._input_products(
            x2, lora_x, plan, dtype, autograd, gates_read_x
        )
        out_dtype = dtype
        if y is None:  # a base the layer does not run itself (see frozen_product)
            y = self.base(x)
            out_dtype = y.dtype
            y = y.reshape(-1, self.out_features).to(dtype)  # (tokens, d_out)
        routing = (
            self.router.route(x2, *gate_products) if gates_read_x else self.router.route(lora_x)
        )
        self._keep_routing(routing, self._real_tokens(x))
        experts_x = (x2 if lora_x is None else lora_x).to(dtype)  # (tokens, d_in)
        g = routing.weights.to(dtype)  # (tokens, E)
        codes = codes if plan == "dense" else None  # else A had no rows here
        inputs = KernelInputs(
            y,
            experts_x,
            self.lora_A,
            self.lora_B,
            routing,
            g,
            self.router.experts_per_token(),
            self.scaling,
            self.composition == "params",
            autograd,
            codes,
        )
        out = run_kernel(plan, inputs, csr)  # (tokens, d_out)
        return out.view(*x.shape[:-1], self.out_features).to(out_dtype)

    def _plan(self, tokens: int, csr: bool) -> str:
        """How this forward runs the experts: "dense", "sparse", or "after_routing" (decided from
        the routing's count of active pairs; the dynamic router's count is known only then). See
        sparse.prefer_sparse; csr: whether the sparse plan would run the CSR kernel
        (kernels.csr.csr_ok)."""
        if self.execution != "auto":
            return self.execution
        if self.num_experts * self.rank <= DENSE_UP_TO_RANK:  # today's sizes: no call per forward
            return "dense"
        E, r, cost = self.num_experts, self.rank, group_cost(csr)
        per_token = self.router.experts_per_token()
        if per_token is not None:
            return "sparse" if prefer_sparse(E, r, per_token, tokens, cost) else "dense"
        return "after_routing" if prefer_sparse(E, r, 1, tokens, cost) else "dense"

    def _input_products(
        self,
        x2: Tensor,
        lora_x: Tensor | None,
        plan: str,
        dtype: torch.dtype,
        autograd: bool,
        gates_read_x: bool,
    ) -> tuple[Tensor | None, ...]:
        """kernels.input_gemm.input_products of x2 in dtype: (y, h, *gate products).

        Args:
            x2: (tokens, d_in), the layer's input.
            lora_x: the experts' input where it is not x2 (dropout; and, without autograd, x2 as a
                separate input with only W_g: small GEMMs beat copying weights per token).
            plan: _plan's: only the dense plan computes the codes h = A x here (the sparse kernels
                compute their pairs' only, and skip the stacked views).
            dtype: the compute dtype.
            autograd: through InputProducts (its one-GEMM input gradient) or plain ops.
            gates_read_x: false: no gate products here (the router reads lora_x, runs its own).

        Returns:
            (y (tokens, d_out) or None where the base runs itself, h (tokens, E*r) or None,
            *G x for the gate weights the router asks for (Router.x_weights)).
        """
        W0, b0 = frozen_product(self.base) or (None, None)
        A = stacked_A(self.lora_A) if plan == "dense" else self.lora_A[:0].view(0, self.in_features)
        gates = (
            []
            if not gates_read_x
            else self.router.x_weights(x2)
            if autograd
            else [self.router.weight]
        )
        args = (
            x2.to(dtype),
            lora_x,
            _cast(W0, dtype),
            _cast(b0, dtype),
            A.to(dtype),
            *(G.to(dtype) for G in gates),
        )
        return InputProducts.apply(*args) if autograd else input_products(*args)

    def _real_tokens(self, x: Tensor) -> Tensor | None:
        """(tokens,) bool, false at padding: the model's attention mask when it matches x's (batch,
        seq) (not e.g. while generating with a cache); None (every token counts) otherwise."""
        mask = self.token_mask.value
        if mask is None or mask.shape != x.shape[:-1]:
            return None
        return mask.reshape(-1).to(x.device) != 0

    def _keep_routing(self, routing: Routing, mask: Tensor | None) -> None:
        """Keep what aux_loss and record_routing need; only the last forward, so nothing
        accumulates. The mask is kept beside the weights: selecting the real tokens here
        would be a host sync."""
        if self.training:  # references only: the losses' ops run later, in last_aux
            self.last_routing, self._aux = (routing, mask), None
        if self.recorder is not None:
            self.recorder.append((routing.weights.detach(), mask))

    @property
    def last_aux(self) -> AuxStats | None:
        """What the aux losses of the last training forward need, computed on first use. Not in
        forward: a gradient-checkpointed block re-runs its forward in backward (without the model's
        attention mask) and must save exactly the tensors the first run saved."""
        if self._aux is None and self.last_routing is not None and self.aux_names:
            routing, mask = self.last_routing
            self._aux = self.router.aux_stats(routing, self.aux_names, mask)
        return self._aux

    def forget_routing(self) -> None:
        """Drop the last forward's routing and losses (they hold its autograd graph)."""
        self.last_routing, self._aux = None, None

    def __getstate__(self) -> dict:
        # the last step's routing holds its autograd graph, which cannot be copied or pickled
        return {**super().__getstate__(), "last_routing": None, "_aux": None}

    def delta_weight(self, g: Tensor) -> Tensor:
        """The dense update s * Delta W (d_out, d_in) for one fixed routing vector g (E,)."""
        g = g.to(self.lora_A.dtype)
        if self.composition == "params":
            A = torch.einsum("e,erd->rd", g, self.lora_A)
            B = torch.einsum("e,eor->or", g, self.lora_B)
            return self.scaling * B @ A
        return self.scaling * torch.einsum("e,eor,erd->od", g, self.lora_B, self.lora_A)

    def extra_repr(self) -> str:
        return (
            f"d_in={self.in_features}, d_out={self.out_features}, experts={self.num_experts}, "
            f"rank={self.rank}, scaling={self.scaling:g}, composition={self.composition}"
        )
