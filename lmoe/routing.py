"""Routing: turn a token's layer input x into expert weights g on the simplex, plus the auxiliary losses.

A router is the lightweight gate `u = W_g x (+ b_g)` (it *is* an `nn.Linear`, so `router.weight` is
W_g) followed by a routing function `g = route(u)`. All routing maths runs in float32 (or float64)
whatever the model dtype; nothing here knows about models or training.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import LMoEConfig


@dataclass
class Routing:
    """What a router produced for a flat batch of tokens; every tensor is float32, shape (tokens, E)."""

    weights: Tensor  # g: non-negative, rows sum to 1
    logits: Tensor  # u
    probs: Tensor  # dense router probabilities used by the load-balance loss
    extras: dict[str, Tensor] = field(default_factory=dict)  # per-router values (e.g. lambda)


# ---------------------------------------------------------------- routing functions (pure maths)

def at_least_float32(t: Tensor) -> Tensor:
    """Routing maths runs in float32 for half-precision models (float64 stays float64)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def softmax_route(u: Tensor, temperature: float = 1.0) -> Tensor:
    """Dense L-MoE gate: g = softmax(u / T)."""
    return torch.softmax(u / temperature, dim=-1)


def topk_route(u: Tensor, k: int, temperature: float = 1.0) -> Tensor:
    """Keep the k largest logits, softmax over them, exact zeros elsewhere."""
    top, index = torch.topk(u, k, dim=-1)
    return torch.zeros_like(u).scatter(-1, index, torch.softmax(top / temperature, dim=-1))


def sparsemax(v: Tensor) -> Tensor:
    """Euclidean projection of each row of v onto the simplex (Martins & Astudillo, 2016).

    Closed form: sort, find the support size k = max{k : 1 + k v_(k) > sum_{j<=k} v_(j)},
    threshold tau = (sum of the k largest - 1) / k, g = max(v - tau, 0). Autograd through this
    formula gives the exact sparsemax Jacobian; at least one entry is always non-zero.
    """
    sorted_v, _ = torch.sort(v, dim=-1, descending=True)
    cumsum = sorted_v.cumsum(dim=-1)
    ks = torch.arange(1, v.shape[-1] + 1, device=v.device, dtype=v.dtype)
    support = (1 + ks * sorted_v > cumsum).sum(dim=-1, keepdim=True)  # (tokens, 1), >= 1
    tau = (cumsum.gather(-1, support - 1) - 1) / support.to(v.dtype)
    return torch.clamp(v - tau, min=0)


def sparsegen_route(u: Tensor, lam: Tensor) -> Tensor:
    """Sparsegen-lin: argmin_{p in simplex} ||p - u||^2 - lam ||p||^2 = sparsemax(u / (1 - lam)), lam < 1.

    lam: (tokens, 1). lam -> -inf gives uniform weights, lam -> 1 gives one-hot.
    """
    return sparsemax(u / (1 - lam))


# ---------------------------------------------------------------- auxiliary losses

def load_balance_loss(dispatch: Tensor, probs: Tensor) -> Tensor:
    """Switch-Transformer balance loss E * sum_i f_i P_i.

    dispatch: (tokens, E) 0/1 mask of where tokens went; f_i is expert i's share of all dispatches.
    probs: (tokens, E) router probabilities; P_i is their mean. Equals 1 when perfectly balanced.
    """
    f = dispatch.sum(0) / dispatch.sum().clamp(min=1)
    return probs.shape[-1] * (f * probs.mean(0)).sum()


def z_loss(u: Tensor) -> Tensor:
    """Router z-loss (ST-MoE): mean of logsumexp(u)^2, keeps logits small."""
    return torch.logsumexp(u, dim=-1).square().mean()


# ---------------------------------------------------------------- routers

class Router(nn.Linear):
    """The gate W_g: d_in -> E. Subclasses define `route` (x -> Routing) and which losses apply."""

    def __init__(self, d_in: int, cfg: LMoEConfig, **factory) -> None:
        super().__init__(d_in, cfg.num_experts, bias=cfg.router_bias, **factory)
        self.temperature = cfg.temperature

    def logits(self, x: Tensor) -> Tensor:
        """u = W_g x (+ b_g) in float32, x: (tokens, d_in) -> (tokens, E)."""
        return at_least_float32(super().forward(x))

    def route(self, x: Tensor) -> Routing:
        raise NotImplementedError

    def aux_losses(self, r: Routing) -> dict[str, Tensor]:
        """Unweighted auxiliary losses of one forward; the layer's config weights them."""
        dispatch = (r.weights > 0).float()
        return {"load_balance": load_balance_loss(dispatch, r.probs), "z_loss": z_loss(r.logits)}


class SoftmaxRouter(Router):
    """Dense softmax gate (L-MoE). For load balance a token counts toward its top expert."""

    def route(self, x: Tensor) -> Routing:
        u = self.logits(x)
        g = softmax_route(u, self.temperature)
        return Routing(weights=g, logits=u, probs=g)

    def aux_losses(self, r: Routing) -> dict[str, Tensor]:
        top = F.one_hot(r.weights.argmax(-1), r.weights.shape[-1]).float()
        return {"load_balance": load_balance_loss(top, r.probs), "z_loss": z_loss(r.logits)}


class TopKRouter(Router):
    """Top-k gate (MoLA / MixLoRA baseline); balance uses the full softmax as P."""

    def __init__(self, d_in: int, cfg: LMoEConfig, **factory) -> None:
        super().__init__(d_in, cfg, **factory)
        self.top_k = cfg.top_k

    def route(self, x: Tensor) -> Routing:
        u = self.logits(x)
        g = topk_route(u, self.top_k, self.temperature)
        return Routing(weights=g, logits=u, probs=softmax_route(u, self.temperature))


class DynamicRouter(Router):
    """LD-MoLE-style dynamic routing: g = sparsemax(u / (1 - lambda(x))), lambda from a small head.

    Each token gets its own number of experts (at least one).
    """

    def __init__(self, d_in: int, cfg: LMoEConfig, **factory) -> None:
        super().__init__(d_in, cfg, **factory)
        self.lambda_head = nn.Sequential(
            nn.Linear(d_in, cfg.lambda_hidden, **factory), nn.ReLU(), nn.Linear(cfg.lambda_hidden, 1, **factory))
        nn.init.zeros_(self.lambda_head[2].weight)
        nn.init.zeros_(self.lambda_head[2].bias)

    def lam(self, x: Tensor) -> Tensor:
        """lambda(x) in (-inf, 1): 1 - softplus keeps it below one; starts at 1 - log 2 ~ 0.31."""
        return 1 - F.softplus(at_least_float32(self.lambda_head(x)))

    def route(self, x: Tensor) -> Routing:
        u = self.logits(x)
        lam = self.lam(x)
        g = sparsegen_route(u, lam)
        return Routing(weights=g, logits=u, probs=g, extras={"lambda": lam})


ROUTER_CLASSES = {"softmax": SoftmaxRouter, "topk": TopKRouter, "dynamic": DynamicRouter}


def build_router(d_in: int, cfg: LMoEConfig, **factory) -> Router:
    """The router named by cfg.router for inputs of width d_in."""
    return ROUTER_CLASSES[cfg.router](d_in, cfg, **factory)
