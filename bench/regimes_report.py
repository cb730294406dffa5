"""The regimes study's tables (bench/regimes.py --report) from its results file: per regime, each
method's metrics (mean ± sd over seeds), each mixture's paired difference from every LoRA of the
regime (lmoe.compare's paired standard error over items) and the first metric per domain. Pure
arithmetic on the stored per-item scores, so it is tested against hand values."""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

from bench.common import markdown_table, mean_sd, replace_section
from lmoe.compare.items import PERPLEXITY, group_values, metric_value
from lmoe.compare.runs import BASE
from lmoe.compare.stats import difference_cell, pair_runs, pair_with_base

KINDS = ("mixture", "lora")
BENCH = "bench:"  # a benchmark's metrics: "bench:NAME PROTOCOL/TEMPLATE acc"
SECTION = "## Regimes: where does a mixture beat a LoRA? (`bench/regimes.py`)"
INTRO = (
    "Written by `bench/regimes.py --report` from bench/results/regimes.jsonl (one line per "
    "`lmoe compare` call; its settings, the runs and their per-item scores). The study's data, "
    "sizes and settings: bench/regimes.py's docstring. Metrics: mean ± sd over seeds; differences: "
    "mixture − LoRA at the same seeds, ± lmoe compare's paired standard error over the n held-out "
    "items (the items' seed-averaged differences); perplexity's difference is that of its log; "
    "'by seed': the first metric's difference per seed, mean ± its standard error over seeds. "
    "ESS: effective support size on the last 10 training steps."
)


def read_calls(path: Path) -> dict[str, dict]:
    """call name -> {"settings", "report"} of each line of the results file (a later line of the
    same call wins)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return {row["call"]: row for row in map(json.loads, filter(str.strip, lines))}


def regime_runs(calls: dict[str, dict]) -> dict[str, dict[str, list[dict]]]:
    """regime -> method -> its runs (one per seed, seed order), merged over the regime's calls
    (a call is named REGIME_nearest or REGIME_rN; a run in several calls counts once)."""
    regimes: dict[str, dict[str, dict[int, dict]]] = {}
    for name, call in calls.items():
        methods = regimes.setdefault(name.rsplit("_", 1)[0], {})
        for run in call["report"]["runs"]:
            methods.setdefault(run["method"], {})[run["seed"]] = run
    return {
        regime: {m: [runs[s] for s in sorted(runs)] for m, runs in methods.items()}
        for regime, methods in regimes.items()
    }


def metric_label(metric: str) -> str:
    """'exact_match:test' -> 'exact match (test)'; 'bench:piqa cloze/plain acc' -> 'piqa
    cloze/plain acc'."""
    if metric.startswith(BENCH):
        return metric.removeprefix(BENCH)
    kind, _, source = metric.partition(":")
    return f"{kind.replace('_', ' ')} ({source})" if source else kind.replace("_", " ")


def first_metrics(methods: dict[str, list[dict]]) -> dict[str, dict]:
    """The first run's metrics (every run of a regime is scored on the same metrics and items)."""
    return next(iter(methods.values()))[0]["metrics"]


def method_rows(methods: dict[str, list[dict]], with_metrics: bool = True) -> list[str]:
    """Markdown rows: each method's trainable count, seeds, metrics (with_metrics), ESS and
    seconds per step."""
    metrics = list(first_metrics(methods)) if with_metrics else []
    head = ["method", "trainable", "seeds", *map(metric_label, metrics), "ESS", "s/step"]
    rows = []
    for name, runs in methods.items():
        support = [r["effective_support_size"] for r in runs]
        trained = runs[0]["kind"] != BASE
        cells = [
            "base model (no training)" if not trained else name,
            f"{runs[0]['trainable']:,}",
            str(len(runs)) if trained else "-",
            *(mean_sd([metric_value(r["metrics"][m]) for r in runs]) for m in metrics),
            "-" if None in support else mean_sd(support),
            f"{statistics.mean(r['s_per_step'] for r in runs):.2f}" if trained else "-",
        ]
        rows.append(cells)
    return markdown_table(head, rows)


def metric_rows(methods: dict[str, list[dict]]) -> list[str]:
    """Markdown rows, one per metric (for a regime with many, e.g. retention's): every method's
    mean ± sd over seeds (the base model's single scoring), each mixture's paired difference
    from each LoRA (items' SE; by seed) and each trained method's from the base model."""
    kinds = {k: {m: r for m, r in methods.items() if r[0]["kind"] == k} for k in (*KINDS, BASE)}
    pairs = {
        f"{mixture} − {lora}": (runs, theirs)
        for mixture, runs in kinds["mixture"].items()
        for lora, theirs in kinds["lora"].items()
    }
    base = [runs[0] for runs in kinds[BASE].values()]
    from_base = {
        f"{name} − base model": pair_with_base(runs, base[0])
        for name, runs in {**kinds["mixture"], **kinds["lora"]}.items()
        if base
    }
    paired = {label: pair_runs(*both) for label, both in pairs.items()} | from_base
    head = ["metric", *("base model" if n in kinds[BASE] else n for n in methods)]
    head += [c for label in pairs for c in (label, "by seed")] + list(from_base)
    rows = []
    first = next(iter(methods.values()))[0]
    for metric in first_metrics(methods):
        log = first["metrics"][metric]["kind"] == PERPLEXITY
        cells = [metric_label(metric) + (" (differences: its log)" if log else "")]
        cells += [
            mean_sd([metric_value(r["metrics"][metric]) for r in runs]) for runs in methods.values()
        ]
        for label in pairs:
            cells += [
                difference_cell(paired[label].get(metric)),
                seed_cell(paired[label].get(metric)),
            ]
        cells += [difference_cell(paired[label].get(metric)) for label in from_base]
        rows.append(cells)
    return markdown_table(head, rows)


