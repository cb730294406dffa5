"""Evaluation speed, old path against new in one process, alternating.

Multiple choice (default; issue 14 item 5): choices per second before and after prefix sharing.
Before: every prompt + choice as its own sequence, 16 per batch in file order (what `lmoe eval`
did). After: lmoe.evaluation.logprobs.continuation_logprobs (one forward of each prompt, its KV
cache reused by every choice, questions batched by length). Both score the same ARC-Easy test
questions (cloze protocol, chat template); the script also reports the largest score difference.

--builtin (issue 34 item 3): the built-in mixture's held-out evaluation, what `lmoe train` runs
before and after training: exact match per skill, perplexity per domain and the routing analysis,
on the model with fresh experts injected (the trained model's shape; B = 0, so it answers as the
base). Before: transformers' generate on 32 prompts per batch in file order, every reply up to the
longest answer + 4 tokens; 16 examples per batch in file order, right-padded, log-softmax over
every position; the routing forwards with every position's logits. After: lmoe.evaluation
(length-sorted batches, a budget per reply, finished rows leave the batch, logits only where they
are read). It reports each phase's time, the ratios, and whether the results agree.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_eval.py --questions 100
    .venv/bin/python bench/bench_eval.py --model DIR --questions 1000        # a GPU, another model
    .venv/bin/python bench/bench_eval.py --builtin --repeats 2
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(
    0, str(Path(__file__).resolve().parent.parent)
)  # run as a file: the repository root
from bench.common import environment  # noqa: E402
from lmoe import inject  # noqa: E402
from lmoe.data import benchmarks  # noqa: E402
from lmoe.data.builtin import Mixture  # noqa: E402
from lmoe.data.choices import MultipleChoice, requests  # noqa: E402
from lmoe.data.encoding import IGNORE, Example, collate, encode_all, render_prompt  # noqa: E402
from lmoe.evaluation.analysis import batches_by_domain, collect_routing  # noqa: E402
from lmoe.evaluation.logprobs import (  # noqa: E402
    answer_logprobs,
    continuation_logprobs,
    perplexity,
)
from lmoe.evaluation.scoring import exact_match, normalise  # noqa: E402
from lmoe.models import load_model  # noqa: E402
from lmoe.routing_record import record_routing  # noqa: E402
from lmoe.training.config import default_lmoe  # noqa: E402


def unshared(model, reqs, pad_id: int) -> list[list[float]]:
    """The old path: prompt + choice sequences, 16 per batch in question order."""
    examples = [Example(p + c, [IGNORE] * len(p) + c) for p, conts in reqs for c in conts]
    flat = iter(lp for lp, _ in answer_logprobs(model, examples, pad_id, batch_size=16))
    return [[next(flat) for _ in conts] for _, conts in reqs]


# ------------------------------------------------------------ --builtin: the code before issue 34


@torch.no_grad()
def old_exact_match(model, tok, records: list[dict]) -> dict[str, float]:
    """transformers' generate, 32 prompts per batch in file order, every reply up to the longest
    answer + 4."""
    texts = [render_prompt(tok, r["messages"][:-1]) for r in records]
    longest = max(len(tok(r["answer"], add_special_tokens=False)["input_ids"]) for r in records)
    side, tok.padding_side = tok.padding_side, "left"
    replies = []
    for start in range(0, len(texts), 32):
        batch = tok(
            texts[start : start + 32], return_tensors="pt", padding=True, add_special_tokens=False
        )
        out = model.generate(
            **batch.to(model.device),
            max_new_tokens=longest + 4,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            do_sample=False,
        )
        replies += tok.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    tok.padding_side = side
    hits, totals = {}, {}
    for record, reply in zip(records, replies, strict=True):
        hit = normalise(reply) == normalise(record["answer"])
        hits[record["domain"]] = hits.get(record["domain"], 0) + hit
        totals[record["domain"]] = totals.get(record["domain"], 0) + 1
    return {domain: hits[domain] / totals[domain] for domain in totals}


@torch.no_grad()
def old_perplexity(model, examples: list[Example], pad_id: int) -> dict[str, float]:
    """16 examples per batch in file order, right-padded, log-softmax over every position."""
    nll, count = {}, {}
    for start in range(0, len(examples), 16):
        chunk = examples[start : start + 16]
        batch = {k: v.to(model.device) for k, v in collate(chunk, pad_id).items()}
        logits = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits.float()
        targets = batch["labels"][:, 1:]
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        keep = targets != IGNORE
        for ex, lp, n in zip(
            chunk, (picked * keep).sum(1).tolist(), keep.sum(1).tolist(), strict=True
        ):
            nll[ex.domain] = nll.get(ex.domain, 0.0) - lp
            count[ex.domain] = count.get(ex.domain, 0) + n
    return {domain: math.exp(nll[domain] / count[domain]) for domain in nll}


@torch.no_grad()
def old_routing(model, examples: list[Example], pad_id: int) -> None:
    """The routing analysis's forwards: 16 per batch per group in file order, every position's
    logits."""
    groups = {}
    for ex in examples:
        groups.setdefault(ex.domain, []).append(ex)
    with record_routing(model):
        for exs in groups.values():
            for start in range(0, len(exs), 16):
                batch = collate(exs[start : start + 16], pad_id)
                model(
                    input_ids=batch["input_ids"].to(model.device),
                    attention_mask=batch["attention_mask"].to(model.device),
                )


def builtin(model, tok, device: torch.device, repeats: int, max_length: int) -> None:
    """Old and new evaluation of the built-in held-out data, each phase timed, rounds
    alternating."""
    inject(model, default_lmoe())
    model.to(device).eval()
    mixture = Mixture()
    items, conversations = mixture.skill_items("test"), mixture.conversations("test")
    held_out = encode_all(tok, conversations, max_length)
    routed = encode_all(tok, items + conversations, max_length)
    pad = tok.pad_token_id
    paths = {
        "old": {
            "exact match": lambda: old_exact_match(model, tok, items),
            "perplexity": lambda: old_perplexity(model, held_out, pad),
            "routing analysis": lambda: old_routing(model, routed, pad),
        },
        "new": {
            "exact match": lambda: exact_match(model, tok, items),
            "perplexity": lambda: perplexity(model, held_out, pad),
            "routing analysis": lambda: collect_routing(
                model, batches_by_domain(routed, pad), "answer"
            ),
        },
    }
    times = {(path, phase): [] for path in paths for phase in paths[path]}
    results = {}
    for round_ in range(repeats):
        for path in ["old", "new"] if round_ % 2 == 0 else ["new", "old"]:
            for phase, run in paths[path].items():
                start = time.perf_counter()
                results[path, phase] = run()
                times[path, phase].append(time.perf_counter() - start)
                print(
                    f"round {round_ + 1} {path} {phase}: {times[path, phase][-1]:.1f} s",
                    file=sys.stderr,
                    flush=True,
                )
    print(
        f"{environment(device)}; {len(items)} skill items, {len(held_out)} conversations "
        f"({sum(len(e.input_ids) for e in held_out)} tokens), max_length {max_length}; "
        f"best of {repeats}"
    )
    print("| phase | before | after | speed-up |\n|---|---|---|---|")
    best = {key: min(t) for key, t in times.items()}
    for phase in paths["old"]:
        print(
            f"| {phase} | {best['old', phase]:.1f} s | {best['new', phase]:.1f} s | "
            f"{best['old', phase] / best['new', phase]:.2f}x |"
        )
    total = {path: sum(best[path, phase] for phase in paths[path]) for path in paths}
    print(
        f"| all | {total['old']:.1f} s | {total['new']:.1f} s | "
        f"{total['old'] / total['new']:.2f}x |"
    )
    old_ppl, new_ppl = results["old", "perplexity"], results["new", "perplexity"]
    same = results["old", "exact match"] == results["new", "exact match"]
    print(
        f"exact match per skill equal: {same} ({results['new', 'exact match']}); "
        "perplexity largest relative difference "
        f"{max(abs(old_ppl[d] / new_ppl[d] - 1) for d in old_ppl):.1e}"
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="builtin")
    p.add_argument("--task", default="arc_easy")
    p.add_argument("--questions", type=int, default=100)
    p.add_argument("--protocol", default="cloze", choices=["cloze", "letter"])
    p.add_argument("--repeats", type=int, default=2, help="alternating timed rounds of both paths")
    p.add_argument(
        "--builtin", action="store_true", help="the built-in mixture's held-out evaluation instead"
    )
    p.add_argument(
        "--max-length", type=int, default=128, help="--builtin: as lmoe train's max_length"
    )
    args = p.parse_args(argv)
    model, tok = load_model(args.model)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    if args.builtin:
        return builtin(model, tok, device, args.repeats, args.max_length)
    questions = benchmarks.scored_questions(args.task, args.questions)
    reqs = requests(tok, questions, MultipleChoice(args.protocol, "chat"), max_length=2048)
    choices = sum(len(c) for _, c in reqs)
    times = {"before (unshared)": [], "after (shared prefix)": []}
    for _ in range(args.repeats):
        for name, run in [
            ("before (unshared)", lambda: unshared(model, reqs, tok.pad_token_id)),
            (
                "after (shared prefix)",
                lambda: continuation_logprobs(model, reqs, tok.pad_token_id, progress=False),
            ),
        ]:
            start = time.perf_counter()
            scores = run()
            times[name].append(time.perf_counter() - start)
            if name.startswith("before"):
                reference = scores
            else:
                diff = max(
                    abs(a - b)
                    for x, y in zip(scores, reference, strict=True)
                    for a, b in zip(x, y, strict=True)
                )
    print(
        f"{environment(device)}; {args.model}, {args.task} test, {len(reqs)} questions, {choices} "
        f"choices ({args.protocol}, chat template)"
    )
    best = {name: min(t) for name, t in times.items()}
    for name, seconds in best.items():
        print(f"| {name} | {seconds:.1f} s | {choices / seconds:.1f} choices/s |")
    print(
        f"speed-up {best['before (unshared)'] / best['after (shared prefix)']:.2f}x; "
        f"largest score difference {diff:.2e} nats"
    )


if __name__ == "__main__":
    main()
