"""Shared benchmark helpers: interleaved timing with warm-up and medians, activation memory,
environment, mean ± std over seeds for the result tables, and rewriting one section of
bench/RESULTS.md."""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import lmoe.allocator
from lmoe.compare.stats import mean_sd  # noqa: F401 (the bench scripts' table cell)


def replace_section(text: str, new: str, title: str) -> str:
    """text with the `title` block (up to the next '## ' heading) replaced by new, or new appended:
    how the scripts that write a RESULTS.md section (found by its heading) keep the
    others as they are."""
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == title), None)
    if start is None:
        return text.rstrip("\n") + "\n\n\n" + new.rstrip("\n") + "\n"
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    tail = "".join(lines[end:])
    return "".join(lines[:start]) + new.rstrip("\n") + "\n" + ("\n\n" + tail if tail else "")


def seed_se(values: list[float]) -> float:
    """The standard error of a mean over seeds: their sample sd / sqrt(seeds) (two or more)."""
    return statistics.stdev(values) / len(values) ** 0.5


def markdown_table(head: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table's lines: the head, its rule and one line per row of cells."""
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + [
        "| " + " | ".join(cells) + " |" for cells in rows
    ]


def scaling_rows(
    values: dict[str, float], experts: list[int], scale: float, unit: str
) -> list[str]:
    """Lines of a table of values keyed "family @E": per family, each E's value * scale and its
    ratio to the family's value at experts[0] (same run)."""
    families = list(dict.fromkeys(n.rsplit(" @", 1)[0] for n in values))
    lines = [f"{unit:30s} " + " ".join(f"{'E=' + str(e):>16s}" for e in experts)]
    for fam in families:
        first = values.get(f"{fam} @{experts[0]}")
        cells = [
            f"{scale * values[f'{fam} @{e}']:8.2f} {values[f'{fam} @{e}'] / first:5.2f}x"
            if f"{fam} @{e}" in values and first
            else "-"
            for e in experts
        ]
        lines.append(f"{fam:30s} " + " ".join(f"{c:>16s}" for c in cells))
    return lines


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_medians(
    runs: dict[str, Callable[[], None]],
    repeats: int,
    warmup: int,
    device: torch.device,
    before: Callable[[], None] = lambda: None,
) -> dict[str, float]:
    """Median seconds per run; each round runs every variant once, in a rotated order, so that
    load from other processes on a shared machine hits all variants alike. `before` runs untimed."""
    names = list(runs)
    for _ in range(warmup):
        for name in names:
            before()
            runs[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(repeats):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            before()
            sync(device)
            start = time.perf_counter()
            runs[name]()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


class SavedTensorBytes:
    """Bytes of the distinct storages autograd saves for backward during a forward,
    parameters excluded.

    Deterministic and device-independent: the activation memory a training step holds until
    backward. Storages shared by several saves (x saved by two GEMMs, views) count once.
    """

    def __init__(self, module: nn.Module, exclude: tuple[torch.Tensor, ...] = ()) -> None:
        self.skip = {p.untyped_storage().data_ptr() for p in module.parameters()}
        self.skip |= {t.untyped_storage().data_ptr() for t in exclude}
        self.seen: dict[int, int] = {}

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in self.skip:
            self.seen[storage.data_ptr()] = storage.nbytes()
        return t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)

    @property
    def total(self) -> int:
        return sum(self.seen.values())


def cuda_peak_bytes(step: Callable[[], None], device: torch.device) -> int:
    """Peak bytes allocated on top of what was live before one run of step (GPU only)."""
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    start = torch.cuda.memory_allocated(device)
    step()
    sync(device)
    return torch.cuda.max_memory_allocated(device) - start


ALLOCATOR = "default"


def keep_freed_memory() -> None:
    """lmoe.allocator.keep_freed_memory (what `lmoe train` does on a CPU), and the
    environment line says so.

    By default a large tensor is mmap-ed fresh and unmapped when freed, so the next step page-faults
    and zeroes it again; which variant pays depends on its allocation pattern and varied run to run
    by +-10% of a step (PEFT LoRA r=32 took 1.44 s in one run and 1.77 s in another). With freed
    memory kept, every variant computes from reused memory and the ratios measure the work.
    """
    global ALLOCATOR
    ALLOCATOR = (
        "glibc, freed memory kept (mallopt)" if lmoe.allocator.keep_freed_memory() else "default"
    )


def add_cpu_options(parser) -> None:
    """--threads and --default-allocator, which every benchmark script takes."""
    parser.add_argument(
        "--threads", type=int, help="torch intra-op threads (default: torch's choice)"
    )
    parser.add_argument(
        "--default-allocator",
        action="store_true",
        help="CPU: leave glibc's malloc as it is (by default freed memory is kept: "
        "keep_freed_memory)",
    )


def prepare_cpu(args, device: torch.device) -> None:
    """Apply add_cpu_options' choices before anything is measured."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cpu" and not args.default_allocator:
        keep_freed_memory()


def cpu_run(parser, argv: list[str] | None) -> tuple:
    """(args, the CPU device) for a CPU-only script: --json and add_cpu_options added to its parser,
    prepared (prepare_cpu), its environment printed."""
    parser.add_argument("--json", type=Path, help="write the figures here")
    add_cpu_options(parser)
    args = parser.parse_args(argv)
    device = torch.device("cpu")
    prepare_cpu(args, device)
    print(environment(device))
    return args, device


def environment(device: torch.device) -> str:
    import peft
    import transformers

    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine()
    )
    return (
        f"device={device} ({name}), torch threads={torch.get_num_threads()}, torch "
        f"{torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
        f"python {platform.python_version()}, allocator: {ALLOCATOR}"
    )
