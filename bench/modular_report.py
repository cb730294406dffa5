"""Tables of the modular-skills study (bench/modular.py) from its rows: accuracy per method, paired
differences with their standard error, routing shares, the adapters' transfer matrix, and the
continual-learning matrix with forgetting. Pure arithmetic on the rows' per-question correctness, so
it is tested against hand values."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import torch

from bench.common import markdown_table, mean_sd, replace_section

SECTION = "## Modular skills: compose, route, add (`bench/modular.py`)"
COMPOSE_ORDER = [
    "base",
    "oracle",
    "uniform",
    "zero_router",
    "proto_raw_zeroshot",
    "proto_raw_router",
    "proto_zeroshot",
    "proto_router",
    "arrow_default",
    "arrow_other",
    "xlora",
]  # then multitask_r*, end_to_end
LABELS = {
    "base": "base model",
    "oracle": "(b) each task with its own adapter (oracle)",
    "uniform": "(c) adapters averaged (uniform routing)",
    "zero_router": "(d) lmoe composed, zero router trained alone",
    "proto_raw_zeroshot": "(4) router from the adapters' singular vectors at Arrow's raw scale, "
    "no training",
    "proto_raw_router": "(4) the same, then the router trained alone",
    "proto_zeroshot": "(4) router from the singular vectors, standardised scores, no training",
    "proto_router": "(4) the same, then the router trained alone",
    "arrow_default": "(e) PEFT Arrow, its defaults",
    "arrow_other": "(e) PEFT Arrow, other setting",
    "xlora": "(f) PEFT X-LoRA, classifier trained",
    "end_to_end": "(h) lmoe end to end, same budget",
}
PAIRS = [
    ("zero_router", "arrow_default"),
    ("zero_router", "uniform"),
    ("zero_router", "oracle"),
    ("proto_zeroshot", "arrow_default"),
    ("proto_router", "zero_router"),
    ("multitask_r8", "zero_router"),
    ("multitask_r32", "zero_router"),
    ("end_to_end", "zero_router"),
]


def bits(s: str) -> list[int]:
    return [int(c) for c in s]


def accuracy(correct: str) -> float:
    return sum(bits(correct)) / len(correct)


def compose_correct(rows: list[dict], tasks: list[str]) -> dict[str, dict[int, dict[str, str]]]:
    """method -> seed -> task -> correctness string; 'oracle' assembled from each
    task's own adapter."""
    out: dict[str, dict] = {}
    for r in rows:
        if r["part"] == "base":
            out.setdefault("base", {})[None] = r["correct"]
        elif r["part"] == "compose":
            out.setdefault(r["method"], {})[r["seed"]] = r["correct"]
    for seed in {s for m, seeds in out.items() if m.startswith("adapter:") for s in seeds}:
        own = {t: out.get(f"adapter:{t}", {}).get(seed, {}).get(t) for t in tasks}
        if all(own.values()):
            out.setdefault("oracle", {})[seed] = own
    return out


def average(correct: dict[str, str], tasks: list[str]) -> float:
    """The unweighted mean of the tasks' accuracies."""
    return statistics.mean(accuracy(correct[t]) for t in tasks)


def paired(a: dict, b: dict, tasks: list[str]) -> dict:
    """Difference of average accuracy a - b over the seeds both have (b may be seed-independent: key
    None): mean and sd over seeds, and the paired standard error over questions of the seed-averaged
    difference, sqrt(sum_t var_q(d_t) / n_t) / T, with d_q = a_q - b_q averaged over seeds."""
    seeds = sorted(s for s in a if s in b or None in b)
    if not seeds:
        return {}
    diffs = [average(a[s], tasks) - average(b.get(s, b.get(None)), tasks) for s in seeds]
    var = 0.0
    for t in tasks:
        d = torch.tensor(
            [
                [x - y for x, y in zip(bits(a[s][t]), bits(b.get(s, b.get(None))[t]), strict=True)]
                for s in seeds
            ],
            dtype=torch.float64,
        ).mean(0)  # (questions,)
        var += float(d.var(unbiased=True)) / d.numel() if d.numel() > 1 else 0.0
    return {
        "seeds": len(seeds),
        "mean": statistics.mean(diffs),
        "sd": statistics.stdev(diffs) if len(diffs) > 1 else 0.0,
        "se": math.sqrt(var) / len(tasks),
    }


