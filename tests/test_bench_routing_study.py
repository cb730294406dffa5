"""bench/routing_study.py's settings and table (no model runs): valid configs at equal expert
parameters, seeds grouped per setting, EM mean, geometric-mean perplexity and routing
columns as mean ± std."""

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
    assert cells[9] == "2 / 2"  # per seed, the layers under 0.01 bit
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
