"""Log-probabilities, the primitives every metric is computed from: the summed log-probability of
the labelled tokens of an Example (answer_logprobs, and perplexity from it), and that of
continuations sharing one prefix's KV cache (continuation_logprobs: multiple-choice questions)."""

from __future__ import annotations

import math
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import nn

from ..data.encoding import IGNORE, Example, collate
from .generation import cache_argument, left_padded, logits_to_keep, output_cache
from .progress import phase


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def answer_logprobs(
    model: nn.Module, examples: list[Example], pad_id: int, batch_size: int = 16, show: bool = False
) -> list[tuple[float, int]]:
    """(sum of log p(label token | prefix), number of label tokens) for each example, in order.

    Batches hold examples of similar length (little padding). Where the model takes logits_to_keep
    (a transformers causal LM) they are left-padded, so that every answer ends at the batch's last
    position, and the vocabulary projection runs from the batch's first answer token on only.
    show: progress on stderr."""
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    left = bool(logits_to_keep(model, 1))
    results: list[tuple[float, int]] = [(0.0, 0)] * len(examples)
    with phase("perplexity", len(examples), "example", show) as update:
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            scores = _logprob_batch(model, [examples[i] for i in rows], pad_id, left)
            for row, scored in zip(rows, scores, strict=True):
                results[row] = scored
            update(len(rows))
    return results


def _logprob_batch(
    model: nn.Module, examples: list[Example], pad_id: int, left: bool
) -> list[tuple[float, int]]:
    """answer_logprobs of one batch; log-softmax on the answer positions alone."""
    batch = {k: v.to(model_device(model)) for k, v in collate(examples, pad_id, left).items()}
    labels, mask, width = batch["labels"], batch["attention_mask"], batch["labels"].shape[1]
    keep, extra = width, {}
    if left:  # label t is predicted from the logits at t - 1
        answered = (labels[:, 1:] != IGNORE).any(0).nonzero()
        keep = width - int(answered[0]) if len(answered) else 1
        extra = {"position_ids": (mask.cumsum(-1) - 1).clamp(min=0), **logits_to_keep(model, keep)}
    logits = model(input_ids=batch["input_ids"], attention_mask=mask, **extra).logits
    targets = labels[:, width - keep + 1 :]  # (batch, keep - 1): what logits[:, :-1] predict
    # a sequence's first token is not predicted (in a left-padded row, padding comes before it)
    chosen = (targets != IGNORE) & mask[:, width - keep : -1].bool()
    rows = logits[:, :-1][chosen].float()  # (answer tokens, vocab)
    picked = rows.gather(-1, targets[chosen][:, None]).squeeze(-1) - rows.logsumexp(-1)
    sums = torch.zeros(len(examples), device=picked.device)
    sums.index_add_(0, chosen.nonzero()[:, 0], picked)
    return list(zip(sums.tolist(), chosen.sum(1).tolist(), strict=True))


def perplexity(
    model: nn.Module, examples: list[Example], pad_id: int, batch_size: int = 16
) -> dict[str, float]:
    """domain -> exp(mean negative log-likelihood per answer token) over that domain's examples."""
    nll, count = defaultdict(float), defaultdict(int)
    scores = answer_logprobs(model, examples, pad_id, batch_size, show=True)
    for ex, (logprob, n) in zip(examples, scores, strict=True):
        nll[ex.domain] -= logprob
        count[ex.domain] += n
    return {domain: math.exp(nll[domain] / count[domain]) for domain in nll if count[domain]}


def _takes_cache(model: nn.Module) -> bool:
    """A transformers causal LM (KV cache, position_ids); anything else is scored
    without prefix sharing."""
    return getattr(getattr(model, "config", None), "use_cache", None) is not None


