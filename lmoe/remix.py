"""ReMix (Qiu et al., ICLR 2026, arXiv 2603.10160): each token's layer input goes to k experts drawn
from the router's softmax without replacement, with equal weights 1/k, and the router learns by
REINFORCE leave-one-out (RLOO) with the training loss as the reward. docs/design.md section 3 gives
the maths and the choices the paper's text leaves open.

Pure maths first (the draw, the drawn set's log-probability, the RLOO advantages), then the two
steps inject's hooks run around a training forward: repeat every sequence M times (each copy draws
its own routing), then fold the M copies' outputs back into one batch, with a zero-valued surrogate
added to the loss whose gradient is the RLOO estimate for the routers. The experts get the gradient
of the mean of the M copies' losses (and the surrogate's, through the hidden states the later
routers read): any training loop that backpropagates the model's loss trains both.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE = -100  # the label of a position without loss (transformers' ignore_index)
# keyword arguments with a batch dimension that are not per sequence (the repeat leaves them)
NOT_PER_SEQUENCE = frozenset({"cache_position", "num_items_in_batch", "logits_to_keep"})
PACKED = ("cu_seq_lens_q", "cu_seq_lens_k")  # padding-free packing: rows are not sequences


def draw_without_replacement(u: Tensor, k: int) -> Tensor:
    """k distinct experts per token drawn from softmax(u) without replacement (one after the other,
    each from the softmax over the experts not drawn yet): the k largest of u + Gumbel noise, which
    draws exactly that (Gumbel-top-k). u: (tokens, E) -> (tokens, k) int64, in draw order."""
    gumbel = -torch.empty_like(u).exponential_().log()
    return torch.topk(u + gumbel, k, dim=-1).indices


def set_log_prob(u: Tensor, index: Tensor) -> Tensor:
    """log P(S) (tokens,) of drawing the set S = index (tokens, k), in any order, from softmax(u)
    without replacement: the log of the sum over the k! orders s of prod_i p_{s_i} / (mass left
    before draw i). The mass left is a logsumexp over the experts not drawn yet (the ones outside S
    and s_i..s_k), never 1 minus a sum: exact where a few experts hold almost all of it."""
    k = index.shape[-1]
    if k == u.shape[-1]:  # every expert: P = 1
        return u.new_zeros(u.shape[0])
    chosen = u.gather(-1, index)  # (tokens, k)
    outside = log_sum_exp(u.scatter(-1, index, float("-inf")))  # (tokens,)
    orders = torch.tensor(list(itertools.permutations(range(k))), device=u.device)  # (k!, k)
    drawn = chosen[:, orders]  # (tokens, k!, k)
    rest = outside[:, None, None].expand(-1, orders.shape[0], 1)
    left = torch.stack(
        [log_sum_exp(torch.cat([drawn[..., i:], rest], -1)) for i in range(k)], -1
    )  # (tokens, k!, k): log of the mass left before each draw
    return log_sum_exp((drawn - left).sum(-1))


def log_sum_exp(x: Tensor) -> Tensor:
    """torch.logsumexp(x, -1) in value and gradient, as plain ops: on the CPU many times faster over
    a last dimension of a few entries. -inf entries count as 0; a row needs one finite entry."""
    top = x.detach().amax(-1, keepdim=True)
    return (top + (x - top).exp().sum(-1, keepdim=True).log()).squeeze(-1)


def rloo_advantages(losses: Tensor) -> Tensor:
    """(sequences, M) losses of M drawn routings each -> each minus the mean of the other M - 1."""
    M = losses.shape[1]
    return losses - (losses.sum(1, keepdim=True) - losses) / (M - 1)


def rloo_terms(losses: Tensor, log_probs: Tensor) -> Tensor:
    """advantage * (log P - log P.detach()) (sequences, M): 0 in value; the gradient of their sum is
    M times the RLOO estimate of the gradient of sum_b E[L_b] (divide by M and by the loss's
    denominator to match a loss). losses, log_probs: (sequences, M); losses are detached."""
    return rloo_advantages(losses.detach()) * (log_probs - log_probs.detach())


def rloo_surrogate(losses: Tensor, log_probs: Tensor) -> Tensor:
    """The sum of rloo_terms: a scalar 0 whose gradient is M times the RLOO estimate."""
    return rloo_terms(losses, log_probs).sum()


# ---------------------------------------------------------------- around a training forward


def batch_size(args: tuple, kwargs: dict) -> int:
    """The number of sequences a model forward is called with."""
    for t in (kwargs.get("input_ids"), kwargs.get("inputs_embeds"), *args[:1]):
        if isinstance(t, Tensor):
            return t.shape[0]
    raise ValueError(
        "router='remix' in training needs the model called with input_ids or inputs_embeds."
    )


def repeat_inputs(args: tuple, kwargs: dict, samples: int) -> tuple[tuple, dict]:
    """The forward's arguments with every sequence repeated `samples` times in a row (sequence b's
    copies at rows b*M .. b*M + M-1), and num_items_in_batch times M: the model's loss is then the
    mean of the copies' losses, at the scale the caller asked for."""
    if any(kwargs.get(key) is not None for key in PACKED):
        raise ValueError(
            "router='remix' repeats each sequence of a training batch; padding-free packing "
            "(cu_seq_lens_*) puts several sequences in one row. Turn packing off."
        )
    if kwargs.get("past_key_values") is not None:
        raise ValueError("router='remix' trains without a KV cache: pass past_key_values=None.")
    B = batch_size(args, kwargs)

    def repeat(name: str, value):
        if name in NOT_PER_SEQUENCE or not isinstance(value, Tensor) or value.dim() == 0:
            return value
        return value.repeat_interleave(samples, dim=0) if value.shape[0] == B else value

    kwargs = {name: repeat(name, value) for name, value in kwargs.items()}
    if kwargs.get("num_items_in_batch") is not None:
        kwargs["num_items_in_batch"] = kwargs["num_items_in_batch"] * samples
    return tuple(repeat("", a) for a in args), kwargs


