"""MoLoRALinear: a frozen linear layer plus a bank of E LoRA experts mixed per token by a router."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import AUX_COEFS, LMoEConfig
from .router_losses import AuxStats
from .routing import Routing, build_router
from .sparse import (DENSE_UP_TO_RANK, GroupedMixture, active_counts, gathered_mixture, gathers, group_cost,
                     grouped_mixture, prefer_sparse, route_pairs)
from .sparse_csr import CsrMixture, csr_mixture, csr_ok, pattern


def expert_bank_B(B: Tensor) -> Tensor:
    """B (E, d_out, r) in the layout a layer keeps lora_B in: its values stored as (E, r, d_out), shown as the
    (E, d_out, r) transpose. Then the dense path's stacked B (d_out, E*r) is a view, each expert's B_e one
    block (the sparse path's grouped GEMMs read it in place), and both paths' gradients come out in this
    layout, so autograd never copies a bank-sized gradient to match the parameter."""
    return B.transpose(1, 2).contiguous().transpose(1, 2)


def linear_shape(base: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of an nn.Linear (or subclass, e.g. bitsandbytes) or a transformers GPT-2 Conv1D."""
    if isinstance(base, nn.Linear) or hasattr(base, "in_features"):
        return base.in_features, base.out_features
    if type(base).__name__ == "Conv1D":  # weight is (d_in, d_out); y = x @ W + b
        return base.weight.shape[0], base.weight.shape[1]
    raise TypeError(f"MoLoRALinear wraps nn.Linear or transformers' Conv1D, not {type(base).__name__}.")


def _cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t.to(dtype)


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the adapter GEMMs run in: autocast's where it is on, else the input's."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


def mixed_code(h: Tensor, g: Tensor) -> Tensor:
    """z = A(x) x = sum_i g_i A_i x = sum_i g_i h_i: h (tokens, E, r), g (tokens, E) -> (tokens, 1, r)."""
    return torch.bmm(g.unsqueeze(1), h)


def mix(h: Tensor, g: Tensor, weight: Tensor, z: Tensor | None) -> Tensor:
    """Compose per-expert codes h = A x (tokens, E, r) with routing -> (tokens, E*r).

    Block j of the result is weight_j * z with z = mixed_code(h, g) (params composition: pass z), or
    weight_j * h_j (outputs: z None); weight is g, or s*g where the LoRA scale s is wanted inside.
    Times the stacked B: Delta.
    """
    return (weight.unsqueeze(-1) * (h if z is None else z)).flatten(1)


def mix_backward(grad_m: Tensor, h: Tensor, g: Tensor, scaling: float, z: Tensor | None) -> tuple[Tensor, Tensor]:
    """Gradients of s * mix(h, g, g, z) with respect to h (tokens, E, r) and g (tokens, E), given grad_m."""
    sg = scaling * g  # (tokens, E)
    if z is None:  # outputs: m_j = s g_j h_j
        return sg.unsqueeze(-1) * grad_m, scaling * (grad_m * h).sum(-1)
    grad_z = torch.bmm(sg.unsqueeze(1), grad_m)  # (tokens, 1, r): sum_j s g_j dm_j
    # m_j = s g_j z with z = sum_i g_i h_i: g enters twice, as the mixing weight and inside z
    grad_g = scaling * torch.bmm(grad_m, z.transpose(1, 2)) + torch.bmm(h, grad_z.transpose(1, 2))
    return g.unsqueeze(-1) * grad_z, grad_g.squeeze(-1)


def mixture(y: Tensor, h: Tensor, B: Tensor, g: Tensor, scaling: float, params: bool) -> tuple[Tensor, Tensor | None]:
    """(y + s * B mix(h, g), z): y (tokens, d_out), h = A x (tokens, E*r), B (d_out, E*r), g (tokens, E), one
    dtype; z the params composition's mixed code (tokens, 1, r), None for outputs. The scale and the
    residual add ride on the GEMM."""
    h = h.view(h.shape[0], g.shape[-1], -1)
    z = mixed_code(h, g) if params else None
    return torch.addmm(y, mix(h, g, g, z), B.t(), alpha=scaling), z


def joined(tensors: list[Tensor], dim: int = 0) -> Tensor:
    """torch.cat of the tensors not empty along dim, and no copy where one is left (e.g. the gate's W_g alone:
    a copy of it per forward cost 46 us of a 480 us layer at E = 64 in generation)."""
    kept = [t for t in tensors if t.shape[dim]] or tensors[:1]
    return kept[0] if len(kept) == 1 else torch.cat(kept, dim)


def projections(x: Tensor, lora_x: Tensor | None, W0: Tensor | None, b0: Tensor | None, A: Tensor,
                *gates: Tensor) -> tuple[Tensor | None, ...]:
    """What a mixture layer computes from its input x (tokens, d_in): (y = W0 x + b0, or None without W0;
    h = A x, the experts' codes (tokens, E*r); then G x for each gate weight G: the router's
    stored W_g and, for LD-MoLE, its lambda head's first linear's, see Router.x_weights; the
    router scales them).

    lora_x: the experts' input when it is not x (dropout); without it A and the gates run as one GEMM.
    """
    y = None if W0 is None else F.linear(x, W0, b0)
    sizes = [G.shape[0] for G in gates]
    if not gates:  # the router reads another input (router_reads_dropout) and runs its own products
        return (y, codes(x if lora_x is None else lora_x, A))
    if lora_x is None:
        h, *gx = (x @ joined([A, *gates]).t()).split([A.shape[0], *sizes], 1)
        if len(gates) > 1:  # h and W_g x are kept (for backward, the aux losses): as views they would
            h, gx[0] = h.contiguous(), gx[0].contiguous()  # also keep the lambda head's product, used once
    else:  # one gate (top-k, softmax): its product as is, no one-piece split
        h, gx = codes(lora_x, A), [x @ gates[0].t()] if len(gates) == 1 else (x @ joined(gates).t()).split(sizes, 1)
    return (y, h, *gx)


def codes(x: Tensor, A: Tensor) -> Tensor | None:
    """h = A x, or None for an A without rows (the sparse path computes its pairs' codes itself): no empty
    product per layer and token while generating."""
    return x @ A.t() if A.shape[0] else None


def _products_backward(grads: list[Tensor | None], weights: list[Tensor], inp: Tensor,
                       need: list[bool]) -> tuple[tuple[Tensor, Tensor] | None, list[Tensor | None]]:
    """For outputs W_i inp that came from one GEMM: ((G, W) with inp's gradient = G W, in one GEMM, or
    None when no output got a gradient; each W_i's gradient where needed, from one GEMM too)."""
    have = [i for i, grad in enumerate(grads) if grad is not None]
    if not have:
        return None, [None] * len(weights)
    to_input = (joined([grads[i] for i in have], 1), joined([weights[i] for i in have]))
    wanted = [i for i in have if need[i]]
    weight_grads: list[Tensor | None] = [None] * len(weights)
    if wanted:
        stacked = joined([grads[i] for i in wanted], 1).t() @ inp
        for i, grad in zip(wanted, stacked.split([weights[i].shape[0] for i in wanted])):
            weight_grads[i] = grad
    return to_input, weight_grads


class _Projections(torch.autograd.Function):
    """projections() whose backward gives the input gradient as one GEMM and one accumulating GEMM,
    dx = dy W0 + [dh, dg...] [A; gates], where autograd would run a GEMM per product and add their
    (tokens, d_in) results. Saves x (which the base product saves anyway), lora_x if given, and the
    weights. An output no loss reached (e.g. h, when only a router loss is backpropagated) costs nothing.
    """

    @staticmethod
    def forward(ctx, x, lora_x, W0, b0, A, *gates):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, lora_x, W0, A, *gates)
        return projections(x, lora_x, W0, b0, A, *gates)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y, grad_h, *grad_gates):
        x, lora_x, W0, A, *gates = ctx.saved_tensors
        need_x, need_lora_x, need_W0, need_b0, need_A, *need_gates = ctx.needs_input_grad
        if lora_x is None:  # h and the gates' products came from one GEMM: so do their gradients
            to_x, (grad_A, *grad_g) = _products_backward([grad_h, *grad_gates], [A, *gates], x, [need_A, *need_gates])
            from_lora_x = None
        else:
            to_x, grad_g = _products_backward(list(grad_gates), gates, x, need_gates) if gates else (None, [])
            from_lora_x, (grad_A,) = _products_backward([grad_h], [A], lora_x, [need_A])
        grad_y = grad_y if W0 is not None else None
        terms = [(grad_y, W0)] if grad_y is not None else []
        terms += [to_x] if to_x is not None else []
        grad_x = None
        if need_x and terms:
            grad_x = terms[0][0] @ terms[0][1]
            for grad, W in terms[1:]:
                grad_x.addmm_(grad, W)
        grad_lora_x = from_lora_x[0] @ from_lora_x[1] if need_lora_x and from_lora_x is not None else None
        grad_W0 = grad_y.t() @ x if need_W0 and grad_y is not None else None
        grad_b0 = grad_y.sum(0) if need_b0 and grad_y is not None else None
        return grad_x, grad_lora_x, grad_W0, grad_b0, grad_A, *grad_g


