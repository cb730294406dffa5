"""bench/benchmarks.py's grid and table: overrides, mean ± std over seeds, standard errors; its run
path through lmoe compare on a tiny model and the paired column."""

import json
import math
import statistics

import pytest

from bench.benchmarks import (
    CONFIGS,
    accuracy,
    parse_args,
    questions,
    settings,
    table,
    train_overrides,
)
from lmoe.training.config import TrainConfig


def row(config, seed, accs, n=50, **extra):
    """A finished run as lmoe's results give it: every accuracy under its protocol/template."""

    def scored(acc):
        return {
            "cloze/plain": {"protocol": "cloze", "template": "plain", "acc": acc, "acc_norm": 0.0}
        }

    results = {
        f"bench:{t}": {"n": n, "chance": 0.25, **scored(a)}
        for t, a in zip(["arc_easy", "csqa"], accs, strict=True)
    }
    return {
        "config": config,
        "seed": seed,
        "results": results | {"bench:average": scored(sum(accs) / 2)},
        **extra,
    }


def old_row(config, seed, accs, n=50, **extra):
    """A run recorded before the results named their protocol (the settings did)."""
    acc = dict(zip(["arc_easy", "csqa"], accs, strict=True))
    return {
        "config": config,
        "seed": seed,
        "results": {"acc": {**acc, "average": sum(accs) / 2}, "n": {"arc_easy": n, "csqa": n}},
        **extra,
    }


def test_every_config_is_a_valid_train_config_at_equal_expert_parameters():
    args = parse_args([])
    for name, _ in CONFIGS:
        cfg = TrainConfig.from_file(None, train_overrides(args, name, seed=1))
        assert cfg.lmoe.num_experts * cfg.lmoe.rank == 16 and cfg.lmoe.alpha == 2 * cfg.lmoe.rank
        assert (
            cfg.seed == 1
            and cfg.data == [f"bench:{t}" for t in args.tasks]
            and cfg.mc.protocol == "cloze"
        )
    assert (
        TrainConfig.from_file(
            None, train_overrides(args, "params_dynamic_sparsity", 0)
        ).lmoe.sparsity_coef
        > 0
    )
    pinned = parse_args(["--set", "router_lr_scale=1"])
    assert (
        TrainConfig.from_file(None, train_overrides(pinned, "params_top2", 0)).router_lr_scale == 1
    )
    assert settings(pinned)["set"] == ["router_lr_scale=1"] and "set" not in settings(args)


def test_table_means_spreads_and_standard_errors():
    extra = {"trainable": 1000, "active_experts": 2.0, "s_per_step": 3.0}
    rows = [
        row("base", None, [0.2, 0.4]),
        row("lora_r16", 0, [0.5, 0.3], **extra),
        row("lora_r16", 1, [0.7, 0.5], **extra),
    ]
    lines = table(rows, ["arc_easy", "csqa"], "cloze/plain").splitlines()
    assert lines[0].split(" | ")[:2] == ["| config", "protocol"]
    base = lines[2].split(" | ")
    p = 0.3
    assert base[1] == "cloze/plain acc"  # every figure names its protocol
    assert base[6:8] == [
        "0.300",
        f"{math.sqrt(p * (1 - p) / 100):.3f}",
    ]  # binomial SE of the 100 pooled questions
    lora = lines[3].split(" | ")
    sd = statistics.stdev([0.5, 0.7])
    assert lora[1:6] == ["cloze/plain acc", "2", "1,000", f"0.600 ± {sd:.3f}", f"0.400 ± {sd:.3f}"]
    assert lora[6:8] == [f"0.500 ± {sd:.3f}", f"{sd / math.sqrt(2):.3f}"]
    assert lora[8:] == ["2.00", "3.00 |"]
    assert len(lines) == 4  # configs without a finished run are left out
    old = [
        old_row("base", None, [0.2, 0.4]),
        old_row("lora_r16", 0, [0.5, 0.3], **extra),
        old_row("lora_r16", 1, [0.7, 0.5], **extra),
    ]  # rows recorded before: the same table
    assert table(old, ["arc_easy", "csqa"], "cloze/plain") == "\n".join(lines)


def test_the_section_is_rewritten_in_place_and_other_sections_stay(tmp_path):
    from bench.benchmarks import SECTION, write_section

    out = tmp_path / "RESULTS.md"
    out.write_text("# R\n\n## Built-in comparison\nkept\n\n## Other\nalso kept\n")
    args = parse_args(["--out", str(out), "--tasks", "arc_easy", "csqa"])
    rows = [row("base", None, [0.2, 0.4])]
    write_section(rows, args, "cmd", planned=24, done=0)
    write_section(
        rows + [row("lora_r16", 0, [0.5, 0.3], trainable=1, active_experts=1.0, s_per_step=1.0)],
        args,
        "cmd",
        planned=24,
        done=1,
    )
    text = out.read_text()
    assert (
        text.count(SECTION) == 1
        and "## Built-in comparison\nkept\n" in text
        and "## Other\nalso kept\n" in text
    )
    assert "| lora_r16 | cloze/plain acc | 1 |" in text and "1 of its 24 training runs" in text
    from bench.benchmarks import finished

    assert (
        finished(
            rows + [row("lora_r16", 0, [0.5, 0.3]), row("lora_r16", 7, [0.5, 0.3])],
            [("base", None), ("lora_r16", 0), ("lora_r16", 1)],
        )
        == 1
    )  # seed 7 is another command's
    pinned = parse_args(
        ["--out", str(out), "--tasks", "arc_easy", "csqa", "--set", "router_lr_scale=30"]
    )
    write_section(
        rows, pinned, "cmd", planned=24, done=0
    )  # another --set: a section of its own, the first one kept
    text = out.read_text()
    assert (
        f"{SECTION} with `router_lr_scale=30`\n" in text
        and "| lora_r16 | cloze/plain acc | 1 |" in text
    )
    assert text.count(SECTION + "\n") == 1


