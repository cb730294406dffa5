"""bench/routing_study.py's settings and table: valid configs at equal expert parameters, seeds
grouped per setting, EM mean, geometric-mean perplexity and routing columns as mean ± std; its run
path through lmoe compare on a tiny model and the paired columns."""

import json
import math
import statistics

import pytest

from bench.routing_study import CONFIGS, SECTION, format_table, run_name, summarise, write_report
from lmoe.training.config import TrainConfig


def row(config, seed, em, ppl, mi=None, extra=()):
    r = {
        "name": run_name(config, seed, list(extra)),
        "config": config,
        "seed": seed,
        "s_per_step": 2.0,
        "overrides": [
            "compare_base=false",
            f"seed={seed}",
            "save_every=0",
            *CONFIGS[config],
            *extra,
        ],
        "results": {
            "exact_match": dict(zip(["a", "b"], em, strict=True)),
            "perplexity": dict(zip(["x", "y"], ppl, strict=True)),
        },
    }
    if mi is not None:
        r["routing"] = {
            "mutual_information_bits": mi,
            "routing_entropy": 0.5,
            "top_weight_over_half": 0.9,
            "mean_active_experts": 4.0,
        }
        r["routing_layers"] = {
            f"l{i}": {"mutual_information_bits": v} for i, v in enumerate([0.0, 0.009, 2 * mi])
        }
    return r


def test_every_setting_is_a_valid_config_and_the_loras_match_the_mixtures_expert_parameters():
    for name, overrides in CONFIGS.items():
        cfg = TrainConfig.from_file(None, overrides)
        names = {
            f"router_lr_scale={cfg.router_lr_scale:g}",
            f"lmoe.router_param_scale={cfg.lmoe.router_param_scale:g}",
        }
        # every mixture names its router rate (group and parameter scale), whatever the defaults
        assert names <= set(overrides) or cfg.lmoe.num_experts == 1, name
    lora, mixture = TrainConfig.from_file(None, CONFIGS["lora_r16"]).lmoe, TrainConfig().lmoe
    assert (
        lora.rank == mixture.num_experts * mixture.rank
        and lora.alpha / lora.rank == mixture.alpha / mixture.rank
    )
    seven, recipe = (
        TrainConfig.from_file(None, CONFIGS[n]).lmoe for n in ("lora_r64_seven", "recipe_ld-mole")
    )
    assert (
        seven.rank == recipe.num_experts * recipe.rank
        and seven.target_modules == recipe.target_modules
    )
    assert seven.alpha / seven.rank == recipe.alpha / recipe.rank


def test_seeds_group_per_setting_with_mean_std_and_geometric_perplexity():
    rows = [
        row("lr_x30", 0, [0.6, 0.8], [20.0, 45.0], mi=0.2),
        row("lr_x30", 1, [0.8, 0.8], [30.0, 30.0], mi=0.4),
        row("lora_r16", 0, [0.5, 0.7], [10.0, 40.0]),
        row("lr_x30", 0, [0.1, 0.1], [5.0, 5.0], 0.1, ["steps=300"]),
    ]
    rows[1]["routing"]["effective_support_size"] = 1.5  # recorded by later runs only
    groups = summarise(rows)
    assert [(g["config"], g["seeds"]) for g in groups] == [
        ("lora_r16", [0]),
        ("lr_x30", [0, 1]),
        ("lr_x30", [0]),
    ]
    first = groups[1]
    assert first["em"] == pytest.approx([0.7, 0.8]) and first["ppl"] == pytest.approx(
        [30.0, 30.0]
    )  # sqrt(20 * 45)
    assert first["mi"] == [0.2, 0.4] and groups[0]["mi"] == []  # LoRA has no routing
    lines = format_table(rows).splitlines()
    cells = lines[3].split(" | ")
    sd = statistics.stdev([0.7, 0.8])
    assert cells[2:5] == ["2", f"{0.75:.3f} ± {sd:.3f}", "30.000 ± 0.000"]
    assert cells[5] == f"0.300 ± {statistics.stdev([0.2, 0.4]):.3f}"
    assert cells[8] == "1.500"  # effective support size: only seed 1 recorded it
    assert cells[10] == "2 / 2"  # per seed, the layers under 0.01 bit
    assert lines[2].split(" | ")[3:6] == ["0.600", f"{math.sqrt(400):.3f}", "-"]
    assert "steps=300" in lines[4] and "compare_base" not in lines[4] and len(lines) == 5