class _MixtureLoRA(torch.autograd.Function):
    """mixture(y, h, B, g): the second GEMM of one rank-E*r LoRA, with the routing mix before it.

    Saves h, g (tokens, E) and, for params, z (tokens, r); the mixed codes (tokens, E*r) are recomputed
    in backward rather than kept, so memory matches plain LoRA. Arguments as mixture.
    """

    @staticmethod
    def forward(ctx, y, h, B, g, scaling, params):
        out, z = mixture(y, h, B, g, scaling, params)
        ctx.save_for_backward(h, B, g, z)
        ctx.scaling = scaling
        return out

    @staticmethod
    def backward(ctx, grad_out):
        h, B, g, z = ctx.saved_tensors
        s = ctx.scaling
        h = h.view(h.shape[0], g.shape[-1], -1)  # (tokens, E, r)
        need_h, need_B, need_g = ctx.needs_input_grad[1:4]
        grad_m = (grad_out.to(h.dtype) @ B).view_as(h)  # (tokens, E, r), without the scale s
        # as (m^T grad)^T: in the layout of the stacked B's storage (expert_bank_B), so no copy to match it
        grad_B = (mix(h, g, s * g, z).t() @ grad_out.to(h.dtype)).t() if need_B else None
        grad_h, grad_g = mix_backward(grad_m, h, g, s, z)
        return grad_out, grad_h.flatten(1) if need_h else None, grad_B, grad_g if need_g else None, None, None


