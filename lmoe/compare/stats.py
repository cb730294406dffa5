"""The paired comparison of a mixture with its LoRA, and the tables `lmoe compare` prints.

Paired difference over items, combined over seeds. For a metric, seeds s = 1..S that both
methods finished and held-out items i = 1..n (the same items, in the same order, for every method
and seed), with x_{s,i} an item's value (items.pairing_values: 0/1 for exact match and accuracy,
the answer NLL scaled so that the mean is log perplexity):

    d_{s,i} = x^mixture_{s,i} - x^LoRA_{s,i}          paired within a seed
    dbar_i  = (1/S) sum_s d_{s,i}                      each item's difference, mean over seeds
    diff    = (1/n) sum_i dbar_i                       = the mean over seeds of each seed's gap
    SE      = sqrt( sum_i (dbar_i - diff)^2 / (n (n - 1)) )

SE is the standard error of diff over the sampling of held-out items: the items are shared by the
seeds, so each item's seed-averaged difference is one draw, and the seeds' training noise enters
through dbar_i. The spread between seeds is the tables' "± sd" column of each method.
"""

from __future__ import annotations

import math
import statistics

from .items import PERPLEXITY, metric_value, pairing_values


def mean_sd(values: list[float]) -> str:
    """A table cell over seeds: '-' for none, the value for one, else mean ± sample std
    (3 decimals)."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def paired_difference(mixture: list[dict], lora: list[dict]) -> dict:
    """The module docstring's diff and SE of one metric.

    Args:
        mixture, lora: the metric (items.score_items' entry) of each seed, seeds in the same order.

    Returns:
        {"difference", "paired_se", "seed_se", "n" (items), "seeds"}; paired_se is None for one
        item; seed_se, the standard error of the seeds' gaps (training noise, the test items
        fixed), None for one seed.
    """
    if len(mixture) != len(lora) or not mixture:
        raise ValueError("paired_difference needs the same seeds (at least one) of both methods.")
    rows = []
    for mine, theirs in zip(mixture, lora, strict=True):
        if mine["ids"] != theirs["ids"] or mine.get("tokens") != theirs.get("tokens"):
            raise ValueError(
                "The two runs were scored on different held-out items; compare them on the same "
                "eval data (a new output_dir)."
            )
        rows.append(
            [a - b for a, b in zip(pairing_values(mine), pairing_values(theirs), strict=True)]
        )
    n, seeds = len(rows[0]), len(rows)
    per_item = [sum(row[i] for row in rows) / seeds for i in range(n)]
    diff = sum(per_item) / n
    se = math.sqrt(sum((d - diff) ** 2 for d in per_item) / (n * (n - 1))) if n > 1 else None
    per_seed = [sum(row) / n for row in rows]  # each seed's gap
    seed_se = statistics.stdev(per_seed) / math.sqrt(seeds) if seeds > 1 else None
    return {"difference": diff, "paired_se": se, "seed_se": seed_se, "n": n, "seeds": seeds}


def pair_runs(mixture: list[dict], lora: list[dict]) -> dict[str, dict]:
    """Each metric's paired difference of a mixture's runs from its LoRA's, at the seeds both have
    with per-item scores (runs: run_method's results, or rows carrying their "seed" and
    "metrics"): metric -> {"kind", "difference", "paired_se", "n", "seeds", "seed_list"}; {} where
    they share no such seed."""
    theirs = {r["seed"]: r for r in lora if "metrics" in r}
    mine = [r for r in mixture if "metrics" in r and r["seed"] in theirs]
    pairs = {}
    for metric, first in mine[0]["metrics"].items() if mine else []:
        pair = paired_difference(
            [r["metrics"][metric] for r in mine],
            [theirs[r["seed"]]["metrics"][metric] for r in mine],
        )
        pairs[metric] = {"kind": first["kind"], **pair, "seed_list": [r["seed"] for r in mine]}
    return pairs


def pair_with_base(runs: list[dict], base: dict) -> dict[str, dict]:
    """pair_runs of a method's runs with the base model's result, scored once and standing in at
    every seed the runs have."""
    return pair_runs(runs, [{**base, "seed": r["seed"]} for r in runs])


def mean_difference(pairs: list[dict]) -> dict:
    """The paired difference of the unweighted mean of several metrics (e.g. the average accuracy
    over benchmarks, each on its own items): the mean of their differences and, their items being
    independent, SE = sqrt(sum of SE^2) / count (None where one has none); n: their items."""
    if not pairs:
        raise ValueError("mean_difference needs at least one paired difference.")
    ses = [p["paired_se"] for p in pairs]
    return {
        "difference": sum(p["difference"] for p in pairs) / len(pairs),
        "paired_se": None if None in ses else math.sqrt(sum(se**2 for se in ses)) / len(pairs),
        "n": sum(p["n"] for p in pairs),
        "seeds": min(p["seeds"] for p in pairs),
    }


def method_summary(results: list[dict]) -> dict:
    """A method's finished runs (one per seed) -> {metric: {"mean", "sd", "values"}} plus the
    trainable parameters, seeds, effective support size and seconds per step."""
    metrics = {}
    for name in results[0]["metrics"]:
        values = [metric_value(r["metrics"][name]) for r in results]
        metrics[name] = {
            "values": values,
            "mean": statistics.mean(values),
            "sd": statistics.stdev(values) if len(values) > 1 else None,
        }
    support = [r["effective_support_size"] for r in results]
    steps = [r["s_per_step"] for r in results]
    steps = None if None in steps else steps  # the base model's: nothing trained
    return {
        "seeds": [r["seed"] for r in results],
        "trainable": results[0]["trainable"],
        "metrics": metrics,
        "effective_support_size": statistics.mean(support) if None not in support else None,
        "effective_support_from": results[0].get("effective_support_from"),
        "s_per_step": None if steps is None else statistics.mean(steps),
    }


def difference_label(metric: str, kind: str) -> str:
    """What a difference column holds: perplexity's difference is that of its log."""
    return f"log {metric}" if kind == PERPLEXITY else metric


