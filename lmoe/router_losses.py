"""The routers' auxiliary losses as pure maths: load balance, z-loss and LD-MoLE's analytical
sparsity loss, each a function of sums over tokens, so a mask can leave padding out and processes
can add their parts up (AuxStats). lmoe.routing's routers say which apply and what they read."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def sparsity_threshold(u: Tensor, k: int) -> Tensor:
    """The smallest lambda at which sparsegen_route(u, lambda) keeps at most k experts: (tokens, 1).

    From Proposition 1's support rule, k(u) <= k iff 1 - lam <= sum_{j<=k} (u_(j) - u_(k+1)), i.e.
    lam >= 1 - sum_{j<=k} (u_(j) - u_(k+1)). Needs k < E.
    """
    top = torch.topk(u, k + 1, dim=-1).values  # (tokens, k+1), descending
    return 1 - (top[:, :k] - top[:, k:]).sum(dim=-1, keepdim=True)


# ---------------------------------------------------------------- auxiliary losses
# Every loss is a function of sums over tokens (and a token count): sums add up over the parts of a
# batch, so a mask can leave padding out and processes holding parts of a batch can give the loss of
# the whole batch (AuxStats). mask: (tokens,) bool, true for the tokens that count; None: all count.


def token_sum(v: Tensor, mask: Tensor | None = None) -> Tensor:
    """Sum over the tokens (dim 0) of v (tokens, ...) where mask is true -> (...)."""
    if mask is None:
        return v.sum(0)
    return torch.where(mask.view(-1, *[1] * (v.dim() - 1)), v, 0).sum(
        0
    )  # where, not *: padding may be inf


def token_count(v: Tensor, mask: Tensor | None = None) -> Tensor:
    """How many tokens of v (tokens, ...) count, as a 0-dim tensor of v's dtype (no host sync)."""
    return v.new_full((), v.shape[0]) if mask is None else mask.sum().to(v.dtype)


def token_mean(v: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean over the tokens of v (tokens, ...) where mask is true (0 if none do)."""
    return token_sum(v, mask) / token_count(v, mask).clamp(min=1)


def balance_from_sums(dispatched: Tensor, prob_sum: Tensor, count: Tensor) -> Tensor:
    """E * sum_i f_i P_i from dispatches per expert (E,), router probabilities summed over tokens
    (E,) and the token count: f_i = dispatched_i / all dispatches, P_i = prob_sum_i / count."""
    f = dispatched / dispatched.sum().clamp(min=1)
    return prob_sum.shape[-1] * (f * prob_sum).sum() / count.clamp(min=1)


def load_balance_loss(dispatch: Tensor, probs: Tensor, mask: Tensor | None = None) -> Tensor:
    """Switch-Transformer balance loss E * sum_i f_i P_i.

    dispatch: (tokens, E) 0/1 mask of where tokens went; f_i is expert i's share of all dispatches.
    probs: (tokens, E) router probabilities; P_i is their mean. Equals 1 when perfectly balanced.
    """
    return balance_from_sums(
        token_sum(dispatch, mask), token_sum(probs, mask), token_count(probs, mask)
    )


def z_per_token(u: Tensor) -> Tensor:
    """logsumexp(u)^2 per token: u (tokens, E) -> (tokens,)."""
    return torch.logsumexp(u, dim=-1).square()


def z_loss(u: Tensor, mask: Tensor | None = None) -> Tensor:
    """Router z-loss (ST-MoE): mean of logsumexp(u)^2, keeps logits small."""
    return token_mean(z_per_token(u), mask)


def sparsity_per_token(u: Tensor, lam: Tensor, k: int) -> Tensor:
    """max(0, lambda_k(u) - lambda) per token (u detached): u (tokens, E), lam
    (tokens, 1) -> (tokens,).

    lambda_k(u) = sparsity_threshold(u, k) is the exact lambda above which a token keeps at most k
    experts, so this is zero once a token does. u is detached (the gate is not pushed; only the
    lambda head learns from it). All zeros when k >= E.
    """
    if k >= u.shape[-1]:
        return lam.new_zeros(lam.shape[0])
    return F.relu(sparsity_threshold(u.detach(), k) - lam).squeeze(-1)


def sparsity_loss(u: Tensor, lam: Tensor, k: int, mask: Tensor | None = None) -> Tensor:
    """LD-MoLE's analytical sparsity objective: the mean over tokens of sparsity_per_token."""
    return token_mean(sparsity_per_token(u, lam, k), mask)


@dataclass
class AuxStats:
    """One forward's auxiliary losses as sums over its tokens, which add up over processes.

    sums: loss name -> differentiable sum over tokens of its per-token value (load balance: of the
    router probabilities, (E,)). counts: no gradient; (1,) tokens, then (E,) dispatches per expert
    when load balance is wanted. After counts are summed over `ranks` processes, losses() gives each
    process the share whose average over processes (as DDP/FSDP average gradients) is the loss of
    all their tokens together, in value and gradient.
    """

    sums: dict[str, Tensor]
    counts: Tensor
    ranks: int = 1

    def losses(self) -> dict[str, Tensor]:
        """Each loss; with ranks R: R * (local sum) / (global count), for balance E * sum_i f_i P_i
        with the global f and R * (local probability sums) / (global count) as P."""
        n, dispatched = self.counts[0], self.counts[1:]
        return {
            name: self.ranks
            * (
                balance_from_sums(dispatched, total, n)
                if name == "load_balance"
                else total / n.clamp(min=1)
            )
            for name, total in self.sums.items()
        }