def token_losses(output, kwargs: dict, label_smoothing: float) -> tuple[Tensor, Tensor]:
    """(per-position training loss, whether it counts), both (rows, positions), without gradient:
    -log_probs where the output has them (TRL's fused head), else the next-token cross-entropy of
    the logits (label-smoothed as the model's loss is)."""
    if output.get("log_probs") is not None and output.get("label_mask") is not None:
        return -output["log_probs"].detach(), output["label_mask"].bool()
    labels = kwargs.get("shift_labels")
    if labels is None:
        labels = F.pad(kwargs["labels"], (0, 1), value=IGNORE)[..., 1:]  # tokens < n predict n
    logits = output["logits"].detach()
    if logits.shape[:2] != labels.shape:
        raise ValueError(
            f"router='remix' needs the logits of every position ({tuple(labels.shape)}), got "
            f"{tuple(logits.shape[:2])}: leave logits_to_keep unset in training."
        )
    with torch.no_grad():
        loss = F.cross_entropy(
            logits.flatten(0, 1).to(torch.promote_types(logits.dtype, torch.float32)),
            labels.flatten().to(logits.device),
            ignore_index=IGNORE,
            reduction="none",
            label_smoothing=label_smoothing,
        )
    return loss.view(labels.shape), labels.to(logits.device) != IGNORE


def sequence_log_probs(layer_log_probs: Iterable[Tensor], rows: int, mask: Tensor | None) -> Tensor:
    """log P of each row's whole routing (rows,): the layers' per-token log P(S) (tokens,) summed
    over the layers and the row's real tokens (mask (rows, positions): padding's routing changes no
    loss)."""
    total = 0
    for log_prob in layer_log_probs:
        per_row = log_prob.view(rows, -1)
        if mask is not None and mask.shape == per_row.shape:
            per_row = torch.where(mask.to(per_row.device) != 0, per_row, 0)
        total = total + per_row.sum(-1)
    if isinstance(total, int):
        raise ValueError("router='remix': no layer drew a routing in this training forward.")
    return total


def fold_outputs(
    output, kwargs: dict, layer_log_probs: list[Tensor], samples: int, label_smoothing: float
):
    """The output of a forward over the repeated batch, back at one row per sequence, with the RLOO
    surrogate in the loss.

    Args:
        output: the model's output (a dict-like ModelOutput) for the repeated batch.
        kwargs: the repeated forward's keyword arguments (repeat_inputs').
        layer_log_probs: each layer's log P of its drawn sets (tokens,), tokens in row order.
        samples: M.
        label_smoothing: the model loss's, so that the reward is the loss the experts descend.

    Returns:
        output, its loss plus surrogate / (the loss's denominator), or (TRL's fused head) its
        log_probs the mean over the copies, minus each sequence's surrogate spread over its label
        positions; every other per-row tensor at each sequence's first copy.
    """
    losses, counts = token_losses(output, kwargs, label_smoothing)
    rows = losses.shape[0]
    B = rows // samples
    log_probs = sequence_log_probs(layer_log_probs, rows, kwargs.get("attention_mask"))
    terms = rloo_terms(
        losses.sum(-1).view(B, samples), log_probs.view(B, samples).to(losses.device)
    )
    fused = output.get("log_probs") is not None and output.get("label_mask") is not None
    if not fused and output.get("loss") is None:
        raise ValueError("router='remix' needs the model's loss in a training forward with labels.")
    if fused:  # TRL: loss = -sum(log_probs) / its token count, over the B rows it gets
        mask = counts.view(B, samples, -1)[:, 0].to(output["log_probs"].dtype)
        per_token = terms.sum(1) / samples / mask.sum(-1).clamp(min=1)  # (B,)
        output["log_probs"] = output["log_probs"].unflatten(0, (B, samples)).mean(
            1
        ) - mask * per_token.unsqueeze(-1)
    if output.get("loss") is not None:
        items = kwargs.get("num_items_in_batch")
        denominator = (
            counts.sum() if items is None else torch.as_tensor(items, device=losses.device)
        )
        output["loss"] = output["loss"] + terms.sum() / denominator.to(losses.dtype).clamp(min=1)
    for name, value in list(output.items()):
        if name != "log_probs" or not fused:
            if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == rows:
                output[name] = value.unflatten(0, (B, samples))[:, 0]
    return output
