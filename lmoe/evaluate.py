"""Evaluation: answer perplexity, greedy exact match per skill, multiple-choice log-likelihood accuracy.

Every metric is computed from the same two primitives: the summed log-probability of the labelled
tokens of an Example (answer_logprobs) and batched generation from chat prompts (generate).
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .data import IGNORE, Example, Mixture, collate, encode_all, read_records, render_prompt
from .io import atomic_write


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def answer_logprobs(model: nn.Module, examples: list[Example], pad_id: int, batch_size: int = 16) -> list[tuple[float, int]]:
    """(sum of log p(label token | prefix), number of label tokens) for each example, in order."""
    model.eval()
    results = []
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(_device(model)) for k, v in collate(examples[start:start + batch_size], pad_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        targets = batch["labels"][:, 1:]  # (batch, T-1): token t is predicted from logits at t-1
        logp = F.log_softmax(logits[:, :-1], dim=-1)
        picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        keep = targets != IGNORE
        results += list(zip((picked * keep).sum(1).tolist(), keep.sum(1).tolist()))
    return results


def perplexity(model: nn.Module, examples: list[Example], pad_id: int, batch_size: int = 16) -> dict[str, float]:
    """domain -> exp(mean negative log-likelihood per answer token) over that domain's examples."""
    nll, count = defaultdict(float), defaultdict(int)
    for ex, (logprob, n) in zip(examples, answer_logprobs(model, examples, pad_id, batch_size)):
        nll[ex.domain] -= logprob
        count[ex.domain] += n
    return {domain: math.exp(nll[domain] / count[domain]) for domain in nll if count[domain]}


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompts: list[str | list[dict]], max_new_tokens: int = 64,
             do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, batch_size: int = 32) -> list[str]:
    """Replies to chat prompts (a user message string or a list of messages), greedy unless do_sample."""
    model.eval()
    texts = [render_prompt(tokenizer, [{"role": "user", "content": p}] if isinstance(p, str) else p) for p in prompts]
    side, tokenizer.padding_side = tokenizer.padding_side, "left"  # left padding so replies start together
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if do_sample else {"do_sample": False}
    replies = []
    try:
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True,
                              add_special_tokens=False).to(_device(model))
            out = model.generate(**batch, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id, **sampling)
            replies += tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return [r.strip() for r in replies]


def normalise(answer: str) -> str:
    """Case, surrounding space and a final full stop do not count against an exact answer."""
    return answer.strip().rstrip(".").strip().lower()


def exact_match(model: nn.Module, tokenizer, records: list[dict], batch_size: int = 32) -> dict[str, float]:
    """domain -> fraction of records whose greedy reply equals record["answer"] (after normalise)."""
    prompts = [r["messages"][:-1] for r in records]
    longest = max(len(tokenizer(r["answer"], add_special_tokens=False)["input_ids"]) for r in records)
    replies = generate(model, tokenizer, prompts, max_new_tokens=longest + 4, batch_size=batch_size)
    hits, totals = defaultdict(int), defaultdict(int)
    for record, reply in zip(records, replies):
        hits[record["domain"]] += normalise(reply) == normalise(record["answer"])
        totals[record["domain"]] += 1
    return {domain: hits[domain] / totals[domain] for domain in totals}


def multiple_choice(model: nn.Module, tokenizer, records: list[dict], max_length: int = 512) -> dict[str, float]:
    """lm-eval style accuracy: pick the choice with the highest summed log-likelihood as the answer
    (acc), or the highest log-likelihood per character of the choice (acc_norm)."""
    examples, sizes, gold = [], [], []
    for record in records:
        for choice in record["choices"]:
            examples += encode_all(tokenizer, [{"messages": [{"role": "user", "content": record["question"]},
                                                             {"role": "assistant", "content": choice}],
                                                "domain": "mc"}], max_length)
        sizes.append(len(record["choices"]))
        gold.append(record["gold"])
    scores = [lp for lp, _ in answer_logprobs(model, examples, tokenizer.pad_token_id)]
    acc = acc_norm = 0
    for record, n, answer in zip(records, sizes, gold):
        mine, scores = scores[:n], scores[n:]
        acc += max(range(n), key=lambda i: mine[i]) == answer
        acc_norm += max(range(n), key=lambda i: mine[i] / max(len(record["choices"][i]), 1)) == answer
    return {"acc": acc / len(records), "acc_norm": acc_norm / len(records), "n": len(records)}


def read_choice_records(path: str | Path) -> list[dict]:
    """JSONL of {"question", "choices": [...], "answer": index or choice text}, checked line by line."""
    records = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            choices, answer = row["choices"], row["answer"]
            gold = choices.index(answer) if isinstance(answer, str) else int(answer)
            if not isinstance(row["question"], str) or not 0 <= gold < len(choices):
                raise ValueError("answer out of range")
        except (json.JSONDecodeError, KeyError, ValueError, TypeError) as err:
            raise ValueError(f"{path}:{number}: expected {{\"question\": str, \"choices\": [str, ...], \"answer\": "
                             f"index or one of the choices}} ({err}).") from err
        records.append({"question": row["question"], "choices": [str(c) for c in choices], "gold": gold})
    return records


def evaluate_mixture(model: nn.Module, tokenizer, mixture: Mixture, max_length: int = 256) -> dict:
    """Held-out metrics of the built-in mixture: exact match per skill, answer perplexity per domain."""
    results = {}
    if mixture.skills:
        results["exact_match"] = exact_match(model, tokenizer, mixture.skill_items("test"))
    if mixture.domains:
        held_out = encode_all(tokenizer, mixture.conversations("test"), max_length)
        results["perplexity"] = perplexity(model, held_out, tokenizer.pad_token_id)
    return results


def is_choice_file(path: str | Path) -> bool:
    """A multiple-choice JSONL: its first record has "choices"."""
    path = Path(path)
    first = next((line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()), "")
    return path.suffix == ".jsonl" and '"choices"' in first


def evaluate_file(model: nn.Module, tokenizer, path: str | Path, max_length: int = 512) -> dict:
    """Multiple-choice accuracy if the JSONL has "choices", otherwise answer perplexity per domain."""
    if is_choice_file(path):
        return {"multiple_choice": multiple_choice(model, tokenizer, read_choice_records(path), max_length)}
    examples = encode_all(tokenizer, read_records(path), max_length)
    return {"perplexity": perplexity(model, examples, tokenizer.pad_token_id)}


def format_table(runs: dict[str, dict]) -> str:
    """Side-by-side table: one row per (metric, task), one column per run (e.g. base, trained)."""
    names = list(runs)
    rows = {}
    for name in names:
        for metric, values in runs[name].items():
            for task, value in values.items():
                rows.setdefault((metric, task), {})[name] = value
    width = max([len(f"{m} {t}") for m, t in rows] + [12])
    lines = [f"{'metric':<{width}}" + "".join(f"{n:>12}" for n in names)]
    for (metric, task), values in rows.items():
        cells = "".join(f"{values[n]:>12.3f}" if n in values else f"{'-':>12}" for n in names)
        lines.append(f"{metric + ' ' + task:<{width}}" + cells)
    return "\n".join(lines)


def write_json(results: dict, path: str | Path) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(results, indent=2, sort_keys=True) + "\n"))