def format_tables(
    summary: dict[str, dict], differences: list[dict], from_base: list[dict] = ()
) -> str:
    """The per-method table (mean ± sd over seeds), the paired differences from the LoRA and,
    where the base model was scored, each method's paired difference from it."""
    names = list(summary)
    metrics = list(summary[names[0]]["metrics"]) if names else []
    head = ["method", "trainable", "seeds", *metrics, "ESS", "s/step"]
    rows = []
    for name in names:
        s = summary[name]
        ess = s["effective_support_size"]
        rows.append(
            [name, f"{s['trainable']:,}", str(len(s["seeds"]))]
            + [mean_sd(s["metrics"][m]["values"]) for m in metrics]
            + [_support(ess, s["effective_support_from"]), _number(s["s_per_step"])]
        )
    lines = _aligned(head, rows)
    if differences:
        lines += _difference_table(
            "mixture - LoRA", metrics, differences, lambda d: f"{d['mixture']} - {d['lora']}"
        )
    if from_base:
        lines += _difference_table(
            "method - base", metrics, list(from_base), lambda d: f"{d['method']} - base"
        )
    return "\n".join(lines)


def _difference_table(title: str, metrics: list[str], differences: list[dict], label) -> list[str]:
    """A table of paired differences, one row per label(difference), a column per metric."""
    kinds = {d["metric"]: d["kind"] for d in differences}
    head = [title, "seeds"] + [difference_label(m, kinds[m]) for m in metrics]
    rows = []
    for row in dict.fromkeys(map(label, differences)):
        mine = {d["metric"]: d for d in differences if label(d) == row}
        seeds = max(d["seeds"] for d in mine.values())
        rows.append([row, str(seeds)] + [_with_seed_se(mine.get(m)) for m in metrics])
    several = any(d["seeds"] > 1 for d in differences)
    what = " [± standard error over seeds]" if several else ""
    return ["", f"Paired difference ± standard error over items (n){what}:", *_aligned(head, rows)]


def _with_seed_se(pair: dict | None) -> str:
    """difference_cell, and where several seeds were paired the SE of their gaps: '+0.012 ±
    0.008 (n=150) [± 0.010]'."""
    cell = difference_cell(pair)
    if pair is None or pair.get("seed_se") is None:
        return cell
    return f"{cell} [± {pair['seed_se']:.3f}]"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _support(ess: float | None, where: str | None) -> str:
    """The ESS cell: measured on the held-out answer tokens, or '(train)' on the training steps."""
    if ess is None:
        return "-"
    return f"{ess:.2f}" + (" (train)" if where == "training" else "")


def difference_cell(pair: dict | None) -> str:
    """A paired difference as a table cell, '+0.012 ± 0.008 (n=150)'; '-' for none."""
    if pair is None:
        return "-"
    se = "-" if pair["paired_se"] is None else f"{pair['paired_se']:.3f}"
    return f"{pair['difference']:+.3f} ± {se} (n={pair['n']})"


def _aligned(head: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    return [
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in [head, *rows]
    ]
