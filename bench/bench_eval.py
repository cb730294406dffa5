"""Multiple-choice scoring speed: choices per second before and after prefix sharing (issue 14 item 5).

Before: every prompt + choice as its own sequence, 16 per batch in file order (what `lmoe eval` did).
After: lmoe.evaluation.scoring.continuation_logprobs (one forward of each prompt, its KV cache reused by every choice,
questions batched by length). Both score the same ARC-Easy test questions (cloze protocol, chat template)
on the same model in the same process, alternating; the script also reports the largest score difference.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_eval.py --questions 100
    .venv/bin/python bench/bench_eval.py --model DIR --questions 1000        # a GPU, another model
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a file: the repository root
from bench.common import environment  # noqa: E402
from lmoe.data import benchmarks  # noqa: E402
from lmoe.data.choices import MultipleChoice, requests  # noqa: E402
from lmoe.data.encoding import Example, IGNORE  # noqa: E402
from lmoe.evaluation.scoring import answer_logprobs, continuation_logprobs  # noqa: E402
from lmoe.models import load_model  # noqa: E402


def unshared(model, reqs, pad_id: int) -> list[list[float]]:
    """The old path: prompt + choice sequences, 16 per batch in question order."""
    examples = [Example(p + c, [IGNORE] * len(p) + c) for p, conts in reqs for c in conts]
    flat = iter(lp for lp, _ in answer_logprobs(model, examples, pad_id, batch_size=16))
    return [[next(flat) for _ in conts] for _, conts in reqs]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="builtin")
    p.add_argument("--task", default="arc_easy")
    p.add_argument("--questions", type=int, default=100)
    p.add_argument("--protocol", default="cloze", choices=["cloze", "letter"])
    p.add_argument("--repeats", type=int, default=2, help="alternating timed rounds of both paths")
    args = p.parse_args(argv)
    model, tok = load_model(args.model)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    questions = benchmarks.subset(benchmarks.load(args.task, "test"), args.questions)
    reqs = requests(tok, questions, MultipleChoice(args.protocol, "chat"), max_length=2048)
    choices = sum(len(c) for _, c in reqs)
    times = {"before (unshared)": [], "after (shared prefix)": []}
    for _ in range(args.repeats):
        for name, run in [("before (unshared)", lambda: unshared(model, reqs, tok.pad_token_id)),
                          ("after (shared prefix)", lambda: continuation_logprobs(model, reqs, tok.pad_token_id,
                                                                                  progress=False))]:
            start = time.perf_counter()
            scores = run()
            times[name].append(time.perf_counter() - start)
            if name.startswith("before"):
                reference = scores
            else:
                diff = max(abs(a - b) for x, y in zip(scores, reference) for a, b in zip(x, y))
    print(f"{environment(device)}; {args.model}, {args.task} test, {len(reqs)} questions, {choices} choices "
          f"({args.protocol}, chat template)")
    best = {name: min(t) for name, t in times.items()}
    for name, seconds in best.items():
        print(f"| {name} | {seconds:.1f} s | {choices / seconds:.1f} choices/s |")
    print(f"speed-up {best['before (unshared)'] / best['after (shared prefix)']:.2f}x; "
          f"largest score difference {diff:.2e} nats")


if __name__ == "__main__":
    main()
