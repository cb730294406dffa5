"""`lmoe train | eval | generate | analyze | compose | experts | compare | config`: a thin shell
over lmoe.training.loop, lmoe.evaluation, lmoe.models, lmoe.modular and lmoe.compare.

Every command takes its settings one way (docs/cli.md says why): key=value words over its
dataclass (TrainConfig; lmoe.cli_settings for the others), or a YAML/JSON file with --config, the
words on top; `lmoe COMMAND --help` lists every setting with its type, default and help
(lmoe.settings). A command is a function `cmd_<name>(cfg)` listed in COMMANDS with its settings'
class.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from .cli_settings import (
    AnalyzeConfig,
    ComposeConfig,
    ConfigConfig,
    EvalConfig,
    ExpertsAddConfig,
    ExpertsListConfig,
    ExpertsRemoveConfig,
    ExpertsReplaceConfig,
    GenerateConfig,
)
from .compare.config import CompareConfig
from .settings import default_yaml, help_text, load_settings
from .training.config import TrainConfig
from .training.resume import resume_config

KEEP_FREED_MEMORY = (
    "LMOE_KEEP_FREED_MEMORY"  # =1: `lmoe train` keeps freed memory for reuse (allocator.py)
)


def cmd_train(cfg: TrainConfig, resume: bool = False) -> None:
    """Fine-tune a mixture of LoRA experts; no settings = the built-in model and mixture."""
    from .training.interrupt import TrainingInterrupted
    from .training.loop import train

    if os.environ.get(KEEP_FREED_MEMORY) == "1":
        from .allocator import keep_freed_memory

        keep_freed_memory()  # process-wide: asked for by the caller (run.sh), never by the library
    try:
        train(cfg, resume=resume)
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


def _load(cfg: EvalConfig | GenerateConfig | AnalyzeConfig):
    from .io import load_adapter
    from .models import load_model

    model, tokenizer = load_model(cfg.model)
    if cfg.adapter:
        load_adapter(model, cfg.adapter)
    return model.eval(), tokenizer


def _check_group(group: str | None, files: list[str]) -> None:
    if group and not files:
        raise ValueError(
            f"group={group} groups the rows of data files; give data=[FILE], or drop group "
            "(the built-in mixture groups by skill and domain)."
        )


def cmd_eval(cfg: EvalConfig) -> None:
    """Perplexity, exact match or multiple-choice accuracy on files and benchmarks, or the built-in
    mixture's held-out metrics; or lm-eval-harness tasks."""
    if cfg.lm_eval:
        return _run_lm_eval(cfg)
    from .data.benchmarks import root, task_names
    from .data.builtin import Mixture
    from .data.question_fit import check_questions_fit
    from .evaluation.scoring import (
        evaluate_benchmarks,
        evaluate_file,
        evaluate_mixture,
        format_table,
        write_json,
    )

    names = task_names(cfg.data)
    files = [path for path in cfg.data if not task_names([path])]
    _check_group(cfg.group, files)
    if cfg.max_answer_tokens < 0:
        raise ValueError(
            f"max_answer_tokens={cfg.max_answer_tokens}: expected 0 (no exact match) or more."
        )
    if names:
        root()  # a missing data package is reported before the model loads
    model, tokenizer = _load(cfg)
    check_questions_fit(tokenizer, cfg.data, cfg.mc, cfg.max_length, cfg.group)  # before scoring
    results = {} if cfg.data else evaluate_mixture(model, tokenizer, Mixture(), cfg.max_length)
    if names:
        results |= evaluate_benchmarks(model, tokenizer, names, cfg.mc, cfg.max_length)
    for path in files:
        scored = evaluate_file(
            model, tokenizer, path, cfg.max_length, cfg.mc, cfg.group, cfg.max_answer_tokens
        )
        for metric, values in scored.items():
            results[f"{metric}:{Path(path).stem}"] = values
    print(format_table({"adapter" if cfg.adapter else "base": results}))
    if cfg.json:
        write_json(results, cfg.json)


def _run_lm_eval(cfg: EvalConfig) -> None:
    from .evaluation.scoring import write_json
    from .integrations.lm_eval_tasks import lm_eval_results, lm_eval_table

    model, tokenizer = _load(cfg)
    results = lm_eval_results(model, tokenizer, cfg.lm_eval, cfg.include_path, cfg.limit)
    print(lm_eval_table(results))
    if cfg.json:
        write_json(results["results"], cfg.json)


