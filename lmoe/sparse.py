"""When the sparse kernels pay: the rule lmoe.execution=auto follows (lmoe/kernels/ runs them).

The dense kernel runs all E experts for every token as one rank-E*r LoRA; the sparse ones compute
only the (token, expert) pairs a token routes to (g > 0): grouped by expert for many tokens (the
grouped GEMMs, or on the CPU in float32/64 the CSR products), each token's own experts gathered for
few (generation). prefer_sparse weighs their costs, in units of one rank of one token's dense LoRA.
"""

from __future__ import annotations

import torch
from torch import Tensor

# The auto rule's constants, fitted to bench/bench_sparse.py (d = 576, 1 CPU thread;
# bench/RESULTS.md, "Sparse routing: cost as the number of experts grows"), in units of one rank of
# one token's dense LoRA (2 d multiply-adds each way): a pair's row gathered and scattered costs
# PAIR_COST more than its r ranks, an expert's group GROUP_COST; gathering each token's own experts
# pays once the dense bank has GATHER_MIN_RANK ranks.
PAIR_COST, GROUP_COST, GATHER_MIN_RANK = 64, 512, 512
# the CSR kernel's products make no call per expert: refitted to bench/bench_sparse.py at d = 576,
# E 8-64, r 8, k 2, 16-1024 tokens (bench/results/sparse_rule_fit.txt): the same pair cost, an
# expert's share 32
CSR_GROUP_COST = 32


def group_cost(csr: bool) -> int:
    """prefer_sparse's cost of an expert's group for the kernel that runs: CSR products or grouped
    GEMMs."""
    return CSR_GROUP_COST if csr else GROUP_COST


# prefer_sparse is false whenever E * r is at most this: grouping needs E r > r + PAIR_COST
DENSE_UP_TO_RANK = PAIR_COST


def gathers(experts: int, active: float, tokens: int) -> bool:
    """Whether the sparse path gathers each token's experts (few tokens: at most a quarter as many
    pairs as experts) rather than grouping the pairs by expert; arguments as prefer_sparse's."""
    return 4 * tokens * active <= experts


def prefer_sparse(
    experts: int, rank: int, active: float, tokens: int, group_cost: int = GROUP_COST
) -> bool:
    """Whether the sparse path is the faster: the dense path costs tokens * E * r; grouping costs
    each pair r + PAIR_COST and each expert group_cost; gathering (gathers) pays from
    E * r = GATHER_MIN_RANK. At E = 4-8 experts of rank 4-8 it is always dense.

    Args:
        experts: E; rank: r.
        active: experts a token on average (top-k: k).
        tokens: the tokens of the forward.
        group_cost: an expert group's cost: GROUP_COST (grouped GEMMs) or CSR_GROUP_COST (the CSR
            kernel's products, no call per expert).

    Returns:
        True where the sparse kernels are expected to be faster.
    """
    if gathers(experts, active, tokens):
        return experts * rank >= GATHER_MIN_RANK
    return tokens * experts * rank > tokens * active * (rank + PAIR_COST) + experts * group_cost


def active_counts(g: Tensor) -> tuple[int, float]:
    """(the most experts any token routes to, the mean per token) for routing g (tokens, E): one
    host read."""
    per_token = (g > 0).sum(-1)
    most, total = torch.stack([per_token.max(), per_token.sum()]).tolist()
    return int(most), total / max(1, g.shape[0])
