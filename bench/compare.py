"""Built-in comparison at equal trainable parameters (issue 3 item 8, issue 4 item 5).

Single LoRA (E=1, rank E*r) against L-MoE (E experts of rank r) on the built-in model and mixture:
params vs outputs composition, softmax vs top-2 vs dynamic (LD-MoLE) routing. Every config trains
with the same steps, lr, batch, seed and target modules; only `lmoe.*` differs. The base model is
evaluated once. Per config: exact match per skill, held-out perplexity per domain, trainable
parameters, wall time, and (E > 1) mean active experts per token per layer on held-out batches.

    .venv/bin/python bench/compare.py                       # all configs, default run length
    .venv/bin/python bench/compare.py --steps 60 --configs lora_r16 params_softmax --test-per-skill 10

Results are kept one config at a time (JSON in --work-dir) and the section "## Built-in comparison"
of --out (bench/RESULTS.md) is rewritten after each finished config, so an interrupted run keeps
what it finished; rerunning the same command continues from there.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

SECTION = "## Built-in comparison"
TARGETS = ["q_proj", "v_proj"]
# name -> lmoe overrides; alpha = 2 * rank everywhere (LoRA scale 2), E * r = 16 everywhere
CONFIGS = {
    "lora_r16": {"num_experts": 1, "rank": 16, "alpha": 32, "composition": "params", "router": "softmax"},
    "params_softmax": {"num_experts": 4, "rank": 4, "alpha": 8, "composition": "params", "router": "softmax"},
    "outputs_softmax": {"num_experts": 4, "rank": 4, "alpha": 8, "composition": "outputs", "router": "softmax"},
    "params_top2": {"num_experts": 4, "rank": 4, "alpha": 8, "composition": "params", "router": "topk", "top_k": 2},
    "outputs_top2": {"num_experts": 4, "rank": 4, "alpha": 8, "composition": "outputs", "router": "topk", "top_k": 2},
    "params_dynamic": {"num_experts": 4, "rank": 4, "alpha": 8, "composition": "params", "router": "dynamic"},
    "outputs_dynamic": {"num_experts": 4, "rank": 4, "alpha": 8, "composition": "outputs", "router": "dynamic"},
    "params_dynamic_h512": {"num_experts": 4, "rank": 4, "alpha": 8, "composition": "params", "router": "dynamic",
                            "lambda_hidden": 512},  # the authors' run.sh width (for Llama-3.2-3B), not the default 64
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=150, help="training steps per config (default: the main run's 150)")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS), metavar="NAME",
                   help=f"subset of: {', '.join(CONFIGS)}")
    p.add_argument("--out", default="bench/RESULTS.md", help="markdown file whose comparison section is rewritten")
    p.add_argument("--work-dir", default="runs/compare", help="per-config run dirs and results.json")
    p.add_argument("--test-per-skill", type=int, default=30, help="held-out items per skill (exact match)")
    p.add_argument("--test-per-domain", type=int, default=30, help="held-out pairs per conversation domain")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--note", default="", help="text put under the section title (machine, load, ...)")
    p.add_argument("--fresh", action="store_true", help="ignore results already in --work-dir/results.json")
    return p.parse_args(argv)


def overrides(args: argparse.Namespace, name: str) -> list[str]:
    """TrainConfig overrides shared by every config, plus the config's own lmoe.* keys."""
    common = [f"steps={args.steps}", f"output_dir={Path(args.work_dir) / name}", "compare_base=false",
              f"mixture.test_per_skill={args.test_per_skill}", f"mixture.test_per_domain={args.test_per_domain}",
              f"lmoe.target_modules=[{', '.join(TARGETS)}]"]  # the recorded table used q/v
    return common + [f"lmoe.{k}={v}" for k, v in CONFIGS[name].items()]


# ---------------------------------------------------------------- running

def heldout_batches(cfg, tokenizer) -> list[dict]:
    """Every held-out example of the mixture (conversations and skills, answers included), padded."""
    from lmoe.evaluation.analysis import batches_by_domain
    from lmoe.data.encoding import encode_all

    records = cfg.mixture.conversations("test") + cfg.mixture.skill_items("test")
    examples = encode_all(tokenizer, records, cfg.max_length)
    return [b for batches in batches_by_domain(examples, tokenizer.pad_token_id).values() for b in batches]


def run_base(args: argparse.Namespace) -> dict:
    from lmoe.models import load_model
    from lmoe.training.config import TrainConfig
    from lmoe.training.evaluation import evaluate_all

    cfg = TrainConfig.from_file(None, overrides(args, "lora_r16"))
    model, tokenizer = load_model(cfg.model)
    start = time.perf_counter()
    results = evaluate_all(model, tokenizer, cfg)
    return {"name": "base", "results": results, "eval_s": time.perf_counter() - start}


def run_config(args: argparse.Namespace, name: str) -> dict:
    from lmoe.evaluation.analysis import mean_active_experts
    from lmoe.inject import count_parameters
    from lmoe.training.config import TrainConfig
    from lmoe.training.loop import train
    from lmoe.training.metrics_log import read_metrics

    cfg = TrainConfig.from_file(None, overrides(args, name))
    start = time.perf_counter()
    result = train(cfg)
    wall = time.perf_counter() - start
    row = {"name": name, "lmoe": CONFIGS[name], "results": result.results["trained"], "wall_s": wall,
           "train_s": read_metrics(cfg.output_dir)[-1]["elapsed_s"],
           "trainable": count_parameters(result.model)[0]}
    if CONFIGS[name]["num_experts"] > 1:
        active = list(mean_active_experts(result.model, heldout_batches(cfg, result.tokenizer)).values())
        row["active"] = {"mean": sum(active) / len(active), "min": min(active), "max": max(active)}
    return row


