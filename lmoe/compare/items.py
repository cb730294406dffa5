"""Per-item scores of a trained model on held-out data, kept item by item so that two methods can be
paired: exact match (0/1 per short answer), answer negative log-likelihood (per example, with its
answer tokens) and multiple-choice correctness (0/1 per question, per protocol).

The same held-out data and the same primitives as lmoe train's evaluation (evaluate_all): the
built-in mixture's test side, eval_data files, benchmarks' test sides (mc.test_items of each).
"""

from __future__ import annotations

import math
from pathlib import Path

from torch import nn

from ..data import benchmarks
from ..data.encoding import encode_all
from ..data.records import read_records
from ..evaluation.logprobs import answer_logprobs
from ..evaluation.multiple_choice import choice_hits
from ..evaluation.progress import announce
from ..evaluation.scoring import answer_records, exact_hits
from ..training.config import TrainConfig

MEAN, PERPLEXITY = "mean", "perplexity"  # a metric's kind: how its items make its value


def score_items(model: nn.Module, tokenizer, cfg: TrainConfig) -> dict[str, dict]:
    """metric name -> {"kind", "ids", "values"(, "tokens")}: one value per held-out item, in a fixed
    order (the same for every method and seed).

    kind "mean": the metric is the mean of values (exact match, accuracy). kind "perplexity":
    values are each example's summed answer NLL and tokens its answer tokens; the metric is
    exp(sum values / sum tokens), pooled over tokens as lmoe train's perplexity per domain is.
    """
    announce(f"compare: scoring {cfg.output_dir} item by item")
    metrics: dict[str, dict] = {}
    if not cfg.data:
        skills = cfg.mixture.skill_items("test") if cfg.mixture.skills else []
        if skills:
            metrics["exact_match"] = _exact(model, tokenizer, skills)
        chats = cfg.mixture.conversations("test") if cfg.mixture.domains else []
        if chats:
            metrics["perplexity"] = _perplexity(model, tokenizer, chats, cfg.max_length)
    for task in benchmarks.task_names(cfg.data + cfg.eval_data):
        questions = benchmarks.scored_questions(task, cfg.mc.test_items)
        metrics |= _choices(model, tokenizer, questions, cfg, benchmarks.PREFIX + task)
    for path in [p for p in cfg.eval_data if not benchmarks.task_names([p])]:
        metrics |= _file(model, tokenizer, path, cfg)
    return metrics


def _file(model: nn.Module, tokenizer, path: str, cfg: TrainConfig) -> dict[str, dict]:
    """An eval_data file's metrics, named "<metric>:<file stem>" as lmoe train's results."""
    records, stem = read_records(path, group=cfg.eval_group), Path(path).stem
    questions = [r for r in records if "choices" in r]
    if questions and len(questions) < len(records):
        raise ValueError(
            f"{path} mixes multiple-choice questions with other records; put them in two files."
        )
    if questions:
        return _choices(model, tokenizer, questions, cfg, stem)
    metrics = {}
    answered = answer_records(tokenizer, records, cfg.eval_max_answer_tokens, path)
    if answered:
        metrics[f"exact_match:{stem}"] = _exact(model, tokenizer, answered)
    metrics[f"perplexity:{stem}"] = _perplexity(model, tokenizer, records, cfg.max_length)
    return metrics


def _ids(records: list[dict]) -> list[str]:
    return [f"{r.get('domain', '')}:{i}" for i, r in enumerate(records)]


def _exact(model: nn.Module, tokenizer, records: list[dict]) -> dict:
    hits = exact_hits(model, tokenizer, records)
    return {"kind": MEAN, "ids": _ids(records), "values": [float(h) for h in hits]}


def _perplexity(model: nn.Module, tokenizer, records: list[dict], max_length: int) -> dict:
    examples = encode_all(tokenizer, records, max_length)
    scores = answer_logprobs(model, examples, tokenizer.pad_token_id, show=True)
    kept = [i for i, (_, n) in enumerate(scores) if n]  # truncated away: no answer token left
    return {
        "kind": PERPLEXITY,
        "ids": [_ids(records)[i] for i in kept],
        "values": [-scores[i][0] for i in kept],
        "tokens": [scores[i][1] for i in kept],
    }


def _choices(model: nn.Module, tokenizer, questions: list[dict], cfg, source: str) -> dict:
    """One metric per protocol that cfg.mc scores, named by it: "<source> cloze/chat acc"."""
    metrics = {}
    for fmt in cfg.mc.scored():
        hits = choice_hits(model, tokenizer, questions, fmt, cfg.max_length, name=source)
        metrics[f"{source} {fmt.key} acc"] = {
            "kind": MEAN,
            "ids": _ids(questions),
            "values": [float(h["acc"]) for h in hits],
        }
    return metrics


def metric_value(metric: dict) -> float:
    """The metric over its items: their mean, or the pooled perplexity."""
    if metric["kind"] == PERPLEXITY:
        return math.exp(sum(metric["values"]) / sum(metric["tokens"]))
    return sum(metric["values"]) / len(metric["values"])


def group_values(metric: dict) -> dict[str, float]:
    """The metric per group of items (an item's id is "<domain>:<index>"), as lmoe train's results
    give it: exact match per skill, answer perplexity (pooled over tokens) per domain."""
    groups: dict[str, dict] = {}
    for k, item in enumerate(metric["ids"]):
        group = groups.setdefault(item.rsplit(":", 1)[0], {"kind": metric["kind"], "values": []})
        group["values"].append(metric["values"][k])
        if "tokens" in metric:
            group.setdefault("tokens", []).append(metric["tokens"][k])
    return {name: metric_value(group) for name, group in groups.items()}


def pairing_values(metric: dict) -> list[float]:
    """Per item, values whose mean is the metric (perplexity: its log, each example's answer NLL
    over the mean answer tokens per example), so a difference of means is the metric's."""
    if metric["kind"] == PERPLEXITY:
        per_item = sum(metric["tokens"]) / len(metric["tokens"])
        return [v / per_item for v in metric["values"]]
    return list(metric["values"])


def aggregates(metrics: dict[str, dict]) -> dict[str, float]:
    """metric name -> value: what lmoe train prints and writes to eval.json for the run."""
    return {name: metric_value(m) for name, m in metrics.items()}
