"""`lmoe compare`: plan the methods (each mixture and a LoRA of equal trainable parameters), train
and score every (method, seed) with lmoe train's loop, keep each finished run, and report.

The LoRA is lmoe train at lmoe.num_experts=1: one expert always weighted 1, the function (and,
without weight decay, the training) of a PEFT LoRA of that rank (tests/test_layer.py:
test_one_expert_equals_peft_lora), trained by the same loop, data order and schedule as the
mixtures. Its trainable parameters are counted as PEFT counts them, A and B: the one-expert router
receives no gradient and is left out.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from torch import nn

from ..config import LMoEConfig
from ..evaluation.progress import announce
from ..evaluation.scoring import write_json
from ..inject import count_parameters, inject, lmoe_layers
from ..models import load_model
from ..training.checkpoint import CHECKPOINT
from ..training.config import TrainConfig
from ..training.distributed import make_accelerator
from ..training.evaluation import ROUTING_FILE, ROUTING_SUMMARY
from ..training.loop import train
from ..training.metrics_log import METRICS, read_metrics
from ..training.resume import read_saved_config
from ..training.start import check_inputs
from .config import CompareConfig
from .items import aggregates, score_items
from .split import split_files
from .stats import format_tables, method_summary, pair_runs, pair_with_base

BASE = "base"  # the base model scored alone (CompareConfig.base): its method name and kind
RESULT = "result.json"  # in a run's directory: written once the run is trained and scored
# The routing statistics' effective support size (lmoe.routing_stats: experts a token effectively
# uses, 1 to E), in a run's routing.json (held-out answer tokens) and metrics.csv (training steps).
SUPPORT_KEY = "effective_support_size"
REPORT_JSON, REPORT_TABLE = "compare.json", "compare.md"


@dataclass
class Method:
    """One trained configuration: a mixture (its lmoe.* settings) or a LoRA (its lmoe section)."""

    name: str
    kind: str  # "mixture" or "lora" (the base model's result: BASE)
    trainable: int | None  # None: counted on the trained model (given.given_method's methods)
    settings: dict  # mixture: dotted lmoe.* settings; LoRA: its lmoe section
    lora: str | None = None  # a mixture's LoRA
    rank: int | None = None  # a LoRA's rank
    matched: list[str] = field(default_factory=list)  # a LoRA's mixtures


def lora_params_per_rank(model: nn.Module, target_modules) -> int:
    """Trainable parameters of a PEFT LoRA of rank 1 on target_modules: sum of d_in + d_out."""
    one = inject(
        copy.deepcopy(model), LMoEConfig(num_experts=1, rank=1, target_modules=target_modules)
    )
    return sum(layer.lora_A.numel() + layer.lora_B.numel() for _, layer in lmoe_layers(one))


def nearest_rank(trainable: int, per_rank: int) -> int:
    """The rank whose LoRA's parameter count is nearest trainable (the lower one on a tie)."""
    low = max(1, trainable // per_rank)
    return min((low, low + 1), key=lambda r: (abs(r * per_rank - trainable), r))


def plan_methods(cfg: CompareConfig, model: nn.Module) -> list[Method]:
    """Each mixture, then its LoRA (shared by the mixtures that match the same one), counted on
    model; prints both counts of each pair."""
    methods: dict[str, Method] = {}
    loras: dict[str, Method] = {}
    for name in cfg.mixtures:
        mix = cfg.mixture_config(name, 0, "plan").lmoe
        trainable = count_parameters(inject(copy.deepcopy(model), mix))[0]
        targets = cfg.lora_target_modules or mix.target_modules
        per_rank = lora_params_per_rank(model, targets)
        rank = cfg.lora_rank or nearest_rank(trainable, per_rank)
        section = {
            "num_experts": 1,
            "rank": rank,
            "alpha": rank * mix.alpha / mix.rank,  # the mixture's scale alpha / r
            "dropout": mix.dropout,
            "target_modules": targets,
            "router": "softmax",
            "load_balance_coef": 0.0,
        }
        key = json.dumps(section, sort_keys=True)
        if key not in loras:
            taken = {m.name for m in loras.values()}
            lora_name = next(
                n
                for n in [f"lora_r{rank}", *(f"lora_r{rank}_{k}" for k in range(2, 99))]
                if n not in taken
            )
            loras[key] = Method(lora_name, "lora", rank * per_rank, section, rank=rank)
        lora = loras[key]
        lora.matched.append(name)
        methods[name] = Method(name, "mixture", trainable, cfg.mixtures[name], lora=lora.name)
        how = "as given" if cfg.lora_rank else "the nearest rank"
        announce(
            f"compare: mixture {name}: {trainable:,} trainable parameters; LoRA {lora.name}: "
            f"rank {rank} ({how}), {lora.trainable:,} ({per_rank:,} per rank)"
        )
    return [*methods.values(), *loras.values()]


def run_config(cfg: CompareConfig, method: Method, seed: int, run_dir: Path, data) -> TrainConfig:
    if method.kind == "mixture":
        return cfg.mixture_config(method.name, seed, run_dir / "train", **data)
    fields = cfg.base_config(seed, run_dir / "train", **data)
    return TrainConfig.from_dict({**fields, "lmoe": method.settings})


def read_routing(train_dir: Path) -> dict | None:
    """The held-out routing that lmoe train measured (routing.json: runs on the built-in mixture):
    ROUTING_SUMMARY's means over layers (I(domain; expert) in bits, entropy / log E, ESS, ...) and
    "layers", the same per layer; None where there is none."""
    path = train_dir / ROUTING_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def last_steps_mean(train_dir: Path, column: str, last: int = 10) -> float | None:
    """The mean of a metrics.csv column over the last `last` training steps that logged it."""
    rows = read_metrics(train_dir)[-last:] if (train_dir / METRICS).is_file() else []
    values = [r[column] for r in rows if r.get(column, "") != ""]
    return sum(values) / len(values) if values else None


def effective_support(train_dir: Path, last: int = 10) -> tuple[float | None, str | None]:
    """(ESS, where it was measured): the held-out routing's (routing.json, written for runs on
    the built-in mixture), else the mean of the last `last` training steps' (metrics.csv); (None,
    None) where neither has it (printed '-')."""
    routing = read_routing(train_dir)
    if routing and routing.get(SUPPORT_KEY) is not None:
        return routing[SUPPORT_KEY], "held-out"
    value = last_steps_mean(train_dir, SUPPORT_KEY, last)
    return (value, "training") if value is not None else (None, None)


def finished_run(path: Path, planned: TrainConfig) -> dict | None:
    """The stored result of a finished run, if any; one with other settings is refused."""
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    _refuse_other_settings(path, "a finished run", result["train_config"], planned)
    return result


def _refuse_other_settings(path: Path, what: str, saved: dict, planned: TrainConfig) -> None:
    """One error line naming the settings where a stored run differs from the planned one."""
    theirs, mine = dict(saved), json.loads(json.dumps(planned.to_dict()))
    theirs.pop("output_dir", None), mine.pop("output_dir", None)
    changed = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
    if changed:
        raise ValueError(
            f"{path} holds {what} with other settings ({', '.join(changed)}); compare into "
            "another output_dir, or delete that run to train it again."
        )


def train_and_score(method: Method, seed: int, train_cfg: TrainConfig) -> dict:
    """Train one run with lmoe train's loop (continuing its checkpoint, if any) and score it
    item by item."""
    out = Path(train_cfg.output_dir)
    resume = (out / CHECKPOINT).is_file()
    if resume:  # an interrupted run: continued only if it is this run
        _refuse_other_settings(out, "an unfinished run", read_saved_config(out), train_cfg)
    if out.exists() and not resume:  # an unfinished run that saved nothing worth continuing
        shutil.rmtree(out)
    items: dict[str, dict] = {}

    def evaluate(model, tokenizer, cfg) -> dict:
        items.update(score_items(model, tokenizer, cfg))
        return aggregates(items)

    start = time.perf_counter()
    trained = train(train_cfg, resume=resume, evaluate=evaluate)
    counted = count_parameters(trained.model)[0]
    if method.kind == "mixture" and method.trainable not in (None, counted):
        raise RuntimeError(f"compare: {method.name}'s trainable count changed while training")
    support, support_from = effective_support(out) if method.kind == "mixture" else (None, None)
    routing = read_routing(out) if method.kind == "mixture" else None
    return {
        "method": method.name,
        "kind": method.kind,
        "seed": seed,
        "trainable": counted if method.trainable is None else method.trainable,
        "s_per_step": read_metrics(out)[-1]["elapsed_s"] / train_cfg.steps,
        "wall_s": time.perf_counter() - start,  # training and scoring (a continued run: this part)
        "active_experts": last_steps_mean(out, "active_experts"),  # the last 10 training steps
        "effective_support_size": support,
        "effective_support_from": support_from,
        # the held-out routing (built-in mixture): means over layers, and per layer
        "routing": {k: routing[k] for k in ROUTING_SUMMARY} if routing else None,
        "routing_layers": routing["layers"] if routing else None,
        "train_config": train_cfg.to_dict(),
        "metrics": items,
    }


def run_method(
    cfg: CompareConfig, method: Method, seed: int, run_dir: Path, data=None, label: str = ""
) -> dict:
    """One (method, seed) of compare: its stored result if finished (refused if its settings
    differ), else trained, scored item by item and stored in run_dir/result.json.

    Args:
        data: {"data", "eval_data"} of a held-out split (split.split_files), or None: cfg's.
        label: what the progress line calls the run, e.g. "run 2/6".
    """
    train_cfg = run_config(cfg, method, seed, run_dir, data or {})
    result = finished_run(run_dir / RESULT, train_cfg)
    what = f"compare: {label + ': ' if label else ''}{method.name} seed {seed}"
    if result is not None:
        announce(f"{what}: finished, kept")
        return result
    announce(f"{what}: training")
    result = train_and_score(method, seed, train_cfg)
    write_json(result, run_dir / RESULT)
    return result


def score_base(cfg: CompareConfig, lora: Method, run_dir: Path, data=None) -> dict:
    """The base model alone (no adapter) scored item by item on the runs' held-out data, as the
    LoRA's run at the first seed scores it; kept in run_dir/result.json and scored again where
    those settings changed (it trains nothing)."""
    train_cfg = run_config(cfg, lora, cfg.seeds[0], run_dir, data or {})
    planned = json.loads(json.dumps(train_cfg.to_dict()))
    path = run_dir / RESULT
    stored = json.loads(path.read_text()) if path.is_file() else None
    if stored is not None and stored["train_config"] == planned:
        announce("compare: the base model: scored, kept")
        return stored
    announce("compare: the base model: scoring")
    model, tokenizer = load_model(cfg.model, load_in=train_cfg.load_in)
    model.to(make_accelerator(train_cfg).device)
    result = {
        "method": BASE,
        "kind": BASE,
        "seed": None,  # paired with every seed's run
        "trainable": 0,
        "s_per_step": None,
        "effective_support_size": None,
        "train_config": planned,
        "metrics": score_items(model.eval(), tokenizer, train_cfg),
    }
    write_json(result, path)
    return result


def compare(cfg: CompareConfig) -> dict:
    """Train and score every method at every seed (finished runs are read back, not trained
    again), print the tables and write compare.json (per-item results kept) and compare.md.
    Returns the report (compare.json's content)."""
    out = Path(cfg.output_dir)
    data = split_files(cfg, out / "split") if cfg.held_out_fraction else {}
    check_inputs(cfg.mixture_config(next(iter(cfg.mixtures)), 0, out, **data))  # before loading
    methods = plan_methods(cfg, load_model(cfg.model)[0])
    plan = [(m, seed) for seed in cfg.seeds for m in methods]  # seed-major, as bench's grids
    results = [
        run_method(
            cfg, method, seed, out / "runs" / f"{method.name}-s{seed}", data, f"run {k}/{len(plan)}"
        )
        for k, (method, seed) in enumerate(plan, 1)
    ]
    if cfg.base:
        lora = next(m for m in methods if m.kind == "lora")
        results.append(score_base(cfg, lora, out / "runs" / BASE, data))
    report = make_report(cfg, methods, results)
    write_json(report, out / REPORT_JSON)
    table = format_tables(report["summary"], report["differences"], report["from_base"])
    (out / REPORT_TABLE).write_text(table + "\n")
    print(table)
    return report


def make_report(cfg: CompareConfig, methods: list[Method], results: list[dict]) -> dict:
    """compare.json: settings, methods, per-method summary, paired differences, and every run
    with its per-item results (so the pairing can be recomputed)."""
    by_method = {m.name: [r for r in results if r["method"] == m.name] for m in methods}
    base = [r for r in results if r["kind"] == BASE]
    scored = {**by_method, BASE: base}
    summary = {name: method_summary(rows) for name, rows in scored.items() if rows}
    differences = []
    for m in (m for m in methods if m.kind == "mixture"):
        for metric, pair in pair_runs(by_method[m.name], by_method[m.lora]).items():
            differences.append({"mixture": m.name, "lora": m.lora, "metric": metric, **pair})
    from_base = []
    for name, rows in by_method.items() if base else ():
        for metric, pair in pair_with_base(rows, base[0]).items():
            from_base.append({"method": name, "metric": metric, **pair})
    return {
        "settings": cfg.to_dict(),
        "methods": {m.name: asdict(m) for m in methods},
        "summary": summary,
        "differences": differences,
        "from_base": from_base,
        "runs": results,
    }