# ---------------------------------------------------------------- reporting

def describe(row: dict) -> str:
    c = row.get("lmoe")
    if not c:
        return "base model (no adapter)"
    if c["num_experts"] == 1:
        return f"LoRA r={c['rank']}"
    router = f"top-{c['top_k']}" if c["router"] == "topk" else c["router"]
    if "lambda_hidden" in c:
        router += f" (lambda head {c['lambda_hidden']})"
    return f"{c['num_experts']}x r={c['rank']} {c['composition']} / {router}"


def format_table(rows: list[dict], steps: int) -> str:
    """Markdown table: one row per config; exact match per skill, perplexity per domain, params, time, routing."""
    skills = sorted({s for r in rows for s in r["results"].get("exact_match", {})})
    domains = sorted({d for r in rows for d in r["results"].get("perplexity", {})})
    head = (["config", "trainable params"] + [f"EM {s}" for s in skills] + ["EM mean"]
            + [f"ppl {d.split('/')[-1]}" for d in domains] + ["ppl mean", "train s", "s/step", "wall s",
                                                              "active experts mean (min-max over layers)"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        em, ppl = r["results"].get("exact_match", {}), r["results"].get("perplexity", {})
        cells = [f"{r['name']}: {describe(r)}", f"{r['trainable']:,}" if "trainable" in r else "-"]
        cells += [f"{em[s]:.2f}" if s in em else "-" for s in skills]
        cells += [f"{sum(em.values()) / len(em):.3f}" if em else "-"]
        cells += [f"{ppl[d]:.2f}" if d in ppl else "-" for d in domains]
        cells += [f"{sum(ppl.values()) / len(ppl):.2f}" if ppl else "-"]
        if "train_s" in r:
            cells += [f"{r['train_s']:.0f}", f"{r['train_s'] / steps:.2f}", f"{r['wall_s']:.0f}"]
        else:
            cells += ["-", "-", f"{r['eval_s']:.0f} (eval)"]
        a = r.get("active")
        cells += [f"{a['mean']:.2f} ({a['min']:.2f}-{a['max']:.2f})" if a else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def section(rows: list[dict], args: argparse.Namespace, command: str) -> str:
    load = os.getloadavg()
    lines = [SECTION, "",
             "Equal trainable parameters (E·r = 16, alpha = 2r, experts on q_proj and v_proj of all 30 blocks) on the built-in model and mixture: "
             "`bench/compare.py`. Same steps, lr, batch, seed and target modules for every config "
             "(TrainConfig defaults otherwise). EM = greedy exact match on held-out skill items; ppl = "
             "held-out answer perplexity per conversation domain; active experts = mean number of experts "
             "with g > 0 per real token on the held-out batches, per layer (mean over layers, min-max across layers). "
             "train s: the training loop (metrics.csv elapsed_s); wall s: the whole train() call (model load, "
             "training, saving, held-out evaluation).",
             "", f"Command: `{command}`", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
             f"{torch.get_num_threads()} torch threads; load average when this table was written: "
             f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1 / 5 / 15 min). "
             f"Written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.", ""]
    if args.note:
        lines += [args.note, ""]
    lines += [format_table(rows, args.steps), ""]
    return "\n".join(lines)


def replace_section(text: str, new: str, title: str = SECTION) -> str:
    """text with the `title` block (up to the next '## ' heading) replaced by new, or new appended."""
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == title), None)
    if start is None:
        return text.rstrip("\n") + "\n\n\n" + new.rstrip("\n") + "\n"
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    tail = "".join(lines[end:])
    return "".join(lines[:start]) + new.rstrip("\n") + "\n" + ("\n\n" + tail if tail else "")


def write_report(rows: list[dict], args: argparse.Namespace, command: str) -> None:
    new = section(rows, args, command)
    path = Path(args.out)
    text = path.read_text() if path.is_file() else ""  # re-read: others edit other sections meanwhile
    path.write_text(replace_section(text, new))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    given = sys.argv[1:] if argv is None else argv
    if "--note" in given:  # the note is printed under the title; the command line stays short
        i = given.index("--note")
        given = given[:i] + given[i + 2:]
    command = shlex.join([".venv/bin/python", "bench/compare.py", *given])
    store = Path(args.work_dir) / "results.json"
    settings = {"steps": args.steps, "test_per_skill": args.test_per_skill, "test_per_domain": args.test_per_domain}
    kept = [] if args.fresh or not store.is_file() else json.loads(store.read_text())
    rows = [r for r in kept if r.get("settings") == settings]  # a rerun continues; other settings start over
    names = {r["name"] for r in rows}
    for name in ["base"] + args.configs:
        if name in names:
            continue
        print(f"compare: {name}", flush=True)
        row = run_base(args) if name == "base" else run_config(args, name)
        row["settings"] = settings
        rows.append(row)
        store.parent.mkdir(parents=True, exist_ok=True)
        store.write_text(json.dumps(rows, indent=2))
        write_report(rows, args, command)
        print(format_table(rows, args.steps), flush=True)
    write_report(rows, args, command)  # also when every config was already done: regenerate the section


if __name__ == "__main__":
    main()
