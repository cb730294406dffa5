"""Evaluation: answer perplexity, greedy exact match per skill, multiple-choice accuracy (letter and
cloze; every accuracy named by its protocol and template, with a warning where letter is at
chance and cloze is not).

Every metric is computed from three primitives: the summed log-probability of the labelled tokens of
an Example (answer_logprobs), that of continuations sharing one prefix's KV cache
(continuation_logprobs), and greedy generation from chat prompts (lmoe.evaluation.generation). Every
long phase shows its progress on stderr (lmoe.evaluation.progress).
"""

from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..data import benchmarks
from ..data.builtin import Mixture
from ..data.choices import MultipleChoice, answers, requests
from ..data.encoding import IGNORE, Example, collate, encode_all, render_prompt
from ..data.records import read_records
from ..io import atomic_write
from .generation import cache_argument, greedy_replies, left_padded, logits_to_keep, output_cache
from .progress import phase

log = logging.getLogger(__name__)

# The letter protocol is "at chance" where a one-sided binomial test cannot tell it from guessing at
# this level, and cloze "clearly above" where the same test puts it above guessing at this one
# (multiple_choice's warning).
LETTER_AT_CHANCE = 0.05
CLOZE_ABOVE_CHANCE = 0.001
# New tokens a greedy reply may run past its answer's length (a full stop, spaces, another casing).
EM_SLACK = 4
MAX_ANSWER_TOKENS = 32  # the default eval_max_answer_tokens: longer answers get perplexity only


def _device(model: nn.Module) -> torch.device:
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
    batch = {k: v.to(_device(model)) for k, v in collate(examples, pad_id, left).items()}
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


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer,
    prompts: list[str | list[dict]],
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 32,
) -> list[str]:
    """Replies to chat prompts (a user message string or a list of messages), greedy
    unless do_sample."""
    model.eval()
    texts = [
        render_prompt(tokenizer, [{"role": "user", "content": p}] if isinstance(p, str) else p)
        for p in prompts
    ]
    side, tokenizer.padding_side = (
        tokenizer.padding_side,
        "left",
    )  # left padding so replies start together
    sampling = (
        {"do_sample": True, "temperature": temperature, "top_p": top_p}
        if do_sample
        else {"do_sample": False}
    )
    replies = []
    try:
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(
                texts[start : start + batch_size],
                return_tensors="pt",
                padding=True,
                add_special_tokens=False,
            ).to(_device(model))
            out = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                **sampling,
            )
            replies += tokenizer.batch_decode(
                out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True
            )
    finally:
        tokenizer.padding_side = side
    return [r.strip() for r in replies]


def normalise(answer: str) -> str:
    """Case, surrounding space and a final full stop do not count against an exact answer."""
    return answer.strip().rstrip(".").strip().lower()


def answer_tokens(tokenizer, answer: str) -> int:
    return len(tokenizer(answer, add_special_tokens=False)["input_ids"])


def exact_match(
    model: nn.Module, tokenizer, records: list[dict], batch_size: int = 64
) -> dict[str, float]:
    """domain -> fraction of records whose greedy reply to record["messages"][:-1] equals
    record["answer"] (after normalise); a reply stops at its end of turn or EM_SLACK tokens past
    its answer's length."""
    hits, totals = defaultdict(int), defaultdict(int)
    for record, hit in zip(records, exact_hits(model, tokenizer, records, batch_size), strict=True):
        hits[record["domain"]] += hit
        totals[record["domain"]] += 1
    return {domain: hits[domain] / totals[domain] for domain in totals}


def exact_hits(
    model: nn.Module, tokenizer, records: list[dict], batch_size: int = 64
) -> list[bool]:
    """Per record, in order: whether exact_match counts its greedy reply as its answer (what lmoe
    compare pairs item by item)."""
    prompts = [r["messages"][:-1] for r in records]
    budgets = [answer_tokens(tokenizer, r["answer"]) + EM_SLACK for r in records]
    replies = greedy_replies(model, tokenizer, prompts, budgets, batch_size)
    return [
        normalise(reply) == normalise(r["answer"])
        for r, reply in zip(records, replies, strict=True)
    ]


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
    device = _device(model)
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


def evaluate_mixture(model: nn.Module, tokenizer, mixture: Mixture, max_length: int = 256) -> dict:
    """Held-out metrics of the built-in mixture: exact match per skill, answer
    perplexity per domain."""
    results = {}
    if mixture.skills:
        results["exact_match"] = exact_match(model, tokenizer, mixture.skill_items("test"))
    if mixture.domains:
        held_out = encode_all(tokenizer, mixture.conversations("test"), max_length)
        results["perplexity"] = perplexity(model, held_out, tokenizer.pad_token_id)
    return results


