"""The README's library loop on the built-in data: does the routing specialise without groups?

The built-in model, the default mixture (lmoe.training.config.default_lmoe), the training examples
`lmoe train` builds from the built-in data, and the plainest loop:
torch.optim.AdamW(model.parameters(), lr), the model's own training loss (LM loss + router losses),
no parameter groups, no schedule, no clipping. Then the held-out routing analysis `lmoe train` runs
(held_out_specialisation: I(domain; expert) on the answer tokens). Each step also records the global
gradient norm and the routers' part of it: what clipping at lmoe train's max_grad_norm would meet.

    .venv/bin/python bench/library_loop.py --seeds 0 1 2   # --set router_param_scale=1

Each finished seed is appended to --results (JSON lines) at once; a rerun skips the seeds there.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a file: the repo root

SUMMARY = (
    "mutual_information_bits",
    "routing_entropy",
    "top_weight_over_half",
    "mean_active_experts",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="FIELD=VALUE",
        help="LMoEConfig fields over the default mixture, e.g. router_param_scale=1",
    )
    p.add_argument(
        "--clip", type=float, default=1.0, help="the norm whose crossings are counted (not applied)"
    )
    p.add_argument("--results", default="bench/results/router_param_scale_library.jsonl")
    p.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: torch's)"
    )
    return p.parse_args(argv)


def mixture_config(overrides: list[str]):
    """The default mixture with FIELD=VALUE overrides (values parsed as JSON where they parse)."""
    import dataclasses

    from lmoe.training.config import default_lmoe

    fields = {}
    for item in overrides:
        key, _, value = item.partition("=")
        try:
            fields[key] = json.loads(value)
        except json.JSONDecodeError:
            fields[key] = value
    return dataclasses.replace(default_lmoe(), **fields)


def grad_norms(model: torch.nn.Module, router_ids: set[int]) -> tuple[float, float]:
    """(global gradient norm, the routers' part of it) over the trainable parameters."""
    total = routers = 0.0
    for p in model.parameters():
        if p.grad is not None:
            square = float(p.grad.detach().float().square().sum())
            total += square
            routers += square if id(p) in router_ids else 0.0
    return total**0.5, routers**0.5


def run_seed(args: argparse.Namespace, seed: int) -> dict:
    from lmoe import inject
    from lmoe.data.encoding import batch_stream, collate
    from lmoe.evaluation.analysis import held_out_specialisation
    from lmoe.models import load_model
    from lmoe.training.config import TrainConfig
    from lmoe.training.data import training_examples
    from lmoe.training.optim import router_parameter_ids

    data = TrainConfig(batch_size=args.batch_size)  # the built-in data as `lmoe train` reads it
    torch.manual_seed(seed)
    model, tokenizer = load_model("builtin")
    examples = training_examples(data, tokenizer)
    cfg = mixture_config(args.set)
    torch.manual_seed(seed)  # the experts drawn as `lmoe train` draws them (add_adapter)
    inject(model, cfg)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)  # the frozen base: no gradient
    routers = router_parameter_ids(model)
    stream = batch_stream(examples, args.batch_size, seed)
    losses, norms, router_norms = [], [], []
    start = time.perf_counter()
    for step in range(args.steps):
        batch = collate(next(stream), tokenizer.pad_token_id)
        loss = model(**batch).loss  # training mode: LM loss + the weighted router losses
        loss.backward()
        total, router = grad_norms(model, routers)
        norms.append(total)
        router_norms.append(router)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % 25 == 0:
            recent = statistics.mean(losses[-25:])
            print(
                f"library_loop: seed {seed} step {step + 1} loss {recent:.3f} grad norm "
                f"{norms[-1]:.3f} (routers {router_norms[-1]:.3f})",
                flush=True,
            )
    train_s = time.perf_counter() - start
    model.eval()
    routing = held_out_specialisation(model, tokenizer, data.mixture, data.max_length)
    experts_only = [(t * t - r * r) ** 0.5 for t, r in zip(norms, router_norms, strict=True)]
    collapsed = sum(v["mutual_information_bits"] < 0.01 for v in routing["layers"].values())
    return {
        "seed": seed,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "lmoe": cfg.to_dict(),
        "train_s": train_s,
        "loss_first_25": statistics.mean(losses[:25]),
        "loss_last_25": statistics.mean(losses[-25:]),
        "routing": {key: routing[key] for key in SUMMARY},
        "layers_below_0.01_bit": collapsed,
        "routing_tokens": routing.get("tokens"),
        "grad_norm": {
            "clip": args.clip,
            "mean": statistics.mean(norms),
            "router_part_mean": statistics.mean(router_norms),
            "steps_over_clip": sum(n > args.clip for n in norms),
            "steps_over_clip_experts_alone": sum(n > args.clip for n in experts_only),
            "per_step": [round(n, 4) for n in norms],
            "router_per_step": [round(n, 4) for n in router_norms],
        },
    }


def done_seeds(path: Path) -> set[int]:
    if not path.is_file():
        return set()
    return {json.loads(line)["seed"] for line in path.read_text().splitlines() if line.strip()}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from lmoe.allocator import keep_freed_memory

    keep_freed_memory()  # as `lmoe train` does on the CPU: each step reuses freed memory (speed)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        if seed in done_seeds(results):
            continue
        row = run_seed(args, seed)
        row["command"] = shlex.join([".venv/bin/python", "bench/library_loop.py", *sys.argv[1:]])
        row["load_average"] = os.getloadavg()
        with open(results, "a") as f:
            f.write(json.dumps(row) + "\n")
        keys = ("seed", "train_s", "routing", "layers_below_0.01_bit")
        print(json.dumps({k: row[k] for k in keys}), flush=True)


if __name__ == "__main__":
    main()
