"""Evaluation: answer perplexity, greedy exact match per skill, multiple-choice accuracy (letter and
cloze, lmoe.evaluation.multiple_choice), on files, benchmarks and the built-in mixture; the
side-by-side table and the JSON they are written to.

Every metric is computed from three primitives: the summed log-probability of the labelled tokens of
an Example (lmoe.evaluation.logprobs.answer_logprobs), that of continuations sharing one prefix's KV
cache (logprobs.continuation_logprobs), and greedy generation from chat prompts
(lmoe.evaluation.generation). Every long phase shows its progress on stderr
(lmoe.evaluation.progress).
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from ..data import benchmarks
from ..data.builtin import Mixture
from ..data.choices import MultipleChoice
from ..data.encoding import encode_all, render_prompt
from ..data.records import read_records
from ..io import atomic_write
from .generation import greedy_replies
from .logprobs import model_device, perplexity
from .multiple_choice import multiple_choice, warn_letter_at_chance

log = logging.getLogger(__name__)

# New tokens a greedy reply may run past its answer's length (a full stop, spaces, another casing).
EM_SLACK = 4
MAX_ANSWER_TOKENS = 32  # the default eval_max_answer_tokens: longer answers get perplexity only


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
            ).to(model_device(model))
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
            benchmarks.scored_questions(name, fmt.test_items),
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