def compose_table(rows: list[dict], tasks: list[str]) -> str:
    """Accuracy per task and on average per method, and for the routed methods the routing of the
    test questions' tokens (mean over layers): the share of a task's weight on its own expert
    (1/E is uniform) and I(task; expert) in bits."""
    data = compose_correct(rows, tasks)
    methods = [m for m in COMPOSE_ORDER if m in data]
    methods += sorted(m for m in data if m.startswith("multitask_")) + [
        m for m in ["end_to_end"] if m in data
    ]
    head = ["method", "seeds", *tasks, "average", "share to own expert", "I(task; expert), bits"]
    table_rows = []
    for m in methods:
        runs = list(data[m].values())
        label = LABELS.get(
            m, f"(g) multitask LoRA rank {m.split('_r')[-1]}" if m.startswith("multitask") else m
        )
        cells = [label, "-" if m == "base" else str(len(runs))]
        cells += [mean_sd([accuracy(c[t]) for c in runs]) for t in tasks] + [
            mean_sd([average(c, tasks) for c in runs])
        ]
        routed = [
            r for r in rows if r["part"] == "compose" and r["method"] == m and "own_share" in r
        ]
        cells += (
            [
                mean_sd([r["own_share"]["mean"] for r in routed]),
                mean_sd([r["information"]["mean"] for r in routed]),
            ]
            if routed
            else ["-", "-"]
        )
        table_rows.append(cells)
    return "\n".join(markdown_table(head, table_rows))


def pairs_table(rows: list[dict], tasks: list[str]) -> str:
    data = compose_correct(rows, tasks)
    head = [
        "difference of average accuracy",
        "seeds",
        "mean ± sd over seeds",
        "paired SE (questions)",
    ]
    table_rows = []
    for a, b in PAIRS:
        if a in data and b in data:
            p = paired(data[a], data[b], tasks)
            cells = [f"{a} - {b}", str(p["seeds"]), f"{p['mean']:+.3f} ± {p['sd']:.3f}"]
            table_rows.append([*cells, f"{p['se']:.3f}"])
    return "\n".join(markdown_table(head, table_rows))