def difference_label(metric: str, run: dict) -> str:
    """A difference column's head: perplexity's difference is that of its log."""
    return ("log " if run["metrics"][metric]["kind"] == PERPLEXITY else "") + metric_label(metric)


def difference_rows(methods: dict[str, list[dict]]) -> list[str]:
    """Markdown rows: every mixture's paired difference from every LoRA, per metric."""
    loras = {m: runs for m, runs in methods.items() if runs[0]["kind"] == "lora"}
    mixtures = {m: runs for m, runs in methods.items() if runs[0]["kind"] == "mixture"}
    if not loras or not mixtures:
        return []
    metrics = list(first_metrics(methods))
    first = next(iter(methods.values()))[0]
    head = ["mixture − LoRA", "seeds"] + [difference_label(m, first) for m in metrics]
    head.append(f"{metric_label(metrics[0])}, by seed")
    rows = []
    for lora, lora_runs in loras.items():
        for mixture, runs in mixtures.items():
            pairs = pair_runs(runs, lora_runs)
            if not pairs:
                continue
            seeds = max(p["seeds"] for p in pairs.values())
            cells = [f"{mixture} − {lora}", str(seeds)]
            cells += [difference_cell(pairs.get(m)) for m in metrics]
            cells.append(seed_cell(pairs.get(metrics[0])))
            rows.append(cells)
    return markdown_table(head, rows)


def seed_cell(pair: dict | None) -> str:
    """A paired difference as mean ± the standard error of the seeds' gaps (training noise, where
    the items' SE holds the test set's); '-' below two seeds."""
    if pair is None or pair["seed_se"] is None:
        return "-"
    return f"{pair['difference']:+.3f} ± {pair['seed_se']:.3f}"


def domain_rows(methods: dict[str, list[dict]]) -> list[str]:
    """Markdown rows: the first metric per domain (the item id's part before ':'), mean ± sd over
    seeds, for every method; [] where the items have one domain."""
    metric = next(iter(first_metrics(methods)))
    domains = list(group_values(first_metrics(methods)[metric]))
    if len(domains) < 2:
        return []
    rows = []
    for name, runs in methods.items():
        groups = [group_values(r["metrics"][metric]) for r in runs]
        rows.append([name, *(mean_sd([g[d] for g in groups]) for d in domains)])
    return [f"{metric_label(metric)} by domain:", "", *markdown_table(["method", *domains], rows)]


def task_count_rows(regimes: dict[str, dict[str, list[dict]]]) -> list[str]:
    """Markdown rows for the tasks_N regimes, one per task count and mixture: its first metric,
    its LoRA's and the paired difference (items' SE; by seed); [] without such regimes."""
    counts = {int(r.split("_")[1]): m for r, m in regimes.items() if re.fullmatch(r"tasks_\d+", r)}
    rows = []
    for n, methods in sorted(counts.items()):
        metric = next(iter(first_metrics(methods)))
        kinds = {kind: {m: r for m, r in methods.items() if r[0]["kind"] == kind} for kind in KINDS}
        for mixture, runs in kinds["mixture"].items():
            for lora, theirs in kinds["lora"].items():
                pair = pair_runs(runs, theirs).get(metric)
                rows.append(
                    [
                        str(n),
                        f"{mixture} − {lora}",
                        mean_sd([metric_value(r["metrics"][metric]) for r in runs]),
                        mean_sd([metric_value(r["metrics"][metric]) for r in theirs]),
                        difference_cell(pair),
                        seed_cell(pair),
                    ]
                )
    if not rows:
        return []
    head = ["tasks", "mixture − LoRA", "mixture", "LoRA", "difference", "by seed"]
    return [
        f"### tasks_N: {metric_label(metric)} by number of tasks",
        "",
        *markdown_table(head, rows),
    ]


def format_section(calls: dict[str, dict]) -> str:
    """The RESULTS.md section: per regime its command and tables, then the task counts side by
    side."""
    blocks = [[SECTION], [INTRO]]
    regimes = regime_runs(calls)
    for regime, methods in regimes.items():
        settings = next(c["settings"] for n, c in calls.items() if n.startswith(regime + "_"))
        seeds = sorted({r["seed"] for runs in methods.values() for r in runs} - {None})
        command = (
            f".venv/bin/python bench/regimes.py --run --regimes {regime} "
            f"--seeds {' '.join(map(str, seeds))}"
        )
        title = (
            f"### {regime}: {settings['steps']} steps, batch {settings['batch_size']}, "
            f"lr {settings['lr']}"
        )
        blocks += [[title], ["    " + command]]
        if any(runs[0]["kind"] == BASE for runs in methods.values()):  # one row per metric
            blocks += [method_rows(methods, with_metrics=False), metric_rows(methods)]
        else:
            blocks += [method_rows(methods), difference_rows(methods), domain_rows(methods)]
    blocks.append(task_count_rows(regimes))
    return "\n\n".join("\n".join(b) for b in blocks if b) + "\n"


def write_report(results: Path, out: Path) -> None:
    """Rewrite out's section from the results file (the other sections kept)."""
    text = out.read_text(encoding="utf-8") if out.is_file() else ""
    out.write_text(replace_section(text, format_section(read_calls(results)), SECTION))
