"""LoRA vs L-MoE routers on standard benchmarks at equal trainable adapter
parameters (issue 14 item 6).

Every config trains on the union of the tasks' train sides (lmoe.data.benchmarks' split policy) with
the same steps, lr, batch, seeds and target modules, and is scored on a fixed subset of each task's
test side, by default with lm-eval's cloze protocol on plain text (--protocol letter --template
chat: LD-MoLE's; on the built-in 135M model it is at chance before and after a CPU-sized training
run, so the default is cloze). One protocol per grid (it is also the training target), named in
every row of the table. Only the `lmoe.*` overrides of CONFIGS differ: E * r = 16
everywhere (experts' A and B: the same parameters as one rank-16 LoRA), alpha = 2r. Each finished
run is appended to --results (JSONL) at once, and the table in --out (bench/RESULTS.md) is
rewritten, so an interrupted grid keeps what it finished and the same command continues it.
lmoe compare trains and scores each run (lmoe.compare.given, run_method; kept in --work-dir) and
its rows keep the per-question scores, so the table pairs each mixture with lora_r16: the
difference of the average and its paired standard error over the questions (rows recorded before
have none: '-'; a table without such rows has no paired column).

    OMP_NUM_THREADS=1 .venv/bin/python bench/benchmarks.py  # the default grid (2-core CPU)
    .venv/bin/python bench/benchmarks.py --model DIR \
        --tasks arc_easy arc_challenge openbookqa csqa hellaswag --steps 1000 --batch-size 16 \
        --test-items 0 --max-length 512 --protocol letter --template chat  # a GPU
    .venv/bin/python bench/benchmarks.py --configs lora_r16 params_dynamic --seeds 0 1 2 3 4

Extend the grid by adding a (name, overrides) pair to CONFIGS; overrides are TrainConfig keys
(`lmoe.router=...`, `lr=...`), so a routing default found elsewhere is one more line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(
    0, str(Path(__file__).resolve().parent.parent)
)  # run as a file: the repository root
from bench.common import markdown_table, mean_sd, replace_section, seed_se  # noqa: E402

SECTION = "## Benchmarks: LoRA vs L-MoE at equal adapter parameters (`bench/benchmarks.py`)"
# LD-MoLE's tasks that the package has, but HellaSwag (its prompts are twice as
# long; add it on a GPU)
TASKS = ["arc_easy", "arc_challenge", "openbookqa", "csqa"]
LORA = {"lmoe.num_experts": 1, "lmoe.rank": 16, "lmoe.alpha": 32}
MOE = {"lmoe.num_experts": 4, "lmoe.rank": 4, "lmoe.alpha": 8}
LB_0_01 = {
    "lmoe.load_balance_coef": 0.01
}  # the softmax gate's balance weight these rows ran with (now 0.1)
PAIRED = (  # the paired column's note in the section, where a row has per-question scores
    "average - lora_r16: the difference of the average accuracy paired by seed and question, "
    "± its standard error over the questions (lmoe compare's, per task, combined as the average "
    "is), rows with per-question scores only. "
)
SPARSITY = (
    0.1  # "with its sparsity loss"; the authors' released run.sh sets it to 0 (reg_loss_coef=0.0)
)
CONFIGS = [  # (name, TrainConfig overrides)
    ("lora_r16", {**LORA}),
    ("params_softmax", {**MOE, "lmoe.composition": "params", "lmoe.router": "softmax", **LB_0_01}),
    (
        "outputs_softmax",
        {**MOE, "lmoe.composition": "outputs", "lmoe.router": "softmax", **LB_0_01},
    ),
    ("params_top2", {**MOE, "lmoe.composition": "params", "lmoe.router": "topk", "lmoe.top_k": 2}),
    (
        "outputs_top2",
        {**MOE, "lmoe.composition": "outputs", "lmoe.router": "topk", "lmoe.top_k": 2},
    ),
    ("params_dynamic", {**MOE, "lmoe.composition": "params", "lmoe.router": "dynamic"}),
    ("outputs_dynamic", {**MOE, "lmoe.composition": "outputs", "lmoe.router": "dynamic"}),
    (
        "params_softmax_lb0.1",
        {
            **MOE,
            "lmoe.composition": "params",
            "lmoe.router": "softmax",
            "lmoe.load_balance_coef": 0.1,
        },
    ),  # lmoe train's default mixture
    (
        "params_dynamic_sparsity",
        {
            **MOE,
            "lmoe.composition": "params",
            "lmoe.router": "dynamic",
            "lmoe.sparsity_coef": SPARSITY,
        },
    ),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="builtin", help="'builtin' or a local HF model directory")
    p.add_argument("--tasks", nargs="+", default=TASKS)
    p.add_argument(
        "--configs", nargs="+", default=[n for n, _ in CONFIGS], choices=[n for n, _ in CONFIGS]
    )
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--test-items", type=int, default=50, help="test questions per task (0: all)")
    p.add_argument(
        "--protocol",
        choices=["cloze", "letter"],
        default="cloze",
        help="training target and scoring",
    )
    p.add_argument("--template", choices=["plain", "chat"], default="plain")
    p.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="TrainConfig overrides for every config, e.g. router_lr_scale=1 (the table of record)",
    )
    p.add_argument(
        "--results", default="bench/results/benchmarks.jsonl", help="one JSON line per finished run"
    )
    p.add_argument(
        "--out",
        default="bench/RESULTS.md",
        help="markdown file whose benchmark section is rewritten",
    )
    p.add_argument("--work-dir", default="runs/benchmarks")
    return p.parse_args(argv)


def settings(args: argparse.Namespace) -> dict:
    """What makes two runs comparable: rows with other settings are kept in the
    file but not tabled."""
    return {
        "model": args.model,
        "tasks": args.tasks,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "max_length": args.max_length,
        "test_items": args.test_items,
        "protocol": args.protocol,
        "template": args.template,
    } | ({"set": args.set} if args.set else {})


def train_overrides(args: argparse.Namespace, name: str, seed: int) -> list[str]:
    mine = dict(CONFIGS)[name]
    common = {
        "model": args.model,
        "data": "[" + ", ".join(f"bench:{t}" for t in args.tasks) + "]",
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "max_length": args.max_length,
        "seed": seed,
        "save_every": 0,
        "compare_base": "false",
        "mc.protocol": args.protocol,
        "mc.template": args.template,
        "mc.test_items": args.test_items,
        "output_dir": f"{args.work_dir}/{name}-s{seed}",
    }
    return [f"{k}={v}" for k, v in {**common, **mine}.items()] + list(args.set)


def run_base(args: argparse.Namespace) -> dict:
    """The base model scored item by item as lmoe compare scores a trained run (the grid's test
    questions and protocol: those of any config's TrainConfig)."""
    from lmoe.compare.items import score_items
    from lmoe.models import load_model
    from lmoe.training.config import TrainConfig

    model, tokenizer = load_model(args.model)
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    start = time.perf_counter()
    scoring = TrainConfig.from_file(None, train_overrides(args, "lora_r16", seed=0))
    metrics = score_items(model, tokenizer, scoring)
    return {
        "config": "base",
        "seed": None,
        "results": results_of(metrics, args),
        "eval_s": time.perf_counter() - start,
        "metrics": metrics,
    }


def run_config(args: argparse.Namespace, name: str, seed: int) -> dict:
    """Train and score one (config, seed) through lmoe compare (its run kept in
    work-dir/NAME-sSEED/result.json, per-item scores and all); the row the table reads."""
    from lmoe.compare.given import given_method
    from lmoe.compare.runs import run_method
    from lmoe.training.config import TrainConfig

    train_cfg = TrainConfig.from_file(None, train_overrides(args, name, seed))
    cfg, method = given_method(train_cfg, name, args.work_dir)
    result = run_method(cfg, method, seed, Path(args.work_dir) / f"{name}-s{seed}")
    return {
        "config": name,
        "seed": seed,
        "overrides": dict(CONFIGS)[name],
        "results": results_of(result["metrics"], args),
        "trainable": result["trainable"],
        "s_per_step": result["s_per_step"],
        "active_experts": result["active_experts"],  # the last 10 training steps
        "wall_s": result.get("wall_s"),  # (runs kept by an earlier lmoe compare lack it)
        "metrics": result["metrics"],  # per question: the paired differences from lora_r16
    }


def metric_name(task: str, key: str) -> str:
    """lmoe compare's name of a task's accuracy under protocol/template `key`."""
    return f"bench:{task} {key} acc"


def results_of(metrics: dict, args: argparse.Namespace) -> dict:
    """lmoe compare's per-question scores as the table reads lmoe's results: per task its n and
    acc, and the tasks' unweighted mean acc ("bench:average")."""
    from lmoe.compare.items import metric_value

    key = protocol(args)
    tasks = {t: metrics[metric_name(t, key)] for t in args.tasks}
    results = {
        f"bench:{t}": {"n": len(m["values"]), key: {"acc": metric_value(m)}}
        for t, m in tasks.items()
    }
    mean = statistics.mean(metric_value(m) for m in tasks.values())
    return results | {"bench:average": {key: {"acc": mean}}}


# ---------------------------------------------------------------- table


def protocol(args: argparse.Namespace) -> str:
    """The grid's protocol/template, as lmoe's results name it (e.g. "cloze/plain")."""
    return f"{args.protocol}/{args.template}"


def accuracy(results: dict, task: str, key: str) -> float:
    """A task's (or "average"'s) acc by protocol/template `key`. Rows written before lmoe's results
    named their protocol hold results["acc"][task], scored by the protocol of their
    settings (the same key)."""
    return results["acc"][task] if "acc" in results else results[f"bench:{task}"][key]["acc"]


def questions(results: dict, task: str) -> int:
    return results["n"][task] if "acc" in results else results[f"bench:{task}"]["n"]


def paired_average(mine: list[dict], rows: list[dict], tasks: list[str], key: str) -> str:
    """A config's average accuracy minus lora_r16's, with the paired standard error over the test
    questions (lmoe compare's, per task, then combined), from the seeds both ran with per-question
    scores; '-' for the base, lora_r16 and rows recorded without them."""
    from lmoe.compare.stats import difference_cell, mean_difference, pair_runs

    if mine[0]["config"] in ("base", "lora_r16"):
        return "-"
    pairs = pair_runs(mine, [r for r in rows if r["config"] == "lora_r16"])
    if not pairs:
        return "-"
    return difference_cell(mean_difference([pairs[metric_name(t, key)] for t in tasks]))


def table(rows: list[dict], tasks: list[str], key: str) -> str:
    paired = any("metrics" in r for r in rows)  # rows recorded before lmoe compare have none
    head = (
        ["config", "protocol", "seeds", "trainable params"]
        + tasks
        + ["average", "SE of average", "active experts", "s/step"]
        + (["average - lora_r16 (paired SE)"] if paired else [])
    )
    table_rows = []
    for name in ["base"] + [n for n, _ in CONFIGS]:
        mine = [r for r in rows if r["config"] == name]
        if not mine:
            continue
        acc = [{t: accuracy(r["results"], t, key) for t in [*tasks, "average"]} for r in mine]
        averages = [a["average"] for a in acc]
        n = sum(questions(mine[0]["results"], t) for t in tasks)
        p = statistics.mean(averages)
        # seeds' spread when there are several, else the binomial error of the pooled test questions
        se = seed_se(averages) if len(averages) > 1 else math.sqrt(p * (1 - p) / n)
        cells = [
            name,
            key + " acc",
            str(len(mine)) if name != "base" else "-",
            f"{mine[0]['trainable']:,}" if "trainable" in mine[0] else "-",
        ]
        cells += [mean_sd([a[t] for a in acc]) for t in tasks] + [mean_sd(averages), f"{se:.3f}"]
        cells += [
            f"{statistics.mean(r['active_experts'] for r in mine):.2f}"
            if "active_experts" in mine[0]
            else "-",
            f"{statistics.mean(r['s_per_step'] for r in mine):.2f}"
            if "s_per_step" in mine[0]
            else "-",
        ]
        cells += [paired_average(mine, rows, tasks, key)] if paired else []
        table_rows.append(cells)
    return "\n".join(markdown_table(head, table_rows))


def section_title(args: argparse.Namespace) -> str:
    """One section per --set: grids with other overrides (router_lr_scale=1 and =30) are
    tabled side by side."""
    return SECTION + (f" with `{' '.join(args.set)}`" if args.set else "")


def write_section(
    rows: list[dict], args: argparse.Namespace, command: str, planned: int, done: int
) -> None:
    """done: how many of this command's planned training runs are finished (`finished`); the table
    holds every row with these settings, from any command."""
    n = {t: questions(rows[0]["results"], t) for t in args.tasks} if rows else {}
    load = os.getloadavg()
    text = [
        section_title(args),
        "",
        f"Command: `{command}` ({done} of its {planned} training runs finished when this was "
        f"written, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load average "
        f"{load[0]:.1f}; the table: every run with these settings in {args.results}).",
        "",
        f"Every config: {args.steps} steps of {args.batch_size} questions from the union of the "
        f"tasks' train sides, lr {args.lr}, max_length {args.max_length}, experts on q_proj, "
        f"v_proj, up_proj; E·r = 16 (LoRA: rank 16), alpha = 2r. Protocol {args.protocol} "
        f"({args.template} template; cloze: acc, the summed log-likelihood of the choice), on a "
        f"fixed subset of each task's test side: n = {n} questions. Per task: mean ± standard "
        "deviation over seeds; SE of average: standard deviation of the seeds' averages / "
        "sqrt(seeds) (base: binomial, pooled questions). Active experts: experts with g > 0 per "
        "token and layer, mean of the last 10 steps. s/step: training loop only. "
        + PAIRED
        * any("metrics" in r for r in rows)
        + "Split policy: "
        "ARC-E, ARC-C, OBQA train on validation, test on the test split; MMLU dev + validation / "
        "test; the other tasks split validation by a hash of the question (30% test).",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} torch threads.",
        "",
        table(rows, args.tasks, protocol(args)),
        "",
    ]
    path = Path(args.out)
    current = (
        path.read_text() if path.is_file() else ""
    )  # re-read: others edit other sections meanwhile
    path.write_text(replace_section(current, "\n".join(text), section_title(args)))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    given = sys.argv[1:] if argv is None else argv
    threads = os.environ.get("OMP_NUM_THREADS")
    command = shlex.join(
        [
            *([f"OMP_NUM_THREADS={threads}"] if threads else []),
            ".venv/bin/python",
            "bench/benchmarks.py",
            *given,
        ]
    )
    store = Path(args.results)
    store.parent.mkdir(parents=True, exist_ok=True)
    kept = [json.loads(line) for line in store.read_text().splitlines()] if store.is_file() else []
    rows = [r for r in kept if r.get("settings") == settings(args)]
    done = {(r["config"], r["seed"]) for r in rows}
    plan = [("base", None)] + [
        (name, seed) for seed in args.seeds for name in args.configs
    ]  # seed-major
    for name, seed in plan:
        if (name, seed) in done:
            continue
        print(f"benchmarks: {name} seed {seed}", flush=True)
        row = run_base(args) if name == "base" else run_config(args, name, seed)
        row["settings"] = settings(args)
        with open(store, "a") as f:
            f.write(json.dumps(row) + "\n")
        rows.append(row)
        write_section(rows, args, command, len(plan) - 1, finished(rows, plan))
        print(table(rows, args.tasks, protocol(args)), flush=True)
    write_section(rows, args, command, len(plan) - 1, finished(rows, plan))


def finished(rows: list[dict], plan: list[tuple]) -> int:
    """The training runs of `plan` that rows hold."""
    wanted = {p for p in plan if p[0] != "base"}
    return len(wanted & {(r["config"], r["seed"]) for r in rows})


if __name__ == "__main__":
    main()
