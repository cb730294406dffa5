"""Layer level: MoLoRALinear (E experts of rank r) against PEFT LoRA of rank r and of rank E*r.

Same frozen linear, same input; forward (no_grad, eval) and forward+backward (train) time, and
activation memory (CPU: bytes autograd saves for backward; GPU: torch.cuda.max_memory_allocated).
All variants of one (E, r) run interleaved in one process; medians; ratios against LoRA rank E*r.

    python bench/bench_layer.py            # full grid: E = 2,4,8,16,32 x r = 4,8,16
    python bench/bench_layer.py --quick    # subset, a few minutes on 2 CPU cores
    # E = 4..128 at r = 8, top-2: each E's time and memory / E = 4's
    python bench/bench_layer.py --scaling

--scaling (issue 22): top-k and the dynamic router (its lambda held where `--active` experts a token
are on) in both compositions with the default execution (auto), top-k forced dense (the path before
sparse execution), and PEFT LoRA of rank E*r, every E of one router in one interleaved run.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
from peft import LoraConfig
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import (
    SavedTensorBytes,
    add_cpu_options,
    cuda_peak_bytes,
    environment,  # noqa: E402
    interleaved_medians,
    prepare_cpu,
    scaling_rows,
)
from lmoe import LMoEConfig, MoLoRALinear  # noqa: E402
from lmoe.config import AUX_COEFS  # noqa: E402

ROUTERS = ("softmax", "topk", "dynamic")
COMPOSITIONS = ("params", "outputs")
ALPHA_PER_RANK = 2.0  # alpha = 2 r for every variant, so all have scaling 2


def peft_lora(base: nn.Linear, rank: int) -> nn.Module:
    cfg = LoraConfig(r=rank, lora_alpha=ALPHA_PER_RANK * rank)
    return PeftLoraLinear(base, "default", config=cfg, r=rank, lora_alpha=ALPHA_PER_RANK * rank)


def ours_config(experts: int, rank: int, router: str, composition: str, **extra) -> LMoEConfig:
    return LMoEConfig(
        num_experts=experts,
        rank=rank,
        alpha=ALPHA_PER_RANK * rank,
        router=router,
        composition=composition,
        top_k=min(2, experts),
        target_modules="all-linear",
        **extra,
    )


def ours(
    base: nn.Linear, experts: int, rank: int, router: str, composition: str, **extra
) -> nn.Module:
    cfg = ours_config(experts, rank, router, composition, **extra)
    layer = MoLoRALinear(base, cfg)
    layer.aux_coefs = {
        key: getattr(cfg, attr) for key, attr in AUX_COEFS.items()
    }  # what lmoe.aux_loss weights
    return layer


def build_variants(
    base: nn.Linear, experts: int, rank: int, lambda_hidden: int | None = None
) -> dict[str, nn.Module]:
    variants = {
        f"lora r={rank}": peft_lora(base, rank),
        f"lora r={experts * rank}": peft_lora(base, experts * rank),
    }
    for composition, router in itertools.product(COMPOSITIONS, ROUTERS):
        variants[f"ours {composition}/{router}"] = ours(base, experts, rank, router, composition)
    if (
        lambda_hidden
    ):  # the dynamic router with another lambda-head width than the default, to see what it costs
        for composition in COMPOSITIONS:
            variants[f"ours {composition}/dyn-h{lambda_hidden}"] = ours(
                base, experts, rank, "dynamic", composition, lambda_hidden=lambda_hidden
            )
    for module in variants.values():
        for name, p in module.named_parameters():
            p.requires_grad_(not name.startswith("base"))
            if "lora_B" in name:  # LoRA starts at B = 0; random B so every product is real work
                nn.init.normal_(p, std=0.02)
    return variants


def aux_term(module: nn.Module) -> torch.Tensor | None:
    """Ours: the router losses with the config's coefficients, as lmoe.aux_loss adds
    them to the loss."""
    aux = getattr(module, "last_aux", None)
    losses = aux.losses() if aux is not None else {}
    terms = [module.aux_coefs[k] * v for k, v in losses.items() if module.aux_coefs[k]]
    return sum(terms) if terms else None


def hold_active(layer: MoLoRALinear, x: torch.Tensor, target: float) -> float:
    """Hold the dynamic router's lambda at the constant (the head's last layer: weight 0, a bias
    found by bisection) at which `target` experts a token are on, as after training; returns
    the mean it reached."""
    head = layer.router.lambda_head.net[2]
    nn.init.zeros_(head.weight)
    lo, hi, active = -30.0, 30.0, float("nan")
    with torch.no_grad():
        for _ in range(40):  # a larger bias: lambda nearer 1, fewer experts
            head.bias.fill_((lo + hi) / 2)
            active = float(
                (layer.router.route(x.reshape(-1, x.shape[-1])).weights > 0).sum(-1).float().mean()
            )
            lo, hi = ((lo + hi) / 2, hi) if active > target else (lo, (lo + hi) / 2)
    return active


def scaling_variants(
    base: nn.Linear, experts: list[int], rank: int, x: torch.Tensor, active: float
) -> tuple[dict[str, nn.Module], dict[str, float]]:
    """(variants named "family @E", the dynamic variants' mean experts a token)."""
    variants, reached = {}, {}
    for e in experts:
        variants[f"lora r=E*{rank} @{e}"] = peft_lora(base, e * rank)
        for composition, router in itertools.product(COMPOSITIONS, ("topk", "dynamic")):
            variants[f"ours {composition}/{router} @{e}"] = ours(base, e, rank, router, composition)
        variants[f"ours params/topk dense @{e}"] = ours(
            base, e, rank, "topk", "params", execution="dense"
        )
    for module in variants.values():
        for name, p in module.named_parameters():
            p.requires_grad_(not name.startswith("base"))
            if "lora_B" in name:
                nn.init.normal_(p, std=0.02)
    for name, module in variants.items():
        if "dynamic" in name:
            reached[name] = hold_active(module, x, active)
    return variants, reached


def bench_scaling(args, device: torch.device) -> dict:
    torch.manual_seed(0)
    base = nn.Linear(
        args.dim, args.dim, bias=False, device=device, dtype=args.dtype
    ).requires_grad_(False)
    x = torch.randn(1, args.tokens, args.dim, device=device, dtype=args.dtype, requires_grad=True)
    dy = torch.randn_like(x.detach())
    variants, reached = scaling_variants(base, args.experts, args.ranks[0], x, args.active)
    variants = {n: m.to(device=device, dtype=args.dtype).train() for n, m in variants.items()}
    params = [p for m in variants.values() for p in m.parameters() if p.requires_grad] + [x]

    def clear() -> None:
        for p in params:
            p.grad = None

    out = {"active": reached}
    out["act_bytes_no_input"] = {
        n: activation_bytes(m, x, dy, device, include_input=False) for n, m in variants.items()
    }
    out["fwd_bwd_s"] = interleaved_medians(
        {n: (lambda m=m: train_step(m, x, dy)) for n, m in variants.items()},
        args.repeats,
        args.warmup,
        device,
        clear,
    )
    return out


def report_scaling(result: dict, experts: list[int]) -> None:
    """Per family, each E's time and memory and its ratio to the family's first E."""
    print(f"\nratios: / E={experts[0]} of the same row, same run")
    print("\n".join(scaling_rows(result["fwd_bwd_s"], experts, 1e3, "fwd+bwd ms")))
    print(
        "\n".join(
            scaling_rows(result["act_bytes_no_input"], experts, 2**-20, "saved MiB, excl. input")
        )
    )
    for name, active in result["active"].items():
        print(f"{name}: {active:.2f} experts a token")


def train_step(module: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> None:
    y = module(x)
    aux = aux_term(module)  # ours adds its router losses to the loss, as training does
    torch.autograd.backward(
        [y, aux] if aux is not None else [y], [dy, None] if aux is not None else [dy]
    )


def activation_bytes(
    module: nn.Module, x: torch.Tensor, dy: torch.Tensor, device: torch.device, include_input: bool
) -> int:
    if device.type == "cuda":
        return cuda_peak_bytes(lambda: train_step(module, x, dy), device)
    counter = SavedTensorBytes(module, exclude=() if include_input else (x,))
    with counter.hooks():
        y = module(x)
        aux = aux_term(module)
    del y, aux
    return counter.total


def bench_one(experts: int, rank: int, args, device: torch.device) -> dict:
    torch.manual_seed(0)
    base = nn.Linear(
        args.dim, args.dim, bias=False, device=device, dtype=args.dtype
    ).requires_grad_(False)
    variants = build_variants(base, experts, rank, args.lambda_hidden)
    variants = {n: m.to(device=device, dtype=args.dtype) for n, m in variants.items()}
    x = torch.randn(1, args.tokens, args.dim, device=device, dtype=args.dtype, requires_grad=True)
    dy = torch.randn_like(x.detach())
    params = [p for m in variants.values() for p in m.parameters() if p.requires_grad] + [x]

    def clear() -> None:
        for p in params:
            p.grad = None

    def forward(m):
        def run():
            with torch.no_grad():
                m.eval()(x)

        return run

    def step(m):
        def run():
            train_step(m.train(), x, dy)

        return run

    fwd = interleaved_medians(
        {n: forward(m) for n, m in variants.items()}, args.repeats, args.warmup, device
    )
    fb = interleaved_medians(
        {n: step(m) for n, m in variants.items()}, args.repeats, args.warmup, device, clear
    )
    mem = {
        n: activation_bytes(m.train(), x, dy, device, include_input=True)
        for n, m in variants.items()
    }
    mem_ex = {
        n: activation_bytes(m.train(), x, dy, device, include_input=False)
        for n, m in variants.items()
    }
    return {
        "experts": experts,
        "rank": rank,
        "fwd_s": fwd,
        "fwd_bwd_s": fb,
        "act_bytes": mem,
        "act_bytes_no_input": mem_ex,
    }


def report(result: dict, device: torch.device) -> float:
    """Print one (E, r) table; return the worst fwd+bwd ratio of ours against LoRA rank E*r."""
    e, r = result["experts"], result["rank"]
    ref = f"lora r={e * r}"
    fwd, fb, mem, mem_ex = (
        result["fwd_s"],
        result["fwd_bwd_s"],
        result["act_bytes"],
        result["act_bytes_no_input"],
    )
    mem_label = "peak MiB" if device.type == "cuda" else "saved MiB"
    print(f"\nE={e} r={r}   (ratios: / {ref})")
    print(
        f"{'variant':24s} {'fwd ms':>8s} {'x':>6s} {'fwd+bwd ms':>11s} {'x':>6s} {mem_label:>10s} "
        f"{'x':>6s} {'excl. input':>11s} {'x':>6s}"
    )
    for name in fwd:
        print(
            f"{name:24s} {1e3 * fwd[name]:8.2f} {fwd[name] / fwd[ref]:6.2f} {1e3 * fb[name]:11.2f} "
            f"{fb[name] / fb[ref]:6.2f} {mem[name] / 2**20:10.2f} {mem[name] / mem[ref]:6.2f} "
            f"{mem_ex[name] / 2**20:11.2f} {mem_ex[name] / max(mem_ex[ref], 1):6.2f}"
        )
    return max(fb[n] / fb[ref] for n in fb if n.startswith("ours"))


def main(argv: list[str] | None = None) -> None:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="E = 2,8,32 x r = 4,16 and fewer repeats")
    p.add_argument(
        "--scaling", action="store_true", help="E = 4..128 at r = 8, each / E = 4 (issue 22)"
    )
    p.add_argument(
        "--active", type=float, default=2.0, help="--scaling: the dynamic router's experts a token"
    )
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--dim", type=int, default=2048 if cuda else 576)
    p.add_argument("--tokens", type=int, default=4096 if cuda else 1024)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--experts", type=int, nargs="+", default=None)
    p.add_argument("--ranks", type=int, nargs="+", default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument(
        "--lambda-hidden", type=int, help="also run the dynamic router with this lambda-head width"
    )
    add_cpu_options(p)
    p.add_argument("--json", type=Path, help="also write all figures here")
    args = p.parse_args(argv)
    args.dtype = getattr(torch, args.dtype)
    args.experts = args.experts or (
        [2, 8, 32] if args.quick else [4, 8, 16, 32, 64, 128] if args.scaling else [2, 4, 8, 16, 32]
    )
    args.ranks = args.ranks or ([4, 16] if args.quick else [8] if args.scaling else [4, 8, 16])
    args.repeats = args.repeats or (7 if args.quick or args.scaling else 15)
    device = torch.device(args.device)
    prepare_cpu(args, device)
    print(environment(device))
    print(
        f"d={args.dim} tokens={args.tokens} dtype={args.dtype} repeats={args.repeats} "
        f"warmup={args.warmup}"
    )
    if args.scaling:
        result = bench_scaling(args, device)
        report_scaling(result, args.experts)
        if args.json:
            args.json.write_text(
                json.dumps(
                    {
                        "env": environment(device),
                        "args": {k: str(v) for k, v in vars(args).items()},
                        "scaling": result,
                    },
                    indent=1,
                )
            )
        return
    results, worst = [], 0.0
    for e, r in itertools.product(args.experts, args.ranks):
        results.append(bench_one(e, r, args, device))
        worst = max(worst, report(results[-1], device))
    print(f"\nworst fwd+bwd ratio of ours / LoRA rank E*r: {worst:.2f}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "env": environment(device),
                    "args": {k: str(v) for k, v in vars(args).items()},
                    "results": results,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
