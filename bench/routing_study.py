"""What makes routing learn (issue 16): train the built-in mixture under named settings and seeds,
and record quality (exact match per skill, answer perplexity per domain) beside routing
specialisation (mutual information I(domain; expert), normalised entropy, top-weight share, active
experts) on the held-out answer tokens.

    .venv/bin/python bench/routing_study.py --configs lr_x30 lora_r16 --seeds 0 1 2
    # rewrite the RESULTS.md section from the results
    .venv/bin/python bench/routing_study.py --report

Each finished (config, seed) is appended to --results (JSON lines) at once, so a stopped study loses
at most the run in progress; a rerun skips what is there. A setting is a list of TrainConfig
overrides on top of the default run. lmoe compare trains and scores each run (lmoe.compare.given,
run_method; kept in --work-dir/NAME) and its rows keep the per-item scores, so the table pairs each
setting with its LoRA: difference and paired standard error over the held-out items (rows recorded
before have none: '-'; a table without such rows has no paired columns).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(
    0, str(Path(__file__).resolve().parent.parent)
)  # run as a file: the repository root
from bench.common import markdown_table, mean_sd, replace_section  # noqa: E402

SECTION = "## Routing study"
# bits: a layer whose routing says (almost) nothing about the domain, one expert for all or uniform
COLLAPSED = 0.01
LORA = [
    "lmoe.num_experts=1",
    "lmoe.rank=16",
    "lmoe.alpha=32",
]  # rank E*r of the default mixture (4 x 4)
OUTPUTS = ["lmoe.composition=outputs"]
LB_0_01 = [
    "lmoe.load_balance_coef=0.01"
]  # the softmax gate's balance weight before this study chose 0.1
# name -> overrides of the default run (4 experts of rank 4, alpha 8, q/v/up_proj, params, softmax,
# lr 2e-3); each names its router rate (parameter group and parameter scale) and balance weight, so
# the rows keep their meaning whatever the default. Rows recorded before
# router_param_scale existed ran at 1.
PARAM_1 = ["lmoe.router_param_scale=1"]
# the LoRA of a setting's expert parameters, its paired columns' baseline (else lora_r16)
LORA_OF = {"recipe_ld-mole": "lora_r64_seven"}
CONFIGS: dict[str, list[str]] = {
    # the routers at the experts' rate (the default before this study)
    "lr_x1": ["router_lr_scale=1", *PARAM_1] + LB_0_01,
    "lora_r16": LORA,
    "lr_x10": ["router_lr_scale=10", *PARAM_1] + LB_0_01,
    "lr_x30": ["router_lr_scale=30", *PARAM_1] + LB_0_01,
    "lr_x100": ["router_lr_scale=100", *PARAM_1] + LB_0_01,
    "init_0.1": ["lmoe.router_init_std=0.1", "router_lr_scale=1", *PARAM_1] + LB_0_01,
    "init_0.1_lr_x30": ["lmoe.router_init_std=0.1", "router_lr_scale=30", *PARAM_1] + LB_0_01,
    "temp_0.3_lr_x30": ["lmoe.temperature=0.3", "router_lr_scale=30", *PARAM_1] + LB_0_01,
    "top2_lr_x30": ["lmoe.router=topk", "lmoe.top_k=2", "router_lr_scale=30", *PARAM_1],
    "top1_lr_x30": ["lmoe.router=topk", "lmoe.top_k=1", "router_lr_scale=30", *PARAM_1],
    "outputs": OUTPUTS + ["router_lr_scale=1", *PARAM_1] + LB_0_01,
    "outputs_lr_x30": OUTPUTS + ["router_lr_scale=30", *PARAM_1] + LB_0_01,
    "outputs_top2_lr_x30": OUTPUTS
    + ["lmoe.router=topk", "lmoe.top_k=2", "router_lr_scale=30", *PARAM_1],
    "lb_0_lr_x30": ["lmoe.load_balance_coef=0", "router_lr_scale=30", *PARAM_1],
    "lb_0.1_lr_x30": ["lmoe.load_balance_coef=0.1", "router_lr_scale=30", *PARAM_1],
    # the default since: the routers at 30x through their parameter scale, one learning rate
    "lb_0.1_param_scale_30": [
        "lmoe.load_balance_coef=0.1",
        "router_lr_scale=1",
        "lmoe.router_param_scale=30",
    ],
    # the collapse study's routers at lmoe train's defaults: top-2 (load balance 0.01) and
    # ReMix's (k = 2, equal weights, RLOO with 2 drawn routings per sequence, no balance loss)
    "top2": ["lmoe.router=topk", "lmoe.top_k=2", "router_lr_scale=1", "lmoe.router_param_scale=30"],
    "remix_k2": [
        "lmoe.router=remix",
        "lmoe.top_k=2",
        "router_lr_scale=1",
        "lmoe.router_param_scale=30",
    ],
    "zloss_0.01_lr_x30": ["lmoe.z_loss_coef=0.01", "router_lr_scale=30", *PARAM_1] + LB_0_01,
    "anneal_3to1_lb_0.1_lr_x30": [
        "temperature_start=3",
        "temperature_anneal_steps=75",
        "lmoe.load_balance_coef=0.1",
        "router_lr_scale=30",
        *PARAM_1,
    ],
    "dynamic": ["lmoe.router=dynamic", "router_lr_scale=1", *PARAM_1],
    "dynamic_sparsity": [
        "lmoe.router=dynamic",
        "lmoe.sparsity_coef=1.0",
        "router_lr_scale=1",
        *PARAM_1,
    ],
    "dynamic_lr_x30": ["lmoe.router=dynamic", "router_lr_scale=30", *PARAM_1],
    "dynamic_sparsity_lr_x30": [
        "lmoe.router=dynamic",
        "lmoe.sparsity_coef=1.0",
        "router_lr_scale=30",
        *PARAM_1,
    ],
    "dynamic_sparsity_k1_lr_x30": [
        "lmoe.router=dynamic",
        "lmoe.sparsity_coef=1.0",
        "lmoe.sparsity_target=1",
        "router_lr_scale=30",
        *PARAM_1,
    ],
    "dynamic_sparsity_k3_lr_x30": [
        "lmoe.router=dynamic",
        "lmoe.sparsity_coef=1.0",
        "lmoe.sparsity_target=3",
        "router_lr_scale=30",
        *PARAM_1,
    ],
    "dynamic_sparsity_lambda0_lr_x30": [
        "lmoe.router=dynamic",
        "lmoe.sparsity_coef=1.0",
        "lmoe.lambda_bias_init=0",
        "router_lr_scale=30",
        *PARAM_1,
    ],
    "dynamic_sparsity_0.1_lr_x30": [
        "lmoe.router=dynamic",
        "lmoe.sparsity_coef=0.1",
        "router_lr_scale=30",
        *PARAM_1,
    ],
    # the LD-MoLE authors' settings (E=8 r=8, seven projections), routers at 30x
    "recipe_ld-mole": ["recipe=ld-mole", "router_lr_scale=30", *PARAM_1],
    "lora_r64_seven": [
        "lmoe.num_experts=1",
        "lmoe.rank=64",
        "lmoe.alpha=128",
        "lmoe.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]",
    ],
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--configs",
        nargs="+",
        default=["lr_x30", "lora_r16"],
        metavar="NAME",
        help=f"settings to run, of: {', '.join(CONFIGS)}",
    )
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument(
        "--extra", nargs="*", default=[], help="overrides added to every run (e.g. steps=100)"
    )
    p.add_argument("--results", default="bench/results/routing_study.jsonl")
    p.add_argument("--work-dir", default="runs/study")
    p.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: torch's)"
    )
    p.add_argument(
        "--report", action="store_true", help="only rewrite the RESULTS.md section from --results"
    )
    p.add_argument("--out", default="bench/RESULTS.md")
    return p.parse_args(argv)


def run_name(config: str, seed: int, extra: list[str]) -> str:
    return f"{config}-s{seed}" + (
        "-" + "-".join(e.replace("=", "") for e in extra) if extra else ""
    )


def run_one(args: argparse.Namespace, config: str, seed: int) -> dict:
    """Train and score one (setting, seed) through lmoe compare (its run kept in
    work-dir/NAME/result.json, per-item scores and all); the row the report reads."""
    from lmoe.compare.given import given_method
    from lmoe.compare.items import group_values
    from lmoe.compare.runs import run_method
    from lmoe.training.config import TrainConfig

    name = run_name(config, seed, args.extra)
    overrides = [
        f"output_dir={Path(args.work_dir) / name}",
        "compare_base=false",
        f"seed={seed}",
        "save_every=0",
        *CONFIGS[config],
        *args.extra,
    ]
    cfg, method = given_method(TrainConfig.from_file(None, overrides), config, args.work_dir)
    result = run_method(cfg, method, seed, Path(args.work_dir) / name)
    metrics = result["metrics"]
    row = {
        "name": name,
        "config": config,
        "seed": seed,
        "overrides": overrides[1:],
        "extra": list(args.extra),
        "kind": result["kind"],  # "mixture" or "lora"
        # lmoe train's results from the items: exact match per skill, perplexity per domain
        "results": {key: group_values(metric) for key, metric in metrics.items()},
        "wall_s": result.get("wall_s"),  # (runs kept by an earlier lmoe compare lack it)
        "s_per_step": result["s_per_step"],
        "trainable": result["trainable"],
        "steps": cfg.steps,
        "metrics": metrics,  # per item: the paired differences from the LoRA
    }
    if result.get("routing"):  # measured on the held-out answer tokens (routing.json per layer)
        row["routing"], row["routing_layers"] = result["routing"], result["routing_layers"]
    return row


def done_names(path: Path) -> set[str]:
    if not path.is_file():
        return set()
    return {json.loads(line)["name"] for line in path.read_text().splitlines() if line.strip()}


# ---------------------------------------------------------------- report


def summarise(rows: list[dict]) -> list[dict]:
    """One entry per (config, extra overrides): metric -> list over seeds."""
    groups: dict[tuple, dict] = {}
    for r in rows:
        key = (
            r["config"],
            tuple(o for o in r["overrides"] if not o.startswith(("seed=", "output_dir="))),
        )
        g = groups.setdefault(
            key,
            {
                "config": r["config"],
                "overrides": list(key[1]),
                "seeds": [],
                "em": [],
                "ppl": [],
                "mi": [],
                "entropy": [],
                "top50": [],
                "active": [],
                "ess": [],
                "collapsed": [],
                "s_step": [],
                "runs": [],
            },
        )
        g["runs"].append(r)
        em, ppl = r["results"].get("exact_match", {}), r["results"].get("perplexity", {})
        g["seeds"].append(r["seed"])
        g["em"].append(sum(em.values()) / len(em))
        g["ppl"].append(
            math.exp(sum(math.log(v) for v in ppl.values()) / len(ppl))
        )  # geometric mean
        g["s_step"].append(r["s_per_step"])
        rt = r.get("routing")
        if rt:
            for key, name in (
                ("mi", "mutual_information_bits"),
                ("entropy", "routing_entropy"),
                ("top50", "top_weight_over_half"),
                ("active", "mean_active_experts"),
            ):
                g[key].append(rt[name])
            if "effective_support_size" in rt:  # recorded from when lmoe measured it
                g["ess"].append(rt["effective_support_size"])
            g["collapsed"].append(
                sum(v["mutual_information_bits"] < COLLAPSED for v in r["routing_layers"].values())
            )
    order = list(CONFIGS)  # the table in CONFIGS' order, a setting's longer runs after it
    return sorted(
        groups.values(),
        key=lambda g: order.index(g["config"]) if g["config"] in order else len(order),
    )


def paired_cells(group: dict, rows: list[dict]) -> list[str]:
    """EM and log perplexity (pooled over answer tokens) minus those of the setting's LoRA, with
    their paired standard errors over items (lmoe compare's), from the seeds both ran with per-item
    scores and the same extra overrides; '-' for a LoRA and for rows recorded without items."""
    from lmoe.compare.stats import difference_cell, pair_runs

    mine = [r for r in group["runs"] if "metrics" in r]
    if not mine or mine[0]["kind"] == "lora":
        return ["-", "-"]
    lora = LORA_OF.get(group["config"], "lora_r16")
    theirs = [r for r in rows if r["config"] == lora and r.get("extra") == mine[0].get("extra")]
    pairs = pair_runs(mine, theirs)
    return [difference_cell(pairs.get(metric)) for metric in ("exact_match", "perplexity")]


def format_table(rows: list[dict]) -> str:
    paired = any("metrics" in r for r in rows)  # rows recorded before lmoe compare have none
    head = [
        "setting",
        "overrides",
        "seeds",
        "EM mean",
        "ppl (geo. mean)",
        "I(domain; expert) bits",
        "entropy / log E",
        "share top > 0.5",
        "effective support size",
        "active experts",
        f"layers with I < {COLLAPSED}",
        "s/step",
    ] + (["EM - LoRA (paired SE)", "log ppl - LoRA (paired SE)"] if paired else [])
    table_rows = []
    for g in summarise(rows):
        over = (
            " ".join(o for o in g["overrides"] if not o.startswith(("compare_base", "save_every")))
            or "(none)"
        )
        cells = [
            g["config"],
            f"`{over}`",
            str(len(g["seeds"])),
            mean_sd(g["em"]),
            mean_sd(g["ppl"]),
            mean_sd(g["mi"]),
            mean_sd(g["entropy"]),
            mean_sd(g["top50"]),
            mean_sd(g["ess"]),
            mean_sd(g["active"]),
            " / ".join(map(str, g["collapsed"])) or "-",
            f"{statistics.mean(g['s_step']):.2f}",
        ] + (paired_cells(g, rows) if paired else [])
        table_rows.append(cells)
    return "\n".join(markdown_table(head, table_rows))


def write_report(results: Path, out: Path, note: str = "") -> None:
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    body = (
        [SECTION, "", note, "", format_table(rows), ""]
        if note
        else [SECTION, "", format_table(rows), ""]
    )
    text = out.read_text() if out.is_file() else ""
    out.write_text(replace_section(text, "\n".join(body), SECTION))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    results = Path(args.results)
    if args.report:
        write_report(results, Path(args.out))
        return
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown:
        raise SystemExit(f"routing_study: unknown settings {unknown}; known: {', '.join(CONFIGS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    results.parent.mkdir(parents=True, exist_ok=True)
    for config in args.configs:
        for seed in args.seeds:
            if run_name(config, seed, args.extra) in done_names(results):
                continue
            print(f"routing_study: {config} seed {seed} {' '.join(args.extra)}", flush=True)
            row = run_one(args, config, seed)
            row["command"] = shlex.join(
                [".venv/bin/python", "bench/routing_study.py", *sys.argv[1:]]
            )
            row["load_average"] = os.getloadavg()
            with open(results, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(
                json.dumps({k: row.get(k) for k in ("name", "wall_s", "s_per_step", "routing")}),
                flush=True,
            )


if __name__ == "__main__":
    main()