def test_the_report_rewrites_its_section_only(tmp_path):
    results, out = tmp_path / "r.jsonl", tmp_path / "RESULTS.md"
    results.write_text(json.dumps(row("lr_x30", 0, [0.6, 0.8], [20.0, 45.0], mi=0.2)) + "\n")
    out.write_text(f"# R\n\n## Before\nkept\n\n{SECTION}\nold table\n\n## After\nalso kept\n")
    write_report(results, out)
    text = out.read_text()
    assert "old table" not in text and "| lr_x30 |" in text and text.count(SECTION) == 1
    assert "## Before\nkept\n" in text and "## After\nalso kept\n" in text


# ---------------------------------------------------------------- the run path, on a tiny model

MIXTURE = {  # a small built-in mixture: 2 skills and 1 domain, 4 held-out items each
    "domains": ["german"],
    "skills": ["add", "sort"],
    "per_domain": 8,
    "per_skill": 8,
    "test_per_domain": 4,
    "test_per_skill": 4,
}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    from tiny import tiny_model_dir

    from bench.routing_study import main

    root = tmp_path_factory.mktemp("study")
    model = tiny_model_dir(root / "model")
    small = [f"mixture.{k}={v}".replace("'", "") for k, v in MIXTURE.items()]
    extra = [f"model={model}", "steps=2", "batch_size=4", "warmup_steps=1", "max_length=64"]
    argv = ["--configs", "lr_x30", "lora_r16", "--seeds", "0", "--extra", *extra, *small]
    argv += ["--results", str(root / "r.jsonl"), "--work-dir", str(root / "w")]
    main(argv)
    rows = [json.loads(line) for line in (root / "r.jsonl").read_text().splitlines()]
    return root, argv, rows


def test_each_run_is_trained_and_scored_by_lmoe_compare(study):
    from lmoe.evaluation.scoring import evaluate_mixture
    from lmoe.io import load_adapter
    from lmoe.models import load_model

    root, argv, rows = study
    assert [(r["config"], r["kind"]) for r in rows] == [("lr_x30", "mixture"), ("lora_r16", "lora")]
    for r in rows:
        stored = json.loads((root / "w" / r["name"] / "result.json").read_text())  # compare's run
        assert stored["metrics"] == r["metrics"] and set(r["metrics"]) == {
            "exact_match",
            "perplexity",
        }
        assert len(r["metrics"]["exact_match"]["ids"]) == 8  # 2 skills x 4 held-out items
        # the table's per-skill and per-domain figures: lmoe's own evaluation of the saved adapter
        cfg = TrainConfig.from_file(None, r["overrides"])
        model, tokenizer = load_model(cfg.model)
        load_adapter(model, root / "w" / r["name"] / "train" / "adapter")
        expected = evaluate_mixture(model, tokenizer, cfg.mixture, cfg.max_length)
        assert r["results"]["exact_match"] == pytest.approx(expected["exact_match"])
        assert r["results"]["perplexity"] == pytest.approx(expected["perplexity"])
        assert r["steps"] == 2 and r["trainable"] > 0 and r["s_per_step"] > 0
    mixture, lora = rows
    routing = json.loads((root / "w" / mixture["name"] / "train" / "routing.json").read_text())
    assert mixture["routing_layers"] == routing["layers"]
    assert mixture["routing"]["mutual_information_bits"] == routing["mutual_information_bits"]
    assert "routing" not in lora  # one expert: nothing routed


def test_the_table_pairs_each_setting_with_its_lora_over_items(study):
    _, _, rows = study
    mixture, lora = rows
    lines = format_table(rows).splitlines()
    assert lines[0].endswith("| EM - LoRA (paired SE) | log ppl - LoRA (paired SE) |")
    cells = {line.split(" | ")[0][2:]: line.split(" | ") for line in lines[2:]}
    d = [
        a - b
        for a, b in zip(
            mixture["metrics"]["exact_match"]["values"],
            lora["metrics"]["exact_match"]["values"],
            strict=True,
        )
    ]  # one seed: SE = sd of the per-item differences / sqrt(n)
    se = statistics.stdev(d) / math.sqrt(len(d))
    assert cells["lr_x30"][-2] == f"{statistics.mean(d):+.3f} ± {se:.3f} (n=8)"
    assert cells["lr_x30"][-1].endswith("(n=4) |")  # the domain's 4 held-out conversations
    assert cells["lora_r16"][-2:] == ["-", "- |"]


