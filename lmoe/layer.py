"""MoLoRALinear: a frozen linear layer plus a bank of E LoRA experts mixed per token by a router."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import LMoEConfig
from .routing import Routing, build_router


def linear_shape(base: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of an nn.Linear (or subclass, e.g. bitsandbytes) or a transformers GPT-2 Conv1D."""
    if isinstance(base, nn.Linear) or hasattr(base, "in_features"):
        return base.in_features, base.out_features
    if type(base).__name__ == "Conv1D":  # weight is (d_in, d_out); y = x @ W + b
        return base.weight.shape[0], base.weight.shape[1]
    raise TypeError(f"MoLoRALinear wraps nn.Linear or transformers' Conv1D, not {type(base).__name__}.")


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ in ("Conv1D", "Linear8bitLt", "Linear4bit")


class MoLoRALinear(nn.Module):
    """y = W0 x + s * Delta(x), Delta mixing E LoRA experts with per-token router weights g(x).

    composition "params" (L-MoE): Delta = B(x) A(x) x with A(x) = sum g_i A_i, B(x) = sum g_i B_i.
    composition "outputs" (MoLoRA): Delta = sum g_i B_i A_i x.
    Both run as the two GEMMs of one rank-E*r LoRA on the stacked experts, plus the router.
    """

    def __init__(self, base: nn.Module, cfg: LMoEConfig) -> None:
        super().__init__()
        self.base = base
        self.in_features, self.out_features = linear_shape(base)
        self.num_experts, self.rank = cfg.num_experts, cfg.rank
        self.scaling = cfg.scaling
        self.composition = cfg.composition
        weight = base.weight
        factory = {"device": weight.device,
                   "dtype": weight.dtype if weight.dtype.is_floating_point else torch.float32}
        self.lora_A = nn.Parameter(torch.empty(self.num_experts, self.rank, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(self.num_experts, self.out_features, self.rank, **factory))
        self.router = build_router(self.in_features, cfg, **factory)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.reset_experts()
        self.last_aux: dict[str, Tensor] | None = None  # losses of the last training forward
        self.recorder: list[Tensor] | None = None  # set by record_routing

    def reset_experts(self) -> None:
        """LoRA init: each A_i Kaiming-uniform (independently drawn), B_i = 0, so Delta starts at 0."""
        for a in self.lora_A.data:  # init only, not a hot path
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def stacked(self) -> tuple[Tensor, Tensor]:
        """A as (E*r, d_in) and B as (d_out, E*r): the experts laid side by side as one LoRA."""
        A = self.lora_A.reshape(self.num_experts * self.rank, self.in_features)
        B = self.lora_B.permute(1, 0, 2).reshape(self.out_features, self.num_experts * self.rank)
        return A, B

    def mix(self, h: Tensor, g: Tensor) -> Tensor:
        """Compose per-expert codes h = A x (tokens, E, r) with weights g (tokens, E) -> (tokens, E*r).

        Multiplying the result by the stacked B gives s * Delta; the LoRA scale s is applied here once.
        """
        g = g.unsqueeze(-1)  # (tokens, E, 1)
        if self.composition == "params":
            h = (g * h).sum(1, keepdim=True)  # (tokens, 1, r): z = A(x) x = sum_i g_i A_i x
        return (self.scaling * g * h).flatten(1)  # block j: s g_j z (params) or s g_j A_j x (outputs)

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # (tokens, d_in)
        routing = self.router.route(x2)
        self._observe(routing)
        A, B = self.stacked()
        h = F.linear(self.dropout(x2), A).view(-1, self.num_experts, self.rank)  # (tokens, E, r)
        delta = F.linear(self.mix(h, routing.weights.to(h.dtype)), B)  # (tokens, d_out)
        return y + delta.view(*lead, self.out_features).to(y.dtype)

    def _observe(self, routing: Routing) -> None:
        """Keep what aux_loss and record_routing need; only the last forward, so nothing accumulates."""
        if self.training:
            self.last_aux = self.router.aux_losses(routing)
        if self.recorder is not None:
            self.recorder.append(routing.weights.detach())

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