def test_finished_counts_only_this_commands_training_runs():
    from bench.benchmarks import finished

    rows = [
        row("base", None, [0.2, 0.4]),
        row("lora_r16", 0, [0.5, 0.3]),
        row("lora_r16", 7, [0.5, 0.3]),
    ]
    assert (
        finished(rows, [("base", None), ("lora_r16", 0), ("lora_r16", 1)]) == 1
    )  # seed 7: another command's


# ---------------------------------------------------------------- the run path, on a tiny model


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """bench/benchmarks.py's grid on a tiny model and a tiny copy of the benchmark data: the base,
    lora_r16 and params_top2 at seed 0, 2 steps."""
    from bench_fixture import write_fixture
    from tiny import tiny_model_dir

    from bench.benchmarks import main
    from lmoe.data import benchmarks

    root = tmp_path_factory.mktemp("grid")
    model = tiny_model_dir(root / "model")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(benchmarks.ROOT_ENV, str(write_fixture(root / "data", n=40)))
        argv = ["--model", str(model), "--tasks", "arc_easy", "csqa", "--seeds", "0"]
        argv += ["--configs", "lora_r16", "params_top2", "--steps", "2", "--batch-size", "4"]
        argv += ["--max-length", "64", "--test-items", "4", "--set", "warmup_steps=1"]
        argv += ["--results", str(root / "r.jsonl"), "--out", str(root / "R.md")]
        main([*argv, "--work-dir", str(root / "w")])
        rows = [json.loads(line) for line in (root / "r.jsonl").read_text().splitlines()]
        yield root, argv, rows


def test_each_run_is_trained_and_scored_by_lmoe_compare(grid):
    from lmoe.data.choices import MultipleChoice
    from lmoe.evaluation.scoring import evaluate_benchmarks
    from lmoe.io import load_adapter
    from lmoe.models import load_model

    root, argv, rows = grid
    assert [(r["config"], r["seed"]) for r in rows] == [
        ("base", None),
        ("lora_r16", 0),
        ("params_top2", 0),
    ]
    args = parse_args(argv)
    for r in rows:
        assert set(r["metrics"]) == {"bench:arc_easy cloze/plain acc", "bench:csqa cloze/plain acc"}
        model, tokenizer = load_model(args.model)
        if r["config"] != "base":
            run = root / "w" / f"{r['config']}-s0"
            assert json.loads((run / "result.json").read_text())["metrics"] == r["metrics"]
            load_adapter(model, run / "train" / "adapter")
            assert r["trainable"] > 0 and r["s_per_step"] > 0 and r["active_experts"] >= 1
        # the table's accuracies: lmoe's own benchmark evaluation of the same model
        fmt = MultipleChoice("cloze", "plain", 4)
        expected = evaluate_benchmarks(model, tokenizer, args.tasks, fmt, args.max_length)
        for task in [*args.tasks, "average"]:
            got = accuracy(r["results"], task, "cloze/plain")
            assert got == pytest.approx(expected[f"bench:{task}"]["cloze/plain"]["acc"])
        assert questions(r["results"], "csqa") == expected["bench:csqa"]["n"]


def test_the_table_pairs_each_mixture_with_lora_r16_over_questions(grid):
    root, argv, rows = grid
    lines = table(rows, ["arc_easy", "csqa"], "cloze/plain").splitlines()
    assert lines[0].endswith("| s/step | average - lora_r16 (paired SE) |")
    cells = {line.split(" | ")[0][2:]: line.split(" | ") for line in lines[2:]}
    assert cells["base"][-1] == cells["lora_r16"][-1] == "- |"
    mixture, lora = rows[2]["metrics"], rows[1]["metrics"]
    differences, ses = [], []
    for metric in mixture:  # per task: one seed, so SE = sd of the differences / sqrt(n)
        d = [a - b for a, b in zip(mixture[metric]["values"], lora[metric]["values"], strict=True)]
        differences.append(statistics.mean(d))
        ses.append(statistics.stdev(d) / math.sqrt(len(d)))
    n = sum(len(m["values"]) for m in mixture.values())
    average, se = statistics.mean(differences), math.sqrt(sum(s * s for s in ses)) / 2
    assert cells["params_top2"][-1] == f"{average:+.3f} ± {se:.3f} (n={n}) |"
    assert "average - lora_r16: the difference" in (root / "R.md").read_text()
