"""Modular skills on real tasks (issue 21): one LoRA per benchmark task, composed, routed and
extended, against PEFT's Arrow and X-LoRA, a multitask LoRA and end-to-end lmoe, on the same
adapters, questions and seeds.

Part `compose`, per seed: a PEFT LoRA per task (rank r on q/v/up_proj, `--steps` batches of its
train side), scored on every task (the diagonal is the oracle); then over the same adapter files:
uniform routing (the adapters averaged), lmoe's composed mixture with a zero router trained alone on
a small mixed set, the same router started from the adapters' singular vectors
(lmoe.modular.prototypes) before and after that training, Arrow (two settings), X-LoRA (classifier
trained on the mixed set), a multitask LoRA on the union (rank E*r and r, E * steps) and end-to-end
lmoe (E experts of rank r, E * steps). Part `continual`, per seed: the tasks arrive in the given
order; a LoRA fine-tuned on each in turn, with and without replay, against lmoe adding one expert
per task (earlier experts frozen, the new expert and the router trained on the new task plus a
replay share of earlier tasks' questions).

Each finished unit is appended to --results at once (per-question correctness, for paired
differences) and the tables in --out are rewritten, so a stopped run keeps what it finished and the
same command continues.

    # the CPU study (2 shared cores: 100+ min a seed)
    OMP_NUM_THREADS=1 .venv/bin/python bench/modular.py --share-cores
    # a GPU
    .venv/bin/python bench/modular.py --model DIR --steps 500 --test-items 0 --router-items 500
    .venv/bin/python bench/modular.py --report             # tables from the results file only
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(
    0, str(Path(__file__).resolve().parent.parent)
)  # run as a file: the repository root
from bench import modular_parts as parts  # noqa: E402
from bench.modular_report import write_report  # noqa: E402
from lmoe.data import benchmarks  # noqa: E402

TASKS = ["arc_easy", "csqa", "siqa", "piqa"]  # short prompts (BoolQ's are 5x longer: a GPU run)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="builtin", help="'builtin' or a local HF model directory")
    p.add_argument(
        "--tasks", nargs="+", default=TASKS, help="benchmark tasks; also the continual order"
    )
    p.add_argument(
        "--parts", nargs="+", default=["compose", "continual"], choices=["compose", "continual"]
    )
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument(
        "--rank", type=int, default=8, help="each task adapter's LoRA rank (alpha = 2 rank)"
    )
    p.add_argument(
        "--steps", type=int, default=40, help="batches per task adapter and per continual stage"
    )
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument(
        "--router-items", type=int, default=50, help="questions per task in the router's mixed set"
    )
    p.add_argument(
        "--router-steps", type=int, default=30, help="batches of router-only (and X-LoRA) training"
    )
    p.add_argument(
        "--replay", type=float, default=0.05, help="share of a continual stage's examples replayed"
    )
    p.add_argument(
        "--more-replay",
        type=float,
        default=0.25,
        help="a second replay share, run by naming its units, e.g. --only lmoe_add_replay25 "
        "seq_lora_replay25",
    )
    p.add_argument(
        "--new-expert-logit",
        type=float,
        default=-4.0,
        help="add_experts' router bias for a new skill",
    )
    p.add_argument("--test-items", type=int, default=50, help="test questions per task (0: all)")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--results", default="bench/results/modular.jsonl")
    p.add_argument("--out", default="bench/RESULTS.md")
    p.add_argument("--work-dir", default="runs/modular")
    p.add_argument(
        "--lock", help="a lock file held during each heavy unit (shared with other jobs' `flock`)"
    )
    p.add_argument(
        "--only",
        nargs="+",
        metavar="METHOD",
        help="run only these units (the task adapters always run), e.g. zero_router arrow_default",
    )
    p.add_argument(
        "--share-cores",
        action="store_true",
        help="a shared small CPU: each unit takes 2 torch threads when nothing else runs, else 1",
    )
    p.add_argument("--report", action="store_true", help="only rewrite the tables from --results")
    return p.parse_args(argv)


def replay_method(method: str, share: float) -> str:
    """The continual unit's name at another replay share than --replay: e.g.
    lmoe_add_replay25 for 0.25."""
    return f"{method}_replay{round(100 * share)}"


def settings(args: argparse.Namespace) -> dict:
    keys = [
        "model",
        "tasks",
        "rank",
        "steps",
        "batch_size",
        "lr",
        "router_items",
        "router_steps",
        "replay",
        "new_expert_logit",
        "test_items",
        "max_length",
    ]
    return {k: getattr(args, k) for k in keys}


class Study:
    """The units of one seed, sharing the tokenizer, the test questions and the adapter files."""

    def __init__(self, args: argparse.Namespace, seed: int, done: set, store: Path) -> None:
        from lmoe.models import load_model

        self.args, self.seed, self.done, self.store = args, seed, done, store
        self.tokenizer = load_model(args.model)[1]
        self.pad = self.tokenizer.pad_token_id
        self.tests = {t: benchmarks.scored_questions(t, args.test_items) for t in args.tasks}
        self.dir = Path(args.work_dir) / f"s{seed}"

    # ------------------------------------------------------------ helpers
    def base(self):
        from lmoe.models import load_model

        model = load_model(self.args.model)[0]
        return model.to("cuda" if torch.cuda.is_available() else "cpu").eval()

    def train_set(self, records: list[dict]) -> list:
        return parts.examples(self.tokenizer, records, self.args.max_length)

    def score(self, model, tasks: list[str] | None = None) -> dict[str, str]:
        """Per task, the questions' correctness as a string of 0/1 (compact in the JSONL)."""
        return {
            t: "".join(
                "1" if c else "0"
                for c in parts.correct(model, self.tokenizer, self.tests[t], self.args.max_length)
            )
            for t in (tasks or self.args.tasks)
        }

    def routing(self, model, tasks: list[str], own: dict[str, int]) -> dict:
        usage, tokens = {}, {}
        for t in tasks:
            usage[t], tokens[t] = parts.task_usage(
                model, self.tokenizer, self.tests[t], self.args.max_length
            )
        return {
            "own_share": parts.own_expert_share(usage, own),
            "information": parts.task_information(usage, tokens),
        }

    def adapter_dirs(self) -> list[str]:
        return [str(self.dir / "lora" / t) for t in self.args.tasks]

    def mixed(self) -> list:
        """The router's small mixed set: router_items questions of each task's train side."""
        records = [
            q
            for i, t in enumerate(self.args.tasks)
            for q in parts.drawn(
                parts.train_questions(t), self.args.router_items, self.seed * 100 + i
            )
        ]
        return self.train_set(records)

    def fit(self, model, train: list, steps: int) -> float:
        a = self.args
        return parts.fit(model, train, steps, a.batch_size, a.lr, self.seed, self.pad)

    def unit(self, key: tuple, run) -> None:
        """Run one unit unless the results file has it; append its row at once."""
        if (*key, self.seed) in self.done or (
            self.args.only
            and key[1] not in self.args.only
            and not key[1].startswith(("adapter:", "base"))
        ):
            return
        print(f"modular: {key} seed {self.seed}", flush=True)
        start = time.perf_counter()
        with parts.heavy(self.args.lock):
            if self.args.share_cores:
                parts.share_cores()
            torch.manual_seed(self.seed or 0)
            rows = run()
        for row in rows if isinstance(rows, list) else [rows]:
            row |= {
                "part": key[0],
                "seed": self.seed,
                "settings": settings(self.args),
                "wall_s": time.perf_counter() - start,
            }
            with open(self.store, "a") as f:
                f.write(json.dumps(row) + "\n")
            self.done.add((row["part"], row["method"], row.get("stage"), self.seed))

    # ------------------------------------------------------------ part 1: composition
    def adapter(self, task: str) -> dict:
        from peft import LoraConfig, get_peft_model

        r = self.args.rank
        model = get_peft_model(
            self.base(),
            LoraConfig(r=r, lora_alpha=2 * r, target_modules=parts.TARGETS, lora_dropout=0.0),
        )
        loss = self.fit(model, self.train_set(parts.train_questions(task)), self.args.steps)
        model.save_pretrained(self.dir / "lora" / task)
        return {"method": f"adapter:{task}", "correct": self.score(model), "loss": loss}

    def ensure_adapters(self) -> None:
        for task in self.args.tasks:
            if not (self.dir / "lora" / task / "adapter_model.safetensors").is_file():
                self.done.discard(("compose", f"adapter:{task}", None, self.seed))
            self.unit(("compose", f"adapter:{task}", None), lambda task=task: self.adapter(task))

    def composed(self):
        from lmoe import LMoEConfig, compose

        return compose(
            self.base(), self.adapter_dirs(), LMoEConfig(composition="outputs", router="softmax")
        )

    def own(self) -> dict[str, int]:
        return {t: i for i, t in enumerate(self.args.tasks)}

    def router_only(self, proto: bool, train: bool) -> dict:
        from lmoe import freeze_experts
        from lmoe.data.encoding import collate
        from lmoe.modular.prototypes import init_router_from_experts

        model, mixed = self.composed(), self.mixed()
        if proto:  # the mixed set's text, unlabelled (no task names), fixes each prototype's sign
            batches = [collate(mixed[i : i + 16], self.pad) for i in range(0, len(mixed), 16)]
            init_router_from_experts(model, batches)
        row = {}
        if train:
            freeze_experts(model)
            row["loss"] = self.fit(model, mixed, self.args.router_steps)
        method = ("proto" if proto else "zero") + ("_router" if train else "_zeroshot")
        return {
            **row,
            "method": method,
            "correct": self.score(model),
            **self.routing(model, self.args.tasks, self.own()),
        }

    def arrow(self, name: str, **kw) -> dict:
        from bench.modular_baselines import ARROW_DEFAULTS, arrow_model

        kw = {
            "top_k": min(ARROW_DEFAULTS["top_k"], len(self.args.tasks)),
            **kw,
        }  # its default 3, of 4 adapters
        return {
            "method": name,
            "correct": self.score(arrow_model(self.base(), self.adapter_dirs(), **kw)),
        }

    def xlora(self) -> dict:
        from bench.modular_baselines import xlora_model

        model = xlora_model(self.base(), self.adapter_dirs())
        loss = self.fit(model, self.mixed(), self.args.router_steps)
        return {"method": "xlora", "correct": self.score(model), "loss": loss}

    def union(self) -> list:
        return self.train_set([q for t in self.args.tasks for q in parts.train_questions(t)])

    def multitask(self, rank: int) -> dict:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            self.base(),
            LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=parts.TARGETS, lora_dropout=0.0),
        )
        loss = self.fit(model, self.union(), self.args.steps * len(self.args.tasks))
        return {"method": f"multitask_r{rank}", "correct": self.score(model), "loss": loss}

    def end_to_end(self) -> dict:
        from lmoe import LMoEConfig, inject

        E, r = len(self.args.tasks), self.args.rank
        model = inject(
            self.base(),
            LMoEConfig(num_experts=E, rank=r, alpha=2 * r, target_modules=parts.TARGETS),
        )
        loss = self.fit(model, self.union(), self.args.steps * E)
        return {"method": "end_to_end", "correct": self.score(model), "loss": loss}

    def compose_part(self) -> None:
        self.ensure_adapters()
        E, r = len(self.args.tasks), self.args.rank
        units = [
            ("uniform", lambda: {**self.router_only(False, False), "method": "uniform"}),
            ("zero_router", lambda: self.router_only(False, True)),
            ("proto_zeroshot", lambda: self.router_only(True, False)),
            ("proto_router", lambda: self.router_only(True, True)),
            ("arrow_default", lambda: self.arrow("arrow_default")),
            ("arrow_other", lambda: self.arrow("arrow_other", top_k=1)),  # one adapter per token
            ("xlora", self.xlora),
            (f"multitask_r{E * r}", lambda: self.multitask(E * r)),
            (f"multitask_r{r}", lambda: self.multitask(r)),
            ("end_to_end", self.end_to_end),
        ]
        for method, run in units:
            self.unit(("compose", method, None), run)

    # ------------------------------------------------------------ part 2: continual learning
    def stage_data(self, k: int, replay: float) -> list:
        """Stage k's examples: steps * batch_size, a `replay` share of them from the earlier
        tasks' train sides."""
        a, tasks = self.args, self.args.tasks
        total = a.steps * a.batch_size
        earlier = [q for t in tasks[:k] for q in parts.train_questions(t)]
        n_replay = round(replay * total) if k else 0
        new = parts.drawn(parts.train_questions(tasks[k]), total - n_replay, self.seed * 100 + k)
        return self.train_set(new + parts.drawn(earlier, n_replay, self.seed * 100 + 50 + k))

    def sequential_lora(self, method: str, replay: float) -> list[dict]:
        from peft import PeftModel

        tasks = self.args.tasks
        model = PeftModel.from_pretrained(
            self.base(), self.dir / "lora" / tasks[0], is_trainable=True
        )
        rows = []
        for k in range(1, len(tasks)):
            loss = self.fit(model, self.stage_data(k, replay), self.args.steps)
            rows.append(
                {
                    "method": method,
                    "stage": k,
                    "correct": self.score(model, tasks[: k + 1]),
                    "loss": loss,
                }
            )
        return rows

    def add_experts(self, method: str, replay: float) -> list[dict]:
        from lmoe import LMoEConfig, add_experts, freeze_experts, inject

        tasks, r = self.args.tasks, self.args.rank
        model = inject(
            self.base(),
            LMoEConfig(
                num_experts=1,
                rank=r,
                alpha=2 * r,
                target_modules=parts.TARGETS,
                composition="outputs",
            ),
        )
        rows = [
            {
                "method": method,
                "stage": 0,
                "loss": self.fit(model, self.stage_data(0, 0.0), self.args.steps),
            }
        ]
        rows[0]["correct"] = self.score(model, tasks[:1])
        for k in range(1, len(tasks)):
            new = add_experts(model, 1, logit=self.args.new_expert_logit)
            freeze_experts(
                model, list(range(new[0]))
            )  # earlier experts frozen; the new one and the router train
            loss = self.fit(model, self.stage_data(k, replay), self.args.steps)
            rows.append(
                {
                    "method": method,
                    "stage": k,
                    "correct": self.score(model, tasks[: k + 1]),
                    "loss": loss,
                }
            )
        seen = tasks
        rows[-1] |= self.routing(model, seen, {t: i for i, t in enumerate(seen)})
        return rows

    def continual_part(self) -> None:
        self.ensure_adapters()  # stage 0 of the sequential LoRA is task 0's adapter
        share, more = self.args.replay, self.args.more_replay
        lmoe_more, lora_more = replay_method("lmoe_add", more), replay_method("seq_lora", more)
        units = [
            ("seq_lora", lambda: self.sequential_lora("seq_lora", 0.0)),
            ("seq_lora_replay", lambda: self.sequential_lora("seq_lora_replay", share)),
            ("lmoe_add", lambda: self.add_experts("lmoe_add", 0.0)),
            ("lmoe_add_replay", lambda: self.add_experts("lmoe_add_replay", share)),
        ]
        if (
            self.args.only
        ):  # the second share is not part of a default run; unit() keeps the ones --only names
            units += [
                (lmoe_more, lambda: self.add_experts(lmoe_more, more)),
                (lora_more, lambda: self.sequential_lora(lora_more, more)),
            ]
        for method, run in units:
            self.unit(("continual", method, len(self.args.tasks) - 1), run)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    store = Path(args.results)
    store.parent.mkdir(parents=True, exist_ok=True)

    def rows() -> list[dict]:
        kept = (
            [json.loads(line) for line in store.read_text().splitlines()] if store.is_file() else []
        )
        return [r for r in kept if r["settings"] == settings(args)]

    if not args.report:
        done = {(r["part"], r["method"], r.get("stage"), r["seed"]) for r in rows()}
        if ("base", "base", None, None) not in done:
            study = Study(args, 0, done, store)
            study.seed = None
            study.unit(
                ("base", "base", None),
                lambda: {"method": "base", "correct": study.score(study.base())},
            )
        for seed in args.seeds:  # seed-major: a stopped run has whole seeds of both parts
            for part in args.parts:
                getattr(Study(args, seed, done, store), f"{part}_part")()
                write_report(rows(), args)
    write_report(rows(), args)


if __name__ == "__main__":
    main()
