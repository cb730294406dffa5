"""What the adapter checksum costs (issue 26): a ~100 MB adapter saved and loaded by
lmoe.save_adapter / lmoe.load_adapter and by PEFT's save_pretrained / from_pretrained, each with the
SHA-256 of the weights file (lmoe.io.sha256_file: written by every writer, checked by every reader)
timed on its own beside the whole call.

The model: `--layers` plain Linear(d, d) layers with E x r experts each (float32), sized so that the
adapter file is about `--mb` MB; each load gets a fresh base, built untimed. Medians of `--repeats`
rounds, the variants interleaved; the files are in the page cache (written or read just before), so
the hash is compute-bound: what a load on the same machine right after a save sees (a cold disk adds
its read time to PEFT's read and lmoe's alike).

    flock /work/queue/heavy.lock .venv/bin/python bench/bench_checksum.py  # 100 MB, 5 rounds
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

sys.path.insert(
    0, str(Path(__file__).resolve().parent.parent)
)  # run as a file: the repository root
from bench.common import environment, interleaved_medians  # noqa: E402
from lmoe import LMoEConfig, inject, load_adapter, save_adapter  # noqa: E402
from lmoe.inject import get_config  # noqa: E402
from lmoe.io import WEIGHTS_FILE, sha256_file  # noqa: E402


class Stack(nn.Module):
    def __init__(self, width: int, layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width, bias=False) for _ in range(layers))


def adapted(width: int, layers: int, experts: int, rank: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = inject(
        Stack(width, layers),
        LMoEConfig(num_experts=experts, rank=rank, target_modules=r"layers\.\d+"),
    )
    for p in model.parameters():
        if p.requires_grad:
            nn.init.normal_(p, std=0.02)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--mb", type=float, default=100.0, help="adapter size to aim at, MB (1e6 bytes)"
    )
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    per_rank = 2 * args.experts * args.width * 4 * args.layers  # bytes of A and B per unit of rank
    rank = max(1, round(args.mb * 1e6 / per_rank))
    model = adapted(args.width, args.layers, args.experts, rank)
    from peft import PeftModel, get_peft_model

    peft_model = get_peft_model(Stack(args.width, args.layers), get_config(model))
    peft_model.load_state_dict(model.state_dict(), strict=False)
    with tempfile.TemporaryDirectory() as tmp:
        lmoe_dir, peft_dir = Path(tmp, "lmoe"), Path(tmp, "peft")
        save_adapter(model, lmoe_dir)
        peft_model.save_pretrained(peft_dir)
        size = (lmoe_dir / WEIGHTS_FILE).stat().st_size
        bases = []  # a fresh base for each load, built untimed
        runs = {
            "sha256 of the weights file": lambda: sha256_file(lmoe_dir / WEIGHTS_FILE),
            "lmoe.save_adapter": lambda: save_adapter(model, lmoe_dir),
            "lmoe.load_adapter": lambda: load_adapter(bases.pop(), lmoe_dir),
            "PeftModel.save_pretrained": lambda: peft_model.save_pretrained(peft_dir),
            "PeftModel.from_pretrained": lambda: PeftModel.from_pretrained(bases.pop(), peft_dir),
        }
        medians = interleaved_medians(
            runs,
            args.repeats,
            warmup=1,
            device=torch.device("cpu"),
            before=lambda: bases.__setitem__(slice(None), [Stack(args.width, args.layers)]),
        )
    sha = medians["sha256 of the weights file"]
    print(
        f"adapter file {size / 1e6:.1f} MB (E={args.experts}, r={rank}, {args.layers} layers of "
        f"{args.width}); {environment(torch.device('cpu'))}"
    )
    print("| call | median s | of which hashing |")
    print("|---|---|---|")
    for name, seconds in medians.items():
        share = "-" if name.startswith("sha256") else f"{sha:.3f} s ({100 * sha / seconds:.0f}%)"
        print(f"| {name} | {seconds:.3f} | {share} |")
    print(f"SHA-256: {size / sha / 1e6:.0f} MB/s")


if __name__ == "__main__":
    main()