def cmd_generate(cfg: GenerateConfig) -> None:
    """Reply to prompts given as settings or in a file (one per line), greedy or sampled."""
    import torch

    from .evaluation.scoring import generate

    prompts = list(cfg.prompts)
    if cfg.prompt_file:
        text = Path(cfg.prompt_file).read_text(encoding="utf-8")
        prompts += [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError('give prompts=["a prompt", ...] or prompt_file=PROMPTS.txt.')
    torch.manual_seed(cfg.seed)
    model, tokenizer = _load(cfg)
    replies = generate(
        model, tokenizer, prompts, cfg.max_new_tokens, cfg.sample, cfg.temperature, cfg.top_p
    )
    for prompt, reply in zip(prompts, replies, strict=True):
        print(json.dumps({"prompt": prompt, "reply": reply}, ensure_ascii=False))


def default_analysis_dir(adapter: str | Path) -> Path:
    """Where `lmoe analyze` writes without out=: a folder beside the adapter directory, never
    inside it (runs/x/adapter -> runs/x/adapter-analysis), so the adapter stays as it was."""
    adapter = Path(adapter).resolve()
    return adapter.parent / f"{adapter.name}-analysis"


def cmd_analyze(cfg: AnalyzeConfig) -> None:
    """Routing of a trained adapter: entropy, I(skill; expert), active experts and expert load per
    layer (PNG + JSON)."""
    from .data.encoding import encode_all
    from .data.records import read_records
    from .evaluation.analysis import SUMMARY_FILE, analyze, batches_by_domain, held_out_batches

    _check_group(cfg.group, cfg.data)
    model, tokenizer = _load(cfg)
    if cfg.data:
        records = [r for path in cfg.data for r in read_records(path, group=cfg.group)]
        batches = batches_by_domain(
            encode_all(tokenizer, records, cfg.max_length), tokenizer.pad_token_id
        )
    else:
        batches = held_out_batches(tokenizer, max_length=cfg.max_length)
    out = Path(cfg.out) if cfg.out else default_analysis_dir(cfg.adapter)
    result = analyze(model, batches, out, cfg.tokens)
    print(f"routing on {result['tokens_used']}, averaged over {len(result['layers'])} layers:")
    active, experts = result["mean_active_experts"], result["num_experts"]
    print(f"  mean active experts per token: {active:.2f} of {experts}")
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
            f"  {group:32s} {stats['tokens']:7d} tokens  {stats['mean_active_experts']:.2f} experts"
        )
    plots = ", ".join(Path(f).name for f in result["files"].values())
    print(f"wrote {out}: {SUMMARY_FILE}, {plots}")


def cmd_compose(cfg: ComposeConfig) -> None:
    """Build a mixture from LoRA adapters trained on one base: each becomes an expert, a fresh
    router is added."""
    from .config import LMoEConfig
    from .io import save_adapter
    from .models import load_model
    from .modular.compose import compose

    model, _ = load_model(cfg.model)
    compose(model, cfg.adapters, LMoEConfig(router=cfg.router, composition=cfg.composition))
    print("wrote", save_adapter(model, cfg.out))


def cmd_experts_list(cfg: ExpertsListConfig) -> None:
    """Experts, rank, target modules and router of a mixture, and each expert's update size and
    router row."""
    from .evaluation.scoring import write_json
    from .modular.edit import describe_mixture, format_mixture

    desc = describe_mixture(cfg.mixture)
    print(format_mixture(desc))
    if cfg.json:
        write_json(desc, cfg.json)


def _edit(cfg: ExpertsAddConfig | ExpertsRemoveConfig | ExpertsReplaceConfig, change) -> None:
    """Load cfg.mixture onto cfg.model, apply change(model), save the result to cfg.out."""
    from .io import load_adapter, save_adapter
    from .models import load_model

    model = load_adapter(load_model(cfg.model)[0], cfg.mixture)
    change(model)
    print("wrote", save_adapter(model, cfg.out))


def cmd_experts_add(cfg: ExpertsAddConfig) -> None:
    """New experts: LoRA adapters of the same base (PEFT's, or `lmoe train` at
    lmoe.num_experts=1), or fresh ones."""
    import torch

    from .modular.edit import add_adapters
    from .modular.experts import add_experts

    if cfg.fresh < 0 or not cfg.adapters and not cfg.fresh:
        raise ValueError("give adapters=[DIR,...] to add, or fresh=N (N >= 1) for N new experts.")
    torch.manual_seed(cfg.seed)
    added = []

    def change(model) -> None:
        added.extend(add_adapters(model, cfg.adapters, cfg.logit) if cfg.adapters else [])
        added.extend(add_experts(model, cfg.fresh, cfg.logit) if cfg.fresh else [])

    _edit(cfg, change)
    train = f"lmoe train init_adapter={cfg.out}" + (
        "" if cfg.model == "builtin" else f" model={cfg.model}"
    )
    frozen = ",".join(map(str, range(added[0])))
    print(
        f"new experts: {', '.join(map(str, added))}; next, train "
        + (
            f"them and the router, the earlier experts frozen: {train} "
            f"frozen_experts=[{frozen}] data=[NEW.jsonl,REPLAY.jsonl]"
            if cfg.fresh
            else f"the router: {train} train_experts=false data=[MIXED.jsonl]"
        )
    )


def cmd_experts_remove(cfg: ExpertsRemoveConfig) -> None:
    """Drop experts (their slices of A, B and the router) from a mixture."""
    from .modular.experts import remove_experts

    _edit(cfg, lambda model: remove_experts(model, cfg.experts))


