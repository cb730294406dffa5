"""Where does a mixture beat a LoRA of equal parameters? (issue 38, item 2): the study's plan, its
settings for `lmoe compare`, and the driver that will hand them over.

    PYTHONPATH=. .venv/bin/python -m lmoe.data.regimes runs/regimes/data   # the data, seconds
    .venv/bin/python bench/regimes.py --plan              # every compare call's settings (JSON)
    .venv/bin/python bench/regimes.py --count             # trainable parameters (loads the model)
    flock /tmp/lmoe-heavy.lock .venv/bin/python bench/regimes.py --run --regimes conflict
    .venv/bin/python bench/regimes.py --report            # bench/RESULTS.md's section

The plan
--------
Data (lmoe.data.regimes, data seed 0): train and test disjoint by input across every regime; each
record's "domain" is its mapping, task or skill, so the tables have a row per domain.

Shared by every run: the built-in SmolLM2-135M-Instruct; adapters on q_proj, v_proj, up_proj;
scale alpha / r = 2 everywhere; AdamW at lr 2e-3 (the default run's), 10 warm-up steps, cosine
decay; batch 8; max_length 128; routers at lmoe's default rate (router_param_scale 30) and
balance weights; seeds 0 1 2, each the same initialisation seed and data order for every method.
`lmoe compare` scores the same test items for every method and seed and gives each mixture's
difference from its LoRA with the paired standard error over items.

Binding size: 4 experts of rank 1 (alpha 2) against LoRA rank 4 (alpha 8): the experts' A and B
are exactly a rank-4 LoRA's (483,840 parameters). The routers add d_in x E per adapted layer
(207,360 more: 691,200 for softmax, top-2, ReMix; the dynamic router's shared lambda head 36,993
more again: 728,193), so the LoRA that `lmoe compare` matches by total count is rank 6 (725,760),
not 4 (`--count`, lmoe's count_parameters on the built-in model, PEFT LoRA for the LoRAs).
Every regime runs compare's nearest-count LoRA; conflict also LoRA rank 4 (`lora_rank=4`, equal
experts; that call reuses the first call's mixture runs).

Mixtures (ROUTERS): softmax composed by parameters and by outputs, top-2, LD-MoLE's dynamic router
(balance 1.0, no sparsity loss), ReMix's (k = 2).

(a) conflict: 4 domains (reverse, initials, sorted, last_twice) behind opaque codes; 300 inputs
    x 4 domains = 1200 training records, 150 steps x 8 = one epoch; test 50 inputs x 4 = 200
    items, greedy exact match and answer perplexity. Every router above; 7 methods x 3 seeds.
(b) tasks_2, tasks_4, tasks_8, tasks_16: 480 training records in all (480 / N per task), 60
    steps x 8 = one epoch (sized so that 3 seeds fit the study's CPU budget); test 240 items in
    all (240 / N per task). softmax (params) and its LoRA: 2 methods x 3 seeds x 4 counts.
(c) retention: the `add` skill, 2400 training records, 300 steps x 8 (one epoch); scored on its
    200 test items (exact match), ARC-Easy, PIQA and HellaSwag (lm-eval's cloze protocol, plain
    text, 200 test questions each: a fixed hash subset of each test side) and the built-in
    conversations' test side (172 pairs, answer perplexity), max_length 512. The base model
    alone is scored on the same items once (compare's base=true), and each method paired with it:
    what the narrow task cost elsewhere. softmax (params) and its LoRA, 3 seeds.
    Widen (b) and (c) to top-2 and ReMix (Regime.mixtures) where (a) shows a router worth it
    and the budget allows.

n and standard errors: exact match on n = 200 (240) items at p = 0.5 has a standard error of
0.035 (0.032) per run; the paired difference's is smaller where the methods agree item by item.
ARC-E / PIQA / HellaSwag at n = 200: about 0.035 each.

Time: `--plan` prints the estimate from the calls' runs, steps and test sets, and the costs
S_PER_STEP, EVAL_S and MC_S (bench/README.md, regimes row, says where they come from).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a file: the repo root


TARGETS = ["q_proj", "v_proj", "up_proj"]
SEEDS = [0, 1, 2]
BINDING = {"lmoe.num_experts": 4, "lmoe.rank": 1, "lmoe.alpha": 2, "lmoe.target_modules": TARGETS}
EXPERT_EQUAL_RANK = 4  # LoRA rank 4: the same A and B as 4 experts of rank 1
ROUTERS = {  # name -> the lmoe.* settings atop BINDING
    "softmax_params": {"lmoe.router": "softmax", "lmoe.composition": "params"},
    "softmax_outputs": {"lmoe.router": "softmax", "lmoe.composition": "outputs"},
    "top2": {"lmoe.router": "topk", "lmoe.top_k": 2, "lmoe.composition": "params"},
    "dynamic": {"lmoe.router": "dynamic", "lmoe.composition": "params"},
    "remix": {"lmoe.router": "remix", "lmoe.top_k": 2, "lmoe.composition": "params"},
}
RETENTION_BENCHMARKS = ["bench:arc_easy", "bench:piqa", "bench:hellaswag"]
# the estimate's costs on 2 idle CPU cores, 2 threads (bench/README.md, regimes row): conflict's
# runs took 1.9-2.3 s a step (ReMix 4.0, counted as 2 runs) and 35-40 s to score the test file;
# retention's 600 benchmark questions 4.5 min a run (ARC-E 0.25 s, PIQA 0.4, HellaSwag 0.65)
S_PER_STEP, EVAL_S, MC_S = 2.1, 40.0, 0.45
REMIX_STEP_COST = 2  # a ReMix step costs about two (two routings per sequence)
RETENTION_MC = {"protocol": "cloze", "template": "plain", "test_items": 200}


@dataclass
class Regime:
    """One regime's runs: its data folder (under the data directory), steps and mixtures."""

    folder: str
    steps: int
    mixtures: list[str]
    extra_eval: list[str] = field(default_factory=list)  # beside DATA/folder/test.jsonl
    lora_ranks: tuple = (None,)  # one compare call each: None, compare's nearest count; 4, ...
    train: dict = field(default_factory=dict)  # other TrainConfig settings
    base: bool = False  # also score the base model alone (compare's base=true)


