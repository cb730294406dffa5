"""Model level: the sparse path's two kernels against each other and against dense, in one process.

SmolLM2-135M, top-k (k = 2) params composition at E experts of rank 8 on every linear layer, one
training step (forward + backward, no optimizer) with lmoe.execution forced: "csr" (sparse, the
CPU's CSR products, the default there), "grouped" (sparse, pairs grouped by expert: torch's grouped
GEMM or a per-expert loop), "dense" (all E experts as one rank-E*r LoRA), and E = 4 (dense, today's
size) for reference; interleaved medians.

    python bench/bench_kernels.py --experts 64 --threads 2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import lmoe.layer  # noqa: E402
from bench.bench_model import load_base, loss_of, ours  # noqa: E402
from bench.common import cpu_run, interleaved_medians  # noqa: E402
from lmoe.kernels.csr import csr_ok  # noqa: E402


def set_execution(model: torch.nn.Module, execution: str) -> None:
    for module in model.modules():
        if isinstance(module, lmoe.layer.MoLoRALinear):
            module.execution = execution


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    args, device = cpu_run(p, argv)
    base = load_base(device)
    ids = torch.randint(
        0,
        base.config.vocab_size,
        (args.batch, args.seq),
        generator=torch.Generator().manual_seed(0),
    )
    models = {
        "E=4 dense": ours(base, 4, 8, "topk", "params"),
        f"E={args.experts}": ours(base, args.experts, 8, "topk", "params"),
    }
    for model in models.values():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.02)
    big = models[f"E={args.experts}"]
    plans = {
        "E=4 dense": ("auto", True),
        f"E={args.experts} csr": ("sparse", True),
        f"E={args.experts} grouped": ("sparse", False),
        f"E={args.experts} dense": ("dense", True),
    }

    def step(name: str):
        execution, csr = plans[name]
        model = models["E=4 dense"] if name == "E=4 dense" else big

        def run():
            set_execution(model, execution)
            lmoe.layer.csr_ok = csr_ok if csr else (lambda *tensors: False)
            loss_of(model.train(), ids).backward()
            for param in model.parameters():
                param.grad = None
            lmoe.layer.csr_ok = csr_ok

        return run

    times = interleaved_medians({n: step(n) for n in plans}, args.repeats, args.warmup, device)
    ref = times["E=4 dense"]
    for name, t in times.items():
        print(f"{name:24s} fwd+bwd {t:6.2f} s  {t / ref:5.2f}x E=4")
    if args.json:
        args.json.write_text(
            json.dumps(
                {"args": vars(args) | {"json": str(args.json)}, "fwd_bwd_s": times}, indent=1
            )
        )


if __name__ == "__main__":
    main()