def layer_share_table(rows: list[dict], method: str = "zero_router", groups: int = 3) -> str:
    """The own-expert share and I(task; expert) per layer, averaged within module kind x depth
    range, over seeds."""
    mine = [
        r for r in rows if r["part"] == "compose" and r["method"] == method and "own_share" in r
    ]
    if not mine:
        return ""
    names = list(mine[0]["own_share"]["per_layer"])
    blocks = [int(next(p for p in n.split(".") if p.isdigit())) for n in names]
    kinds = sorted({n.rsplit(".", 1)[-1] for n in names})
    width = -(-(max(blocks) + 1) // groups)
    head = [
        f"blocks {g * width}-{min((g + 1) * width, max(blocks) + 1) - 1}" for g in range(groups)
    ]
    table_rows = []
    for kind in kinds:
        cells = []
        for g in range(groups):
            chosen = [
                n
                for n, b in zip(names, blocks, strict=True)
                if n.endswith(kind) and b // width == g
            ]
            share = statistics.mean(r["own_share"]["per_layer"][n] for r in mine for n in chosen)
            info = statistics.mean(r["information"]["per_layer"][n] for r in mine for n in chosen)
            cells.append(f"{share:.3f} / {info:.3f}")
        table_rows.append([kind, *cells])
    title = (
        f"`{method}` per layer ({len(mine)} seeds): own-expert share / I(task; expert) bits, mean "
        "over the layers of each cell"
    )
    return "\n".join([title, "", *markdown_table(["module", *head], table_rows)])


def transfer_table(rows: list[dict], tasks: list[str]) -> str:
    data = compose_correct(rows, tasks)
    table_rows = []
    for a in tasks:
        runs = list(data.get(f"adapter:{a}", {}).values())
        if runs:
            table_rows.append([a, *(mean_sd([accuracy(c[t]) for c in runs]) for t in tasks)])
    return "\n".join(markdown_table(["adapter trained on \\ scored on", *tasks], table_rows))


# ---------------------------------------------------------------- continual learning


def continual_matrix(
    rows: list[dict], tasks: list[str], method: str
) -> dict[int, list[list[float | None]]]:
    """seed -> matrix[stage k][task j] accuracy after stage k on task j (None before task j
    arrived). The sequential LoRAs' stage 0 is task 0's own adapter."""
    out: dict[int, list] = {}
    for r in rows:
        if r["part"] == "continual" and r["method"] == method:
            m = out.setdefault(r["seed"], [[None] * len(tasks) for _ in tasks])
            for j, t in enumerate(tasks):
                if t in r["correct"]:
                    m[r["stage"]][j] = accuracy(r["correct"][t])
        if (
            method.startswith("seq_lora")
            and r["part"] == "compose"
            and r["method"] == f"adapter:{tasks[0]}"
        ):
            out.setdefault(r["seed"], [[None] * len(tasks) for _ in tasks])[0][0] = accuracy(
                r["correct"][tasks[0]]
            )
    return {s: m for s, m in out.items() if all(m[-1][j] is not None for j in range(len(tasks)))}


def forgetting(matrix: list[list[float | None]]) -> list[float]:
    """Per task j (all but the last): best accuracy at an earlier stage (j .. K-2) minus
    the final accuracy."""
    K = len(matrix)
    return [max(matrix[k][j] for k in range(j, K - 1)) - matrix[K - 1][j] for j in range(K - 1)]


def continual_methods(rows: list[dict]) -> list[str]:
    """The continual units in the results: the four of every run, then other replay shares
    (e.g. _replay25)."""
    first = ["seq_lora", "seq_lora_replay", "lmoe_add", "lmoe_add_replay"]
    return first + sorted({r["method"] for r in rows if r["part"] == "continual"} - set(first))


def continual_table(rows: list[dict], tasks: list[str]) -> str:
    own = compose_correct(rows, tasks)
    head = [
        "method",
        "seeds",
        "after stage k: average over the tasks seen (k = 0..)",
        "final average",
        *(f"forgetting {t}" for t in tasks[:-1]),
        "new skill at its stage - its own adapter",
    ]
    table_rows = []
    for method in continual_methods(rows):
        mats = continual_matrix(rows, tasks, method)
        if not mats:
            continue
        seeds = sorted(mats)
        per_stage = [
            mean_sd([statistics.mean(mats[s][k][: k + 1]) for s in seeds])
            for k in range(len(tasks))
        ]
        forgets = [forgetting(mats[s]) for s in seeds]
        new = [
            statistics.mean(
                mats[s][k][k] - accuracy(own[f"adapter:{tasks[k]}"][s][tasks[k]])
                for k in range(1, len(tasks))
            )
            for s in seeds
            if all(s in own.get(f"adapter:{t}", {}) for t in tasks)
        ]
        cells = [
            method,
            str(len(seeds)),
            " / ".join(per_stage),
            mean_sd([statistics.mean(mats[s][-1]) for s in seeds]),
        ]
        cells += [mean_sd([f[j] for f in forgets]) for j in range(len(tasks) - 1)] + [mean_sd(new)]
        table_rows.append(cells)
    return "\n".join(markdown_table(head, table_rows))


def write_report(rows: list[dict], args) -> None:
    """Rewrite the study's RESULTS.md section from the rows alone, so that `--report` gives the
    same text from the same raw file; the commands, conditions and commits that recorded the rows
    go in the section before it. Each method's per-stage continual matrix stays in the raw rows."""
    tasks = args.tasks
    n = {t: len(next(iter(rows))["correct"].get(t, "")) for t in tasks} if rows else {}
    text = [
        SECTION,
        "",
        f"From `{args.results}` by `bench/modular.py --report` (how the rows were recorded: the "
        "section before).",
        "",
        f"Settings: rank {args.rank} per task adapter, {args.steps} batches of {args.batch_size} "
        f"per adapter and per stage, lr {args.lr}, routers at 30x, {args.router_items} questions "
        f"per task in the router's mixed set, {args.router_steps} router steps, replay "
        f"{args.replay}; cloze protocol, plain template; n = {n} test questions per task. Mean ± "
        "sd over seeds.",
        "",
        compose_table(rows, tasks),
        "",
        pairs_table(rows, tasks),
        "",
        layer_share_table(rows),
        "",
        "Transfer: each adapter on every task (the diagonal is the oracle).",
        "",
        transfer_table(rows, tasks),
        "",
        "Continual learning, tasks in this order: " + " -> ".join(tasks),
        "",
        continual_table(rows, tasks),
    ]
    print("\n".join(text[4:]), flush=True)
    path = Path(args.out)
    current = path.read_text() if path.is_file() else ""
    path.write_text(replace_section(current, "\n".join(text), SECTION))