REGIMES = {
    "conflict": Regime("conflict", 150, list(ROUTERS), lora_ranks=(None, EXPERT_EQUAL_RANK)),
    **{f"tasks_{n}": Regime(f"tasks_{n}", 60, ["softmax_params"]) for n in (2, 4, 8, 16)},
    "retention": Regime(
        "retention",
        300,
        ["softmax_params"],
        extra_eval=[*RETENTION_BENCHMARKS, "conversations_test.jsonl"],
        # exact match for the skill's answers (3 tokens at most), not the conversations' replies;
        # max_length 512 (the skill's records are short): a PIQA choice alone is 138 tokens
        train={"mc": RETENTION_MC, "eval_max_answer_tokens": 8, "max_length": 512},
        base=True,
    ),
}


def run_regime(
    name: str,
    data_dir: str | Path = "runs/regimes/data",
    out_dir: str | Path = "runs/regimes",
    seeds: list[int] = SEEDS,
    lora_rank: int | None = None,
) -> dict:
    """`lmoe compare`'s settings (CompareConfig fields) for one regime: the shared training
    settings, the held-out data and one dict of lmoe.* settings per mixture.

    Args:
        name: a key of REGIMES.
        data_dir: where `python -m lmoe.data.regimes` wrote the data.
        out_dir: the study's folder; the regime's runs go in out_dir/name.
        seeds: one run per method and seed.
        lora_rank: None: compare's LoRA of the nearest total count; 4: the experts' equal.

    Returns:
        A dict for lmoe.compare's CompareConfig.from_dict.
    """
    if name not in REGIMES:
        raise ValueError(f"Unknown regime {name!r}; known: {', '.join(REGIMES)}.")
    regime, folder = REGIMES[name], Path(data_dir) / REGIMES[name].folder
    extra = [e if e.startswith("bench:") else str(folder / e) for e in regime.extra_eval]
    return {
        "model": "builtin",
        "data": [str(folder / "train.jsonl")],
        "eval_data": [str(folder / "test.jsonl"), *extra],
        "steps": regime.steps,
        "lr": 2e-3,
        "batch_size": 8,
        "seeds": list(seeds),
        "mixtures": {m: {**BINDING, **ROUTERS[m]} for m in regime.mixtures},
        "lora_target_modules": TARGETS,
        "lora_rank": lora_rank,
        "base": regime.base,
        "train": {"warmup_steps": 10, "max_length": 128, **copy.deepcopy(regime.train)},
        "output_dir": str(Path(out_dir) / name),
    }


def study_calls(names: list[str], data_dir, out_dir, seeds) -> dict[str, dict]:
    """Every compare call of the study, in order: per regime the nearest-count LoRA, then (conflict)
    the rank-4 one (the second call reuses the first's mixture runs)."""
    calls = {}
    for name in names:
        for rank in REGIMES[name].lora_ranks:
            label = f"{name}_{'nearest' if rank is None else f'r{rank}'}"
            calls[label] = run_regime(name, data_dir, out_dir, seeds, rank)
    return calls