def evaluate_file(
    model: nn.Module,
    tokenizer,
    path: str | Path,
    max_length: int = 512,
    fmt: MultipleChoice | None = None,
    group: str | None = None,
    max_answer_tokens: int = MAX_ANSWER_TOKENS,
) -> dict:
    """Multiple-choice accuracy if the records are questions ({"question", "choices", "answer"});
    otherwise greedy exact match (chat records with answers of at most max_answer_tokens tokens;
    0: none) and answer perplexity, per group: the rows' value of the key `group`, else their
    "domain", else the file name.

    Args:
        fmt: how multiple-choice questions are scored (default: both protocols, chat template).
        group: the key whose value groups the rows (each row must have it); None: "domain".
        max_answer_tokens: longer answers get perplexity only (one warning line says how many).
    """
    records = read_records(path, group=group)
    questions = [r for r in records if "choices" in r]
    if questions and len(questions) < len(records):
        raise ValueError(
            f"{path} mixes multiple-choice questions with other records; put them in two files."
        )
    if questions:
        scored = multiple_choice(model, tokenizer, questions, fmt, max_length, name=Path(path).stem)
        warn_letter_at_chance({str(path): scored})
        return {"multiple_choice": scored}
    results = {}
    answered = answer_records(tokenizer, records, max_answer_tokens, path)
    if answered:
        results["exact_match"] = exact_match(model, tokenizer, answered)
    examples = encode_all(tokenizer, records, max_length)
    return results | {"perplexity": perplexity(model, examples, tokenizer.pad_token_id)}


def answer_records(
    tokenizer, records: list[dict], max_answer_tokens: int, path: str | Path
) -> list[dict]:
    """The chat records that end with the assistant's turn, as exact-match records (that turn is
    the answer), where it is at most max_answer_tokens tokens long; one warning line counts the
    longer ones."""
    if max_answer_tokens <= 0:
        return []
    answered = [
        {**r, "answer": r["messages"][-1]["content"]}
        for r in records
        if "messages" in r and r["messages"][-1]["role"] == "assistant"
    ]
    short = [r for r in answered if answer_tokens(tokenizer, r["answer"]) <= max_answer_tokens]
    if len(short) < len(answered):
        log.warning(
            "lmoe: %s: %d of %d answers are longer than %d tokens; they get perplexity "
            "only, no exact match (raise eval_max_answer_tokens, or lmoe eval's "
            "max_answer_tokens, to score them too).",
            path,
            len(answered) - len(short),
            len(answered),
            max_answer_tokens,
        )
    return short


def evaluate_benchmarks(
    model: nn.Module,
    tokenizer,
    names: list[str],
    fmt: MultipleChoice | None = None,
    max_length: int = 512,
) -> dict:
    """Accuracy on each benchmark's test split (fmt.test_items questions of it, 0: all),
    "bench:NAME": multiple_choice's result, and "bench:average": {protocol/template: the tasks'
    unweighted mean acc (and acc_norm), with its protocol and template}."""
    fmt = fmt or MultipleChoice()
    results = {
        benchmarks.PREFIX + name: multiple_choice(
            model,
            tokenizer,
            benchmarks.subset(benchmarks.load(name, "test"), fmt.test_items),
            fmt,
            max_length,
            name=benchmarks.PREFIX + name,
        )
        for name in names
    }
    warn_letter_at_chance(results)
    average = {}
    for key in (one.key for one in fmt.scored()):
        tasks = [task[key] for task in results.values()]
        average[key] = {
            **tasks[0],
            **{
                metric: sum(t[metric] for t in tasks) / len(tasks)
                for metric in ("acc", "acc_norm")
                if metric in tasks[0]
            },
        }
    return results | {benchmarks.PREFIX + "average": average}


def format_table(runs: dict[str, dict]) -> str:
    """Side-by-side table: one row per number in the runs' results, labelled by its keys (e.g.
    "perplexity german", "multiple_choice:mc letter/chat acc"), one column per run
    (e.g. base, trained)."""
    names = list(runs)
    rows = {}
    for name in names:
        for label, value in _numbers(runs[name]):
            rows.setdefault(label, {})[name] = value
    width = max([len(label) for label in rows] + [12])
    lines = [f"{'metric':<{width}}" + "".join(f"{n:>12}" for n in names)]
    for label, values in rows.items():
        cells = "".join(
            f"{'-':>12}"
            if n not in values
            else f"{values[n]:>12d}"
            if isinstance(values[n], int)
            else f"{values[n]:>12.3f}"
            for n in names
        )
        lines.append(f"{label:<{width}}" + cells)
    return "\n".join(lines)


def _numbers(results: dict, labels: tuple[str, ...] = ()):
    """(label, number) for every number in nested results; the names (protocol, template)
    are in the labels."""
    for key, value in results.items():
        if isinstance(value, dict):
            yield from _numbers(value, (*labels, key))
        elif not isinstance(value, str):
            yield " ".join((*labels, key)), value


def write_json(results: dict, path: str | Path) -> None:
    atomic_write(
        path, lambda tmp: Path(tmp).write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    )