def test_a_rerun_trains_nothing_and_rows_lost_come_back_from_compares_runs(study, monkeypatch):
    import lmoe.compare.runs as runs
    from bench.routing_study import main

    root, argv, rows = study

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(runs, "train", no_training)
    main(argv)  # every name is in the results file
    (root / "r.jsonl").rename(root / "r.before.jsonl")
    main(argv)  # none is: read back from each run's result.json
    again = [json.loads(line) for line in (root / "r.jsonl").read_text().splitlines()]
    keep = ("command", "load_average")
    assert [{k: v for k, v in r.items() if k not in keep} for r in again] == [
        {k: v for k, v in r.items() if k not in keep} for r in rows
    ]


def test_the_report_of_old_and_new_rows(tmp_path):
    """Rows recorded before lmoe compare (no items) show '-' in the paired columns; a file of such
    rows only gives the table without them (today's RESULTS.md tables)."""
    old = row("lr_x30", 0, [0.6, 0.8], [20.0, 45.0], mi=0.2)

    def items(values):
        return {"kind": "mean", "ids": ["add:0", "add:1", "sort:2", "sort:3"], "values": values}

    def nll(values):
        return {"kind": "perplexity", "ids": ["de:0", "de:1"], "values": values, "tokens": [2, 2]}

    def new(config, seed, em, ppl, kind):
        r = row(config, seed, [0.5, 0.5], [10.0, 10.0], mi=0.3 if kind == "mixture" else None)
        metrics = {"exact_match": items(em), "perplexity": nll(ppl)}
        return r | {"extra": ["steps=300"], "kind": kind, "metrics": metrics}

    rows = [
        old,
        new("lr_x30", 0, [1, 1, 0, 1], [2.0, 4.0], "mixture") | {"overrides": ["steps=300"]},
        new("lr_x30", 1, [1, 0, 0, 1], [2.0, 2.0], "mixture") | {"overrides": ["steps=300"]},
        new("lora_r16", 0, [0, 1, 0, 1], [4.0, 4.0], "lora") | {"overrides": ["steps=300"]},
        new("lora_r16", 1, [0, 0, 0, 1], [2.0, 4.0], "lora") | {"overrides": ["steps=300"]},
    ]
    results, out = tmp_path / "r.jsonl", tmp_path / "RESULTS.md"
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_report(results, out)
    lines = [line for line in out.read_text().splitlines() if line.startswith("|")]
    assert lines[0].count(" | ") == 13 and "paired SE" in lines[0]
    by = {(line.split(" | ")[0][2:], line.split(" | ")[1]): line.split(" | ") for line in lines[2:]}
    assert len(by) == 3 and by[("lora_r16", "`steps=300`")][-2:] == ["-", "- |"]
    before = [
        cells for (config, over), cells in by.items() if config == "lr_x30" and "300" not in over
    ]
    assert before[0][-2:] == ["-", "- |"]  # recorded without per-item scores
    new_row = by[("lr_x30", "`steps=300`")]
    # EM: d = [1, 0, 0, 0] and [1, 0, 0, 0]: per item [1, 0, 0, 0], mean 0.25,
    # SE = sqrt((0.5625 + 3 * 0.0625) / (4 * 3)) = 0.25
    assert new_row[-2] == "+0.250 ± 0.250 (n=4)"
    # log ppl: items scaled by 1 / 2 tokens: d = [-1, 0] and [0, -1]: per item [-0.5, -0.5]
    assert new_row[-1] == "-0.500 ± 0.000 (n=2) |"
    results.write_text(json.dumps(old) + "\n")
    write_report(results, out)
    table = [line for line in out.read_text().splitlines() if line.startswith("|")]
    assert "paired SE" not in out.read_text() and table[0].count(" | ") == 11
    assert table[2] == format_table([old]).splitlines()[2]
