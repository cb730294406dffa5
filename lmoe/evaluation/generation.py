"""Greedy replies for exact match, batched: prompts of similar length share a left-padded batch,
each row stops at its end-of-turn token or at its own token budget, and a finished row leaves the
batch (its rows of the KV cache are dropped), so a batch costs what its longest live reply costs.

The replies are those of greedy decoding one prompt at a time (tests/evaluation: the same answers
as an unpadded, uncached argmax loop)."""

from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn

from ..data.encoding import render_prompt
from .progress import phase


@torch.no_grad()
def greedy_replies(
    model: nn.Module,
    tokenizer,
    prompts: list[list[dict]],
    budgets: list[int],
    batch_size: int = 64,
    show: bool = True,
    batch_tokens: int = 8192,
) -> list[str]:
    """The greedy reply to each chat prompt, of at most budgets[i] new tokens, stripped.

    Args:
        prompts: message lists; the reply continues each after the assistant header.
        budgets: new tokens allowed per prompt (a reply still going then stops there).
        batch_size: at most this many prompts per batch, taken in order of length ...
        show: progress on stderr (lmoe.evaluation.progress).
        batch_tokens: ... and at most this many prompt tokens, padding included.
    """
    model.eval()
    ids = [
        tokenizer(render_prompt(tokenizer, p), add_special_tokens=False)["input_ids"]
        for p in prompts
    ]
    batches: list[list[int]] = []
    for i in sorted(range(len(ids)), key=lambda i: (len(ids[i]), budgets[i])):
        width = len(ids[i])  # in this order, each prompt is the longest of its batch
        full = batches and (
            len(batches[-1]) == batch_size or (len(batches[-1]) + 1) * width > batch_tokens
        )
        if not batches or full:
            batches.append([])
        batches[-1].append(i)
    replies: list[list[int]] = [[] for _ in ids]
    with phase("exact match", len(ids), "prompt", show) as update:
        for rows in batches:
            new = _greedy_batch(
                model,
                [ids[i] for i in rows],
                [budgets[i] for i in rows],
                tokenizer.pad_token_id,
                tokenizer.eos_token_id,
            )
            for row, reply in zip(rows, new, strict=True):
                replies[row] = reply
            update(len(rows))
    return [text.strip() for text in tokenizer.batch_decode(replies, skip_special_tokens=True)]


def _greedy_batch(
    model: nn.Module, prompts: list[list[int]], budgets: list[int], pad_id: int, stop_id: int | None
) -> list[list[int]]:
    """New token ids per prompt (without the stop token): one forward of the left-padded prompts,
    then one token per step for the rows still live."""
    device = next(model.parameters()).device
    ids, mask = left_padded(prompts, pad_id, device)
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
        use_cache=True,
        **logits_to_keep(model, 1),
    )
    live = list(range(len(prompts)))  # the prompt of each row of the batch (and of the cache)
    replies: list[list[int]] = [[] for _ in prompts]
    while True:
        tokens = out.logits[:, -1].argmax(-1).tolist()
        going = []
        for slot, (row, token) in enumerate(zip(live, tokens, strict=True)):
            if token != stop_id:
                replies[row].append(token)
                if len(replies[row]) < budgets[row]:
                    going.append(slot)
        if not going:
            return replies
        cache = output_cache(out)
        if len(going) < len(live):  # finished rows leave the batch and the cache
            index = torch.tensor(going, device=device)
            cache.reorder_cache(index)
            mask, live, tokens = mask[index], [live[s] for s in going], [tokens[s] for s in going]
        mask = torch.cat([mask, mask.new_ones(len(live), 1)], 1)
        out = model(
            input_ids=torch.tensor(tokens, device=device)[:, None],
            attention_mask=mask,
            position_ids=mask.sum(-1, keepdim=True) - 1,
            use_cache=True,
            **{cache_argument(model): cache},
        )


def left_padded(
    sequences: list[list[int]], pad_id: int, device: torch.device
) -> tuple[Tensor, Tensor]:
    """input_ids and attention_mask (batch, longest), every sequence ending at the last position."""
    width = max(len(seq) for seq in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq) :], mask[row, width - len(seq) :] = torch.tensor(seq), 1
    return ids.to(device), mask.to(device)


def cache_argument(model: nn.Module) -> str:
    """The forward's KV-cache argument: "cache" in newer transformers, else "past_key_values"."""
    takes = inspect.signature(model.forward).parameters
    return "cache" if "cache" in takes else "past_key_values"


def output_cache(out):
    """The KV cache a forward returned, under either name."""
    return getattr(out, "cache", None) or out.past_key_values


def logits_to_keep(model: nn.Module, last: int) -> dict:
    """Forward arguments for the logits of the last `last` positions only, where the model takes
    them (the vocabulary projection of every other position is skipped); else none."""
    takes = inspect.signature(model.forward).parameters
    return {"logits_to_keep": last} if "logits_to_keep" in takes else {}