def frozen_product(base: nn.Module) -> tuple[Tensor, Tensor | None] | None:
    """(W (d_out, d_in), bias) when the base is a plain nn.Linear or GPT-2 Conv1D, whose product the layer
    then runs itself (see _Projections); None for anything else (e.g. 8/4-bit), and for a base with hooks
    or a replaced forward (e.g. accelerate's offloading): the base runs as itself."""
    if base._forward_pre_hooks or base._forward_hooks or "forward" in vars(base) or hasattr(base, "_hf_hook"):
        return None
    if type(base) is nn.Linear:
        return base.weight, base.bias
    if type(base).__name__ == "Conv1D":
        return base.weight.t(), base.bias
    return None


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ in ("Conv1D", "Linear8bitLt", "Linear4bit")


class TokenMask:
    """The attention mask (batch, seq) of the model forward in progress, or None. inject shares one
    between a model's forward hooks and all its layers, so layers can leave padding out of their statistics."""

    def __init__(self) -> None:
        self.value: Tensor | None = None


class MoLoRALinear(nn.Module):
    """y = W0 x + s * Delta(x), Delta mixing E LoRA experts with per-token router weights g(x).

    composition "params" (L-MoE): Delta = B(x) A(x) x with A(x) = sum g_i A_i, B(x) = sum g_i B_i.
    composition "outputs" (MoLoRA): Delta = sum g_i B_i A_i x.
    Both run as the two GEMMs of one rank-E*r LoRA on the stacked experts, plus the router.
    """

    def __init__(self, base: nn.Module, cfg: LMoEConfig, lambda_heads: dict | None = None) -> None:
        """lambda_heads: the dynamic router's lambda heads shared across layers (inject passes one dict)."""
        super().__init__()
        self.base = base
        self.in_features, self.out_features = linear_shape(base)
        self.num_experts, self.rank = cfg.num_experts, cfg.rank
        self.scaling = cfg.scaling
        self.composition = cfg.composition
        self.execution = cfg.execution  # "auto", "dense" or "sparse": see _plan
        weight = base.weight
        factory = {"device": weight.device,
                   "dtype": weight.dtype if weight.dtype.is_floating_point else torch.float32}
        self.lora_A = nn.Parameter(torch.empty(self.num_experts, self.rank, self.in_features, **factory))
        self.lora_B = nn.Parameter(expert_bank_B(torch.zeros(self.num_experts, self.out_features, self.rank,
                                                             **factory)))
        self.router = build_router(self.in_features, cfg, lambda_heads, **factory)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.router_reads_dropout = cfg.router_reads_dropout
        self.reset_experts()
        self.aux_names = {name for name, coef in AUX_COEFS.items() if getattr(cfg, coef)}  # losses that count
        self.last_routing: tuple[Routing, Tensor | None] | None = None  # last training forward's, and its mask
        self._aux: AuxStats | None = None  # last_aux, once computed
        self.recorder: list[tuple[Tensor, Tensor | None]] | None = None  # set by record_routing
        self.token_mask = TokenMask()  # inject replaces it with the model's
        self.merged_routing: Tensor | None = None  # set by lmoe.modular.merge: base holds W0 + s Delta W(g)

    def reset_experts(self) -> None:
        """LoRA init: each A_i Kaiming-uniform (independently drawn), B_i = 0, so Delta starts at 0."""
        for a in self.lora_A.data:  # init only, not a hot path
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def stacked(self) -> tuple[Tensor, Tensor]:
        """A as (E*r, d_in) and B as (d_out, E*r): the experts laid side by side as one LoRA.

        Views of the parameters in their own layout (expert_bank_B); a copy only if lora_B was replaced by
        one in another layout.
        """
        A = self.lora_A.reshape(self.num_experts * self.rank, self.in_features)
        B = self.lora_B.transpose(1, 2).reshape(self.num_experts * self.rank, self.out_features).t()
        return A, B

    def forward(self, x: Tensor) -> Tensor:
        if self.merged_routing is not None:  # routing fixed and folded into the base weight
            return self.base(x)
        dtype = _compute_dtype(x)
        x2 = x.reshape(-1, self.in_features)  # (tokens, d_in)
        # without autograd (generation) the same maths runs directly: no Function bookkeeping per token
        grad = torch.is_grad_enabled()
        lora_x = None if grad and isinstance(self.dropout, nn.Identity) else self.dropout(x2).to(dtype)
        gates_read_x = lora_x is None or not self.router_reads_dropout or not self.training
        csr = csr_ok(x2.device, dtype)  # which kernel a sparse plan runs: CSR products or grouped GEMMs
        plan = self._plan(x2.shape[0], csr)
        # the dense path's A x rides on the base / gate GEMM; the sparse one computes its pairs' only (and skips
        # the stacked views: while generating, each op a layer and token costs)
        stack = self.stacked() if plan == "dense" else None
        A = stack[0] if stack else self.lora_A[:0].view(0, self.in_features)
        y, h, *gx = self._projections(x2, lora_x, A, dtype, grad, gates_read_x)
        out_dtype = dtype
        if y is None:  # a base the layer does not run itself (see frozen_product)
            y = self.base(x)
            out_dtype = y.dtype
            y = y.reshape(-1, self.out_features).to(dtype)
        routing = self.router.route(x2, *gx) if gates_read_x else self.router.route(lora_x)
        self._observe(routing, self._real_tokens(x))
        g, experts_x = routing.weights.to(dtype), x2 if lora_x is None else lora_x
        out = None if plan == "dense" else self._sparse(plan, y, experts_x.to(dtype), g, grad, routing, csr)
        if out is None:  # dense: planned, or observed (then the codes A x run apart, by autograd)
            A, B = stack or self.stacked()
            h = h if plan == "dense" else experts_x.to(dtype) @ A.to(dtype).t()
            args = (y, h, B.to(dtype), g, self.scaling, self.composition == "params")
            out = _MixtureLoRA.apply(*args) if grad else mixture(*args)[0]
        return out.view(*x.shape[:-1], self.out_features).to(out_dtype)

    def _plan(self, tokens: int, csr: bool) -> str:
        """How this forward runs the experts: "dense", "sparse", or "observe" (decide from the routing's
        count of active pairs; the dynamic router's count is known only then). See sparse.prefer_sparse; csr:
        whether the sparse path would run the CSR products (sparse_csr.csr_ok)."""
        if self.execution != "auto":
            return self.execution
        if self.num_experts * self.rank <= DENSE_UP_TO_RANK:  # today's sizes: no call per forward
            return "dense"
        per_token, cost = self.router.experts_per_token(), group_cost(csr)
        if per_token is not None:
            return "sparse" if prefer_sparse(self.num_experts, self.rank, per_token, tokens, cost) else "dense"
        return "observe" if prefer_sparse(self.num_experts, self.rank, 1, tokens, cost) else "dense"

    def _sparse(self, plan: str, y: Tensor, experts_x: Tensor, g: Tensor, grad: bool, routing: Routing,
                csr: bool) -> Tensor | None:
        """y + s * Delta over the pairs with g > 0 (lmoe.sparse), from the experts' input experts_x, the
        routing g (tokens, E) in y's dtype and, from top-k, its experts' index and weights (tokens, k), through
        the CSR products (csr) or grouped GEMMs; None where the plan was to observe and the routing is too
        dense to pay."""
        (tokens, E), params = g.shape, self.composition == "params"
        per_token = self.router.experts_per_token()
        most, active = (per_token, per_token) if per_token is not None else active_counts(g)
        if plan == "observe" and not prefer_sparse(E, self.rank, active, tokens, group_cost(csr)):
            return None
        A, B = self.lora_A.to(y.dtype), self.lora_B.to(y.dtype)
        index = routing.top_index
        if gathers(E, most, tokens):  # few tokens (generation): gather each token's own experts
            top = None if index is None else (routing.top_weights.to(y.dtype), index)
            return gathered_mixture(y, experts_x, A, B, g, most, self.scaling, params, top)
        if csr:  # CPU: one sparse-matrix product per product, not one GEMM per expert
            args = (y, experts_x, A, B, g, pattern(g, per_token, self.rank, index), self.scaling, params)
            return CsrMixture.apply(*args) if grad else csr_mixture(*args)[0]
        args = (y, experts_x, A, B, g, route_pairs(g, per_token), self.scaling, params)
        return GroupedMixture.apply(*args) if grad else grouped_mixture(*args)[0]

    def _projections(self, x2: Tensor, lora_x: Tensor | None, A: Tensor, dtype: torch.dtype, grad: bool,
                     gates_read_x: bool) -> tuple[Tensor | None, ...]:
        """projections() of x2 in dtype, through _Projections under autograd: with the gate weights the
        router asks for (x_weights) in one GEMM with the experts' A when they read x itself (what pays is
        backward's single input-gradient GEMM). With dropout the experts read lora_x = dropout(x); without
        autograd (generation) x as a separate input and only W_g: small GEMMs beat copying weights per token.
        gates_read_x false: no gate products here (the router reads lora_x and runs its own)."""
        W0, b0 = frozen_product(self.base) or (None, None)
        gates = [] if not gates_read_x else self.router.x_weights(x2) if grad else [self.router.weight]
        args = (x2.to(dtype), lora_x, _cast(W0, dtype), _cast(b0, dtype), A.to(dtype), *(G.to(dtype) for G in gates))
        return _Projections.apply(*args) if grad else projections(*args)

    def _real_tokens(self, x: Tensor) -> Tensor | None:
        """(tokens,) bool, false at padding: the model's attention mask when it matches x's (batch, seq)
        (not e.g. while generating with a cache); None (every token counts) otherwise."""
        mask = self.token_mask.value
        if mask is None or mask.shape != x.shape[:-1]:
            return None
        return mask.reshape(-1).to(x.device) != 0

    def _observe(self, routing: Routing, mask: Tensor | None) -> None:
        """Keep what aux_loss and record_routing need; only the last forward, so nothing accumulates.
        The mask is kept beside the weights: selecting the real tokens here would be a host sync."""
        if self.training:  # references only: the losses' ops run later, in last_aux
            self.last_routing, self._aux = (routing, mask), None
        if self.recorder is not None:
            self.recorder.append((routing.weights.detach(), mask))

    @property
    def last_aux(self) -> AuxStats | None:
        """What the aux losses of the last training forward need, computed on first use. Not in forward:
        a gradient-checkpointed block re-runs its forward in backward (without the model's attention
        mask) and must save exactly the tensors the first run saved."""
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
        return (f"d_in={self.in_features}, d_out={self.out_features}, experts={self.num_experts}, "
                f"rank={self.rank}, scaling={self.scaling:g}, composition={self.composition}")