def estimate_hours(calls: dict[str, dict], s_per_step: float, eval_s: float, mc_s: float) -> float:
    """Hours of the study, one run at a time: every (method, seed) run once (a rank-4 call adds
    its LoRA only), its steps at s_per_step (ReMix's at REMIX_STEP_COST times that), its test file
    in eval_s, and mc_s per multiple-choice question; the base model's scoring once per call.

    Args:
        calls: study_calls' result.
        s_per_step: seconds per training step.
        eval_s: seconds to score one run's test file (exact match and perplexity).
        mc_s: seconds per multiple-choice question scored (the retention benchmarks).
    """
    seconds = 0.0
    for label, call in calls.items():
        reused = label.endswith(f"_r{EXPERT_EQUAL_RANK}")  # its mixtures are the first call's
        mixtures = [] if reused else list(call["mixtures"].values())
        trained = 1 + sum(REMIX_STEP_COST if m["lmoe.router"] == "remix" else 1 for m in mixtures)
        questions = len([e for e in call["eval_data"] if e.startswith("bench:")]) * (
            call["train"].get("mc", {}).get("test_items", 0)
        )
        scoring = eval_s + questions * mc_s  # one run's held-out data
        per_seed = trained * call["steps"] * s_per_step + (1 + len(mixtures)) * scoring
        seconds += len(call["seeds"]) * per_seed + (scoring if call["base"] else 0)
    return seconds / 3600


def finished_calls(results: Path) -> set[str]:
    """The calls with a line in the results file (a rerun skips them)."""
    if not results.is_file():
        return set()
    lines = results.read_text(encoding="utf-8").splitlines()
    return {json.loads(line)["call"] for line in lines if line.strip()}


def run_compare(settings: dict) -> dict:
    """One `lmoe compare` call with the study's settings."""
    from lmoe.compare import CompareConfig, compare

    return compare(CompareConfig.from_dict(settings))


def count_trainable() -> dict[str, int]:
    """Trainable parameters per method on the built-in model, by lmoe's count_parameters: each
    mixture injected, and a PEFT LoRA of rank 4 and 6 on the same layers."""
    from peft import LoraConfig, get_peft_model

    from lmoe import LMoEConfig, count_parameters, inject
    from lmoe.models import load_model
    from lmoe.training.config import DEFAULT_LMOE

    base = load_model("builtin")[0]
    counts = {}
    for rank in (EXPERT_EQUAL_RANK, 5, 6):
        lora = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS)
        counts[f"peft_lora_r{rank}"] = count_parameters(get_peft_model(copy.deepcopy(base), lora))[
            0
        ]
    for name in ROUTERS:
        settings = {k.removeprefix("lmoe."): v for k, v in {**BINDING, **ROUTERS[name]}.items()}
        cfg = LMoEConfig(**{**DEFAULT_LMOE, **settings})
        counts[name] = count_parameters(inject(copy.deepcopy(base), cfg))[0]
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=list(REGIMES))
    parser.add_argument("--seeds", nargs="+", type=int, default=SEEDS)
    parser.add_argument("--data", default="runs/regimes/data", help="lmoe.data.regimes' folder")
    parser.add_argument("--out", default="runs/regimes", help="the runs and reports")
    parser.add_argument(
        "--results", default="bench/results/regimes.jsonl", help="one line per finished call"
    )
    # the --plan estimate's costs: bench/README.md's measurement (regimes row)
    parser.add_argument("--s-per-step", type=float, default=S_PER_STEP)
    parser.add_argument("--eval-s", type=float, default=EVAL_S)
    parser.add_argument("--mc-s", type=float, default=MC_S)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--plan", action="store_true", help="print the settings of every call")
    what.add_argument("--count", action="store_true", help="trainable parameters per method")
    what.add_argument("--run", action="store_true", help="run the study through lmoe compare")
    what.add_argument(
        "--report", action="store_true", help="rewrite --out-file's section from --results"
    )
    parser.add_argument("--out-file", default="bench/RESULTS.md", help="where --report writes")
    args = parser.parse_args()
    calls = study_calls(args.regimes, args.data, args.out, args.seeds)
    if args.plan:
        print(json.dumps(calls, indent=2))
        hours = estimate_hours(calls, args.s_per_step, args.eval_s, args.mc_s)
        print(
            f"estimate: {hours:.1f} h, one run at a time, at {args.s_per_step} s/step, "
            f"{args.eval_s} s per test file, {args.mc_s} s per benchmark question"
        )
    elif args.report:
        from bench.regimes_report import write_report

        write_report(Path(args.results), Path(args.out_file))
    elif args.count:
        for name, count in count_trainable().items():
            print(f"{name:18s} {count:>10,}")
    else:
        done = finished_calls(Path(args.results))
        for name, settings in calls.items():
            if name in done:
                print(f"{name}: in {args.results}, skipped")
                continue
            report = run_compare(settings)
            line = json.dumps({"call": name, "settings": settings, "report": report})
            with open(args.results, "a", encoding="utf-8") as f:  # as it comes: a stop loses little
                f.write(line + "\n")


if __name__ == "__main__":
    main()