def cmd_experts_replace(cfg: ExpertsReplaceConfig) -> None:
    """Put a LoRA adapter in an expert's slot; it keeps that expert's router row."""
    from .modular.compose import load_experts

    _edit(cfg, lambda model: load_experts(model, [cfg.adapter], [cfg.expert]))


def cmd_compare(cfg: CompareConfig) -> None:
    """Does a mixture beat a LoRA of equal trainable parameters on my data? (docs/compare.md)"""
    from .compare import compare

    compare(cfg)


COMMANDS: dict[str, tuple[Callable, type]] = {
    "train": (cmd_train, TrainConfig),
    "eval": (cmd_eval, EvalConfig),
    "generate": (cmd_generate, GenerateConfig),
    "analyze": (cmd_analyze, AnalyzeConfig),
    "compose": (cmd_compose, ComposeConfig),
    "experts list": (cmd_experts_list, ExpertsListConfig),
    "experts add": (cmd_experts_add, ExpertsAddConfig),
    "experts remove": (cmd_experts_remove, ExpertsRemoveConfig),
    "experts replace": (cmd_experts_replace, ExpertsReplaceConfig),
    "compare": (cmd_compare, CompareConfig),
}
GROUPS = {  # a command of several actions ("experts list"): its own line of help
    "experts": "A mixture's experts: list them; add LoRA adapters or fresh experts; remove or "
    "replace some (a new adapter)."
}


def cmd_config(words: list[str], cfg: ConfigConfig) -> None:
    """Write a command's settings, every one at its default with its help as a comment, as YAML
    to edit and read back with --config: `lmoe config eval out=eval.yaml`."""
    name = " ".join(words)
    if name not in COMMANDS:
        raise ValueError(f"no command {name!r}; give one of: {', '.join(COMMANDS)}.")
    text = default_yaml(COMMANDS[name][1], name)
    if cfg.out is None:
        print(text, end="")
        return
    Path(cfg.out).write_text(text)
    print(f"wrote {cfg.out}: edit it, then `lmoe {name} --config {cfg.out}`")


def _add_command(commands, name: str, run: Callable, cls: type) -> None:
    parser = commands.add_parser(
        name.split()[-1],
        help=inspect.getdoc(run),
        description=inspect.getdoc(run),
        epilog=help_text(cls, name),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        help=f"a YAML/JSON file of settings (`lmoe config {name}` writes one); key=value wins",
    )
    if name == "train":
        parser.add_argument(
            "--resume",
            action="store_true",
            help="continue the run in output_dir from its checkpoint.pt, with its saved settings "
            "(train_config.yaml); key=value may change only steps, save_every, the eval "
            "settings and a few more (docs/training.md)",
        )
    parser.add_argument("settings", nargs="*", metavar="key=value", help="settings, below")
    parser.set_defaults(name=name)


def parser() -> argparse.ArgumentParser:
    """`lmoe`'s parser: a sub-parser per command, and one per action of a group (experts)."""
    from .version import __version__

    top = argparse.ArgumentParser(
        prog="lmoe",
        description="Mixture of LoRA experts, trained end to end. Every command takes its "
        "settings as key=value words (or --config FILE); `lmoe COMMAND --help` lists them.",
    )
    top.add_argument("--version", action="version", version=f"lmoe {__version__}")
    commands = top.add_subparsers(dest="command", required=True)
    groups = {}
    for name, (run, cls) in COMMANDS.items():
        group = name.rpartition(" ")[0]
        if group and group not in groups:
            sub = commands.add_parser(group, help=GROUPS[group], description=GROUPS[group])
            groups[group] = sub.add_subparsers(dest="action", required=True)
        _add_command(groups[group] if group else commands, name, run, cls)
    config = commands.add_parser(
        "config",
        help="write a command's default settings as YAML, to edit and use with --config",
        description=inspect.getdoc(cmd_config),
        usage="lmoe config [-h] COMMAND [ACTION] [out=FILE]",
        epilog=help_text(ConfigConfig),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    config.add_argument("words", nargs="+", metavar="COMMAND", help=", ".join(COMMANDS))
    config.set_defaults(name="config")
    return top


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.name == "config":
            settings = [w for w in args.words if "=" in w]
            words = [w for w in args.words if "=" not in w]
            return cmd_config(words, load_settings(ConfigConfig, None, settings))
        run, cls = COMMANDS[args.name]
        if args.name == "train" and args.resume:
            return run(resume_config(args.config, args.settings), resume=True)
        run(load_settings(cls, args.config, args.settings))
    except (ValueError, OSError) as err:  # our messages say what was wrong and what to do
        if os.environ.get("LMOE_DEBUG"):
            raise
        print(f"lmoe {args.name}: error: {' '.join(str(err).split())}", file=sys.stderr)
        raise SystemExit(2) from err


if __name__ == "__main__":
    main(sys.argv[1:])
