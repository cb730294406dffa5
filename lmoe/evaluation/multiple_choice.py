"""Multiple-choice accuracy by protocol (letter: the option letters' log-probabilities; cloze:
each choice's log-likelihood, as lm-eval), each result named by its protocol and template, and the
warning where letter scores at chance while cloze does not."""

from __future__ import annotations

import logging
import math

from torch import nn

from ..data.choices import MultipleChoice, answers, requests
from .logprobs import continuation_logprobs

log = logging.getLogger(__name__)

# The letter protocol is "at chance" where a one-sided binomial test cannot tell it from guessing at
# this level, and cloze "clearly above" where the same test puts it above guessing at this one
# (multiple_choice's warning).
LETTER_AT_CHANCE = 0.05
CLOZE_ABOVE_CHANCE = 0.001


def multiple_choice(
    model: nn.Module,
    tokenizer,
    records: list[dict],
    fmt: MultipleChoice | None = None,
    max_length: int = 512,
    progress: bool = True,
    name: str = "multiple choice",
) -> dict:
    """Accuracy on question records by each protocol fmt scores (auto: letter and cloze), each
    result named by its protocol and template: {"n", "chance", "letter/chat": {"protocol",
    "template", "acc"}, "cloze/chat": {..., "acc_norm"}}. chance: the mean of 1 / number of choices,
    what guessing scores. name: what the progress lines call the questions (a file or task)."""
    fmt = fmt or MultipleChoice()
    result = {
        "n": len(records),
        "chance": sum(1 / len(r["choices"]) for r in records) / len(records),
    }
    for one in fmt.scored():
        result[one.key] = _accuracy(model, tokenizer, records, one, max_length, progress, name)
    return result


def _accuracy(
    model: nn.Module,
    tokenizer,
    records: list[dict],
    fmt: MultipleChoice,
    max_length: int,
    progress: bool,
    name: str,
) -> dict:
    """One protocol: letter (acc: the most likely option letter), or cloze (acc: highest summed
    log-likelihood of the choice text; acc_norm: per character of the choice, as lm-eval)."""
    hits = choice_hits(model, tokenizer, records, fmt, max_length, progress, name)
    acc, acc_norm = (sum(h[key] for h in hits) / len(records) for key in ("acc", "acc_norm"))
    result = {"protocol": fmt.protocol, "template": fmt.template, "acc": acc}
    return result if fmt.protocol == "letter" else {**result, "acc_norm": acc_norm}


def choice_hits(
    model: nn.Module,
    tokenizer,
    records: list[dict],
    fmt: MultipleChoice,
    max_length: int,
    progress: bool = True,
    name: str = "multiple choice",
) -> list[dict[str, bool]]:
    """Per question, in order, under one protocol (fmt.protocol letter or cloze): {"acc": the
    highest-scored choice is the gold one, "acc_norm": the same per character of the choice}."""
    scores = continuation_logprobs(
        model,
        requests(tokenizer, records, fmt, max_length),
        tokenizer.pad_token_id,
        progress=progress,
        desc=f"{name} {fmt.key}",
    )
    hits = []
    for record, mine in zip(records, scores, strict=True):
        chars = [max(len(text), 1) for text in answers(record, fmt)]
        best = max(range(len(mine)), key=mine.__getitem__)
        best_norm = max(range(len(mine)), key=lambda i: mine[i] / chars[i])
        hits.append({"acc": best == record["gold"], "acc_norm": best_norm == record["gold"]})
    return hits


def binomial_tail(hits: int, n: int, p: float) -> float:
    """P(X >= hits) for X ~ Binomial(n, p), 0 < p < 1: how likely guessing gets at least
    `hits` of n right."""
    if hits <= 0:
        return 1.0
    terms = [
        math.lgamma(n + 1)
        - math.lgamma(k + 1)
        - math.lgamma(n - k + 1)
        + k * math.log(p)
        + (n - k) * math.log1p(-p)
        for k in range(hits, n + 1)
    ]  # log P(X = k), summed in log space
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


def letter_at_chance(scored: dict) -> str | None:
    """What to warn of (e.g. "letter 0.248, cloze 0.630 (chance 0.250, n=500)") when
    multiple_choice's letter accuracy is not above chance (one-sided binomial test against the mean
    chance, p > LETTER_AT_CHANCE) while cloze's clearly is (p < CLOZE_ABOVE_CHANCE); else None."""
    by = {r["protocol"]: r["acc"] for r in scored.values() if isinstance(r, dict)}
    if not {"letter", "cloze"} <= by.keys():
        return None
    n, chance = scored["n"], scored["chance"]
    p = {protocol: binomial_tail(round(acc * n), n, chance) for protocol, acc in by.items()}
    if p["letter"] > LETTER_AT_CHANCE and p["cloze"] < CLOZE_ABOVE_CHANCE:
        return f"letter {by['letter']:.3f}, cloze {by['cloze']:.3f} (chance {chance:.3f}, n={n})"
    return None


def warn_letter_at_chance(sources: dict[str, dict]) -> None:
    """One warning line naming every source (name -> multiple_choice's result) where
    letter_at_chance holds."""
    found = [
        f"{name}: {line}" for name, scored in sources.items() if (line := letter_at_chance(scored))
    ]
    if found:
        log.warning(
            "lmoe: the letter protocol scores at chance where cloze does not (%s): the model does "
            "not answer with option letters, so its letter rows say nothing of what it knows; "
            "read the cloze rows, or train on letter targets (mc.protocol=letter) to teach it the "
            "letters.",
            "; ".join(found),
        )
