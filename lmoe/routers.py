"""The routers: a token's layer input x to expert weights g (lmoe.routing's maths), and the
auxiliary losses each router defines.

A router is the lightweight gate `u = W_g x (+ b_g)` (a ScaledLinear: `router.weight` holds W_g
divided by the config's router_param_scale, `router.effective_weight()` is W_g) followed by a
routing function `g = route(u)`: SoftmaxRouter (L-MoE), TopKRouter, RemixRouter (lmoe.remix) and
DynamicRouter (LD-MoLE, with its shared LambdaHead). build_router makes the one cfg.router names.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import LAMBDA_BIAS_INIT, LMoEConfig, default_lambda_hidden
from .remix import draw_without_replacement, set_log_prob
from .router_losses import AuxStats, sparsity_per_token, token_count, token_sum, z_per_token
from .routing import (
    Routing,
    at_least_float32,
    scaled,
    softmax_route,
    sparsegen_route,
    topk_route_indexed,
)


class ScaledLinear(nn.Linear):
    """A linear layer y = W x + b whose parameters hold W / c and b / c for a fixed c (`scale`).

    The same function and, through init_effective, the same init as nn.Linear at any c, but
    Adam's step on a parameter is about lr whatever its gradient's size, so W and b move c times
    as far per step: the routers (gates and LD-MoLE's lambda heads, every linear of them) learn at
    c times the experts' rate under one learning rate, in any training loop, as a parameter group
    at lr * c would give them (exactly: Adam with eps / c there; AdamW's weight decay, though,
    shrinks W at the experts' rate, not c times it).
    """

    def __init__(self, d_in: int, d_out: int, bias: bool, scale: float, **factory) -> None:
        """nn.Linear's init for the effective W and b (Kaiming-uniform), stored divided by scale."""
        super().__init__(d_in, d_out, bias=bias, **factory)
        self.scale = scale
        self.init_effective(self.weight, self.bias)

    @torch.no_grad()
    def init_effective(self, weight: Tensor | None = None, bias: Tensor | None = None) -> None:
        """Set the effective weight and/or bias (what the layer computes with): stored / scale."""
        for param, value in ((self.weight, weight), (self.bias, bias)):
            if value is not None:
                param.copy_(value / self.scale)

    def effective_weight(self) -> Tensor:
        """W (d_out, d_in): the weight the layer computes with, scale times the stored one."""
        return self.scaled(self.weight)

    def effective_bias(self) -> Tensor | None:
        return None if self.bias is None else self.scaled(self.bias)

    def scaled(self, t: Tensor) -> Tensor:
        """scale * t (t itself at scale 1, e.g. for an adapter saved before the scale existed)."""
        return t if self.scale == 1 else t * self.scale

    def from_product(self, product: Tensor) -> Tensor:
        """W x + b given product = x @ weight.t() with the *stored* weight (a caller may compute it
        in a GEMM of its own, as MoLoRALinear does with the experts' A)."""
        return self.scaled(product if self.bias is None else product + self.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.scaled(F.linear(x, self.weight, self.bias))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scale={self.scale:g}"


class Router(ScaledLinear):
    """The gate W_g: d_in -> E. Subclasses define `route` (x -> Routing) and which losses apply."""

    def __init__(self, d_in: int, cfg: LMoEConfig, **factory) -> None:
        super().__init__(d_in, cfg.num_experts, cfg.router_bias, cfg.router_param_scale, **factory)
        self.temperature = cfg.temperature
        if cfg.router_init_std is not None:  # the effective W_g, drawn as nn.init.normal_ draws
            self.init_effective(torch.empty_like(self.weight).normal_(std=cfg.router_init_std))

    def logits(self, x: Tensor, wx: Tensor | None = None) -> Tensor:
        """u = W_g x (+ b_g) in float32, x: (tokens, d_in) -> (tokens, E). wx: x @ weight.t(), the
        stored weight's product, when the caller has it already (MoLoRALinear computes it in the
        same GEMM as the experts' A x)."""
        product = F.linear(x, self.weight) if wx is None else wx
        return self.from_product(at_least_float32(product))

    def route(self, x: Tensor, wx: Tensor | None = None, *projected: Tensor) -> Routing:
        """Routing for the tokens x (tokens, d_in); wx as in logits; projected: the products of x
        with the extra weights x_weights gave, computed by the caller with wx."""
        raise NotImplementedError

    def x_weights(self, x: Tensor) -> list[Tensor]:
        """Every stored weight (out, d_in) whose product with x this router needs for these tokens:
        the gate's, and for LD-MoLE the lambda head's first linear's unless its result for x is
        cached. MoLoRALinear runs them all in one GEMM with the experts' A and passes the results
        to route, which scales them."""
        return [self.weight]

    def experts_per_token(self) -> int | None:
        """How many experts every token routes to, where the router fixes it (softmax: all E; top-k:
        k); None where the routing decides per token (dynamic). The layer's sparse path
        sizes its work by it."""
        return self.out_features

    def dispatch(self, r: Routing) -> Tensor:
        """(tokens, E) 0/1: the experts each token counts for in f_i of the balance loss."""
        return (r.weights > 0).to(r.weights.dtype)

    def token_losses(self, r: Routing) -> dict[str, Callable[[], Tensor]]:
        """Each mean-over-tokens loss as a thunk giving its per-token values (tokens,); unused
        ones cost nothing."""
        return {"z_loss": lambda: z_per_token(r.logits)}

    def aux_stats(self, r: Routing, names: Collection[str], mask: Tensor | None = None) -> AuxStats:
        """The sums the losses in `names` need, over the tokens where mask (tokens,) is true."""
        sums = {
            name: token_sum(term(), mask)
            for name, term in self.token_losses(r).items()
            if name in names
        }
        counts = token_count(r.logits, mask).view(1)
        if "load_balance" in names:
            sums["load_balance"] = token_sum(r.dense_probs(), mask)  # (E,)
            counts = torch.cat([counts, token_sum(self.dispatch(r), mask)])  # (1 + E,)
        return AuxStats(sums, counts.detach())

    def aux_losses(self, r: Routing, mask: Tensor | None = None) -> dict[str, Tensor]:
        """Every auxiliary loss this router defines, for one forward in one process (unweighted)."""
        return self.aux_stats(r, {"load_balance", *self.token_losses(r)}, mask).losses()


class SoftmaxRouter(Router):
    """Dense softmax gate (L-MoE). For load balance a token counts toward its top expert."""

    def route(self, x: Tensor, wx: Tensor | None = None, *projected: Tensor) -> Routing:
        u = self.logits(x, wx)
        g = softmax_route(u, self.temperature)
        return Routing(weights=g, logits=u, probs=g)

    def dispatch(self, r: Routing) -> Tensor:
        return F.one_hot(r.weights.argmax(-1), r.weights.shape[-1]).to(r.weights.dtype)


class KPerTokenRouter(Router):
    """A router that gives each token exactly cfg.top_k experts (top-k and ReMix)."""

    def __init__(self, d_in: int, cfg: LMoEConfig, **factory) -> None:
        super().__init__(d_in, cfg, **factory)
        self.top_k = cfg.top_k

    def experts_per_token(self) -> int | None:
        return self.top_k


class TopKRouter(KPerTokenRouter):
    """Top-k gate (MoLA / MixLoRA baseline); balance uses the full softmax as P."""

    def route(self, x: Tensor, wx: Tensor | None = None, *projected: Tensor) -> Routing:
        u = self.logits(x, wx)
        g, index, weights = topk_route_indexed(u, self.top_k, self.temperature)
        return Routing(
            weights=g,
            logits=u,
            probs=lambda: softmax_route(u, self.temperature),
            top_index=index,
            top_weights=weights,
        )


class RemixRouter(KPerTokenRouter):
    """ReMix (lmoe.remix): k experts per token, each at weight 1/k. In training they are drawn from
    softmax(u / T) without replacement, and the drawn set's log-probability (tokens,) goes in
    extras["log_prob"] for the RLOO estimator (where autograd is on); in evaluation the k largest
    logits. The weights are constants: no gradient reaches the gate through them."""

    def route(self, x: Tensor, wx: Tensor | None = None, *projected: Tensor) -> Routing:
        u = self.logits(x, wx)
        extras = {}
        if self.training:
            policy = scaled(u, self.temperature)
            index = draw_without_replacement(policy.detach(), self.top_k)
            if torch.is_grad_enabled():
                extras["log_prob"] = set_log_prob(policy, index)
        else:
            index = torch.topk(u, self.top_k, dim=-1).indices
        weights = u.new_full(index.shape, 1 / self.top_k).detach()  # (tokens, k)
        return Routing(
            weights=torch.zeros_like(u).scatter(-1, index, weights),
            logits=u,
            probs=lambda: softmax_route(u, self.temperature),
            extras=extras,
            top_index=index,
            top_weights=weights,
        )


class LambdaHead(nn.Module):
    """LD-MoLE's sparsity head: lambda(x) = logsigmoid(f(x)) + 1 - eps, with f =
    Linear -> ReLU -> Linear.

    lambda lies in (-inf, 1 - eps], so the projection is always defined (lambda < 1). Weights start
    Kaiming-uniform (nn.Linear's default), every bias at bias_init (the authors' LAMBDA_BIAS_INIT:
    lambda ~ -1.6 at first, i.e. dense routing that training and the sparsity loss make sparser).
    Both linears are ScaledLinear at `scale` (the config's router_param_scale): scaling only the
    last would leave the first learning at the experts' rate under Adam.
    """

    def __init__(
        self,
        d_in: int,
        hidden: int,
        eps: float,
        bias_init: float = LAMBDA_BIAS_INIT,
        scale: float = 1.0,
        **factory,
    ) -> None:
        super().__init__()
        self.eps = eps
        self.caching = (
            False  # reuse the last result for the very same input (see forward); inject turns it on
        )
        self._last = None  # (key, x, lambda) of the last call
        self.net = nn.Sequential(
            ScaledLinear(d_in, hidden, True, scale, **factory),
            nn.ReLU(),
            ScaledLinear(hidden, 1, True, scale, **factory),
        )
        for linear in (self.net[0], self.net[2]):
            linear.init_effective(bias=torch.full_like(linear.bias, bias_init))

    def forward(self, x: Tensor) -> Tensor:
        """x: (tokens, d_in) -> lambda (tokens, 1) in float32 (float64 stays float64).

        The head is shared and q/k/v (gate/up) read the very same input, so the last result is
        reused while x, the head's weights and the grad/autocast mode are unchanged. In a model it
        stays on between forwards, so that a gradient-checkpointed block re-run in backward makes
        the calls its forward made; inject's hooks clear it around each model forward, so nothing
        is held between steps.
        """
        lam = self.cached(x)
        return self.from_hidden(x, x @ self.net[0].weight.t()) if lam is None else lam

    def cached(self, x: Tensor) -> Tensor | None:
        """lambda of the last call, if it was for this very x (see forward); else None."""
        key = self._cache_key(x)
        return (
            self._last[2]
            if key is not None and self._last is not None and self._last[0] == key
            else None
        )

    def from_hidden(self, x: Tensor, hidden: Tensor) -> Tensor:
        """lambda(x) given hidden = x @ net[0].weight.t() (the first linear's stored weight, without
        its bias or scale), which a caller may compute in a GEMM of its own (MoLoRALinear does, with
        the experts' A); the result is kept as forward's."""
        f = self.net[2](torch.relu(self.net[0].from_product(hidden)))
        # 1 - lambda = eps - logsigmoid(f) = eps + softplus(-f): never below eps,
        # even in half precision
        lam = 1 - (self.eps + F.softplus(-at_least_float32(f)))
        key = self._cache_key(x)
        self._last = (
            None if key is None else (key, x, lam)
        )  # holding x keeps its memory from being reused
        return lam

    def clear_cache(self) -> None:
        self._last = None

    def _cache_key(self, x: Tensor) -> tuple | None:
        if not self.caching or torch.compiler.is_compiling():
            return None
        return (
            x.data_ptr(),
            x.shape,
            x.stride(),
            x.dtype,
            x.device,
            x._version,
            torch.is_grad_enabled(),
            torch.is_autocast_enabled(x.device.type),
            tuple(p._version for p in self.parameters()),
        )

    def __getstate__(self) -> dict:
        return {
            **super().__getstate__(),
            "_last": None,
        }  # a cached graph tensor cannot be copied or pickled


def lambda_head_for(
    d_in: int, cfg: LMoEConfig, shared: dict[int, LambdaHead] | None, **factory
) -> LambdaHead:
    """The lambda head for a router of input width d_in: from `shared` (one per width, made on first
    use) as LD-MoLE shares it across layers and projections, or a private one when shared is None.
    Its width: cfg.lambda_hidden, or when unset (inject sets it for a whole model)
    default_lambda_hidden(d_in)."""
    if shared is not None and d_in in shared:
        return shared[d_in]
    head = LambdaHead(
        d_in,
        cfg.lambda_hidden or default_lambda_hidden(d_in),
        cfg.lambda_eps,
        cfg.lambda_bias_init,
        cfg.router_param_scale,
        **factory,
    )
    if shared is not None:
        shared[d_in] = head
    return head


class DynamicRouter(Router):
    """LD-MoLE: g = sparsegen_route(u, lambda(x)), lambda per token and per
    layer from a shared head.

    Each token gets its own number of experts (at least one). Balance counts a token for every
    expert with g_i > 0 and uses P = g, as the authors' code does; "sparsity" is sparsity_loss.
    """

    def __init__(
        self,
        d_in: int,
        cfg: LMoEConfig,
        lambda_heads: dict[int, LambdaHead] | None = None,
        **factory,
    ) -> None:
        super().__init__(d_in, cfg, **factory)
        self.sparsity_target = cfg.sparsity_target
        self.lambda_head = lambda_head_for(d_in, cfg, lambda_heads, **factory)

    def route(self, x: Tensor, wx: Tensor | None = None, *projected: Tensor) -> Routing:
        u = self.logits(x, wx)
        lam = self.lambda_head.from_hidden(x, projected[0]) if projected else self.lambda_head(x)
        g = sparsegen_route(u, lam)
        return Routing(weights=g, logits=u, probs=g, extras={"lambda": lam})

    def experts_per_token(self) -> int | None:
        return None

    def x_weights(self, x: Tensor) -> list[Tensor]:
        head = self.lambda_head
        return [self.weight] + ([] if head.cached(x) is not None else [head.net[0].weight])

    def token_losses(self, r: Routing) -> dict[str, Callable[[], Tensor]]:
        return {
            **super().token_losses(r),
            "sparsity": lambda: sparsity_per_token(
                r.logits, r.extras["lambda"], self.sparsity_target
            ),
        }


ROUTER_CLASSES = {
    "softmax": SoftmaxRouter,
    "topk": TopKRouter,
    "dynamic": DynamicRouter,
    "remix": RemixRouter,
}


def build_router(
    d_in: int, cfg: LMoEConfig, lambda_heads: dict[int, LambdaHead] | None = None, **factory
) -> Router:
    """The router named by cfg.router for inputs of width d_in.

    lambda_heads: the dynamic router's shared lambda heads, one per input width (see
    lambda_head_for); inject passes one dict for the whole model. Other routers ignore it.
    """
    if cfg.router == "dynamic":
        return DynamicRouter(d_in, cfg, lambda_heads, **factory)
    return ROUTER_CLASSES[cfg.router](d_in, cfg, **factory)
