"""Modular skills on the built-in model: one LoRA per skill, composed, router-only training, vs end-to-end L-MoE.

    .venv/bin/python bench/compose_skills.py [--skill-steps 30] [--router-steps 30] [--e2e-steps 150]

Each stage is cached under --out, so a rerun only does what is missing. Prints a markdown table of
held-out exact match per skill (the README's "Modular skills" section) and writes it to --out/table.md.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from lmoe import LMoEConfig, aux_loss, compose, freeze_experts
from lmoe.data.encoding import batch_stream, collate, encode_all
from lmoe.data.builtin import Mixture
from lmoe.evaluation.scoring import evaluate_mixture
from lmoe.models import load_model
from lmoe.training.config import TrainConfig
from lmoe.training.loop import train

SKILLS = Mixture().skills
LORA = LMoEConfig(num_experts=1, rank=4, alpha=8, target_modules=["q_proj", "v_proj", "up_proj"])


def skills_only(skills: list[str]) -> Mixture:
    return Mixture(domains=[], skills=skills)


def cached(path: Path, compute) -> dict:
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(compute(), indent=2))
    return json.loads(path.read_text())


def trained(out: Path, lmoe: LMoEConfig, skills: list[str], steps: int) -> dict:
    """`lmoe train` on the given skills only; its held-out exact match per skill."""
    cfg = TrainConfig(lmoe=lmoe, mixture=skills_only(skills), steps=steps, output_dir=str(out),
                      compare_base=False, save_every=0)
    return cached(out / "exact_match.json", lambda: train(cfg).results["trained"]["exact_match"])


def train_routers(model, tokenizer, steps: int, lr: float = 5e-3) -> None:
    """Router-only training on all skills: experts frozen, AdamW on the routers, LM loss + aux losses."""
    freeze_experts(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    stream = batch_stream(encode_all(tokenizer, skills_only(SKILLS).train_records(), 128), 8, seed=0)
    model.train()
    for step in range(steps):
        loss = model(**collate(next(stream), tokenizer.pad_token_id)).loss + aux_loss(model)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        print(f"router step {step + 1}/{steps}: loss {loss.item():.3f}", flush=True)
    model.eval()


def composed(out: Path, adapters: list[Path], router_steps: int) -> tuple[dict, dict]:
    """Exact match of the composed mixture as built (uniform routing) and after router-only training."""
    def run(steps: int) -> dict:
        model, tokenizer = load_model()
        compose(model, adapters, LMoEConfig(router="softmax", composition="outputs"))
        if steps:
            train_routers(model, tokenizer, steps)
        return evaluate_mixture(model, tokenizer, skills_only(SKILLS))["exact_match"]
    return cached(out / "uniform.json", lambda: run(0)), cached(out / "routers.json", lambda: run(router_steps))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/compose_skills"))
    parser.add_argument("--skill-steps", type=int, default=30)
    parser.add_argument("--router-steps", type=int, default=30)
    parser.add_argument("--e2e-steps", type=int, default=150)
    args = parser.parse_args()
    base = cached(args.out / "base.json", lambda: evaluate_mixture(*load_model(), skills_only(SKILLS))["exact_match"])
    single = {s: trained(args.out / s, LORA, [s], args.skill_steps)[s] for s in SKILLS}
    uniform, routers = composed(args.out, [args.out / s / "adapter" for s in SKILLS], args.router_steps)
    e2e_cfg = LMoEConfig(num_experts=len(SKILLS), rank=4, alpha=8, target_modules=LORA.target_modules)
    e2e = trained(args.out / "e2e", e2e_cfg, SKILLS, args.e2e_steps)
    columns = {"base": base, f"own LoRA ({args.skill_steps} steps)": single, "composed, uniform": uniform,
               f"+ router-only ({args.router_steps} steps)": routers, f"end-to-end L-MoE ({args.e2e_steps} steps)": e2e}
    lines = ["| skill | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {s} | " + " | ".join(f"{col[s]:.2f}" for col in columns.values()) + " |" for s in SKILLS]
    table = "\n".join(lines)
    (args.out / "table.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