def continuation_logprobs(
    model: nn.Module,
    requests: list[tuple[list[int], list[list[int]]]],
    pad_id: int,
    batch_tokens: int = 4096,
    progress: bool = True,
    desc: str = "score choices",
) -> list[list[float]]:
    """For each (prefix ids, [continuation ids, ...]): sum of log p(continuation |
    prefix), per continuation.

    Each prefix runs once and its KV cache serves all its continuations; requests are batched by
    prefix length, about batch_tokens (continuations x padded length) per batch. The same numbers as
    scoring every prefix + continuation on its own (answer_logprobs), which models
    without a cache get."""
    order = sorted(range(len(requests)), key=lambda i: (len(requests[i][0]), len(requests[i][1])))
    batches, batch = [], []
    for i in order:
        grown = batch + [i]
        width = len(requests[i][0]) + max(len(c) for j in grown for c in requests[j][1])
        if batch and sum(len(requests[j][1]) for j in grown) * width > batch_tokens:
            batches.append(batch)
            grown = [i]
        batch = grown
    batches += [batch] if batch else []
    score = _shared_batch if _takes_cache(model) else _unshared_batch
    results: list[list[float]] = [[] for _ in requests]
    model.eval()
    with phase(desc, sum(len(c) for _, c in requests), "choice", progress) as update:
        for batch in batches:
            for i, scores in zip(
                batch, score(model, [requests[i] for i in batch], pad_id), strict=True
            ):
                results[i] = scores
            update(sum(len(requests[i][1]) for i in batch))
    return results


def _unshared_batch(model: nn.Module, requests: list, pad_id: int) -> list[list[float]]:
    """The reference: every prefix + continuation as its own sequence."""
    examples = [
        Example(prefix + cont, [IGNORE] * len(prefix) + cont)
        for prefix, conts in requests
        for cont in conts
    ]
    flat = iter(lp for lp, _ in answer_logprobs(model, examples, pad_id, batch_size=len(examples)))
    return [[next(flat) for _ in conts] for _, conts in requests]


@torch.no_grad()
def _shared_batch(model: nn.Module, requests: list, pad_id: int) -> list[list[float]]:
    """Prefixes left-padded in one forward (last position's logits only), the cache repeated per
    continuation, then every continuation right-padded in one forward that attends to
    its prefix's cache."""
    device = model_device(model)
    ids, mask = left_padded([prefix for prefix, _ in requests], pad_id, device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions,
        use_cache=True,
        **logits_to_keep(model, 1),
    )
    first = F.log_softmax(
        out.logits[:, -1].float(), dim=-1
    )  # (questions, vocab): each continuation's first token
    owner = torch.tensor(
        [row for row, (_, conts) in enumerate(requests) for _ in conts], device=device
    )
    conts = [c for _, cs in requests for c in cs]
    logprob = first[owner, torch.tensor([c[0] for c in conts], device=device)]  # (continuations,)
    longest = max(len(c) for c in conts)
    if longest > 1:  # the letter protocol stops here: one forward per question
        cache = output_cache(out)
        cache.reorder_cache(owner)  # row i of the cache now belongs to continuation i
        tail = torch.full((len(conts), longest), pad_id, dtype=torch.long)
        tail_mask = torch.zeros_like(tail)
        for row, cont in enumerate(conts):
            tail[row, : len(cont)], tail_mask[row, : len(cont)] = torch.tensor(cont), 1
        tail, tail_mask = tail.to(device), tail_mask.to(device)
        logits = (
            model(
                input_ids=tail,
                attention_mask=torch.cat([mask[owner], tail_mask], 1),
                **{cache_argument(model): cache},
                position_ids=mask.sum(-1)[owner, None] + torch.arange(longest, device=device),
                use_cache=True,
            )
            .logits[:, :-1]
            .float()
        )  # (continuations, longest-1, vocab)
        picked = logits.gather(-1, tail[:, 1:, None]).squeeze(-1) - logits.logsumexp(-1)
        logprob = logprob + (picked * tail_mask[:, 1:]).sum(-1)
    flat = iter(logprob.tolist())
    return [[next(flat) for _ in cs] for _, cs in requests]
