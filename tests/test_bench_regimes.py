"""bench/regimes.py: the settings it builds for `lmoe compare`, on lmoe.data.regimes' data."""

import json
from pathlib import Path

import pytest

from bench.regimes import (
    EXPERT_EQUAL_RANK,
    REGIMES,
    estimate_hours,
    finished_calls,
    run_regime,
    study_calls,
)
from lmoe.compare.stats import pair_runs
from lmoe.data.regimes import RegimeSizes, write_regimes

SMALL = RegimeSizes(
    conflict_train_inputs=8,
    conflict_test_inputs=4,
    tasks_train_total=32,
    tasks_test_total=16,
    retention_train=8,
    retention_test=4,
)


def test_every_regime_reads_the_files_the_data_module_writes(tmp_path):
    write_regimes(tmp_path, 0, SMALL, conversations=False)
    for name in REGIMES:
        settings = run_regime(name, tmp_path, tmp_path / "runs")
        files = [*settings["data"], *settings["eval_data"]]
        files = [f for f in files if not f.startswith("bench:")]
        files = [f for f in files if not f.endswith("conversations_test.jsonl")]  # left out here
        assert files and all(Path(f).is_file() for f in files), name
        assert settings["output_dir"] == str(tmp_path / "runs" / name)
    retention = run_regime("retention", tmp_path)
    assert {"bench:arc_easy", "bench:piqa", "bench:hellaswag"} <= set(retention["eval_data"])
    assert retention["steps"] >= 300 and retention["train"]["mc"]["protocol"] == "cloze"
    with pytest.raises(ValueError, match="Unknown regime"):
        run_regime("conflicts", tmp_path)


def test_mixtures_hold_a_rank_4_loras_experts_at_its_scale():
    for label, settings in study_calls(list(REGIMES), "data", "runs", [0, 1, 2]).items():
        assert settings["seeds"] == [0, 1, 2]
        assert settings["lora_rank"] in (None, EXPERT_EQUAL_RANK)
        assert settings["mixtures"], label
        for mixture in settings["mixtures"].values():
            experts, rank = mixture["lmoe.num_experts"], mixture["lmoe.rank"]
            assert experts * rank == EXPERT_EQUAL_RANK
            assert mixture["lmoe.alpha"] / rank == 2  # the LoRA's alpha / r: compare matches it
            assert mixture["lmoe.target_modules"] == settings["lora_target_modules"]
    conflict = run_regime("conflict")["mixtures"]
    assert {"softmax_params", "softmax_outputs", "top2", "dynamic"} <= set(conflict)
    assert conflict["softmax_outputs"]["lmoe.composition"] == "outputs"


def test_the_estimate_counts_each_run_once_and_skips_finished_calls(tmp_path):
    calls = study_calls(["conflict"], "data", "runs", [0, 1])
    mixtures = len(calls["conflict_nearest"]["mixtures"])
    # the mixtures (ReMix's steps count twice) and their LoRA, then the rank-4 LoRA, 2 seeds
    runs = (mixtures + 1 + 1 + 1) * 2
    steps = calls["conflict_nearest"]["steps"]
    assert estimate_hours(calls, 1.0, 0.0, 0.0) * 3600 == pytest.approx(runs * steps)
    scored = (mixtures + 1 + 1) * 2  # each run's test file once
    assert estimate_hours(calls, 0.0, 1.0, 0.0) * 3600 == pytest.approx(scored)
    retention = study_calls(["retention"], "data", "runs", [0])
    assert list(retention) == ["retention_nearest"]
    # each run's questions at one seed, and the base model's once
    questions = 3 * 200 * (len(retention["retention_nearest"]["mixtures"]) + 1 + 1)
    assert estimate_hours(retention, 0.0, 0.0, 1.0) * 3600 == pytest.approx(questions)
    results = tmp_path / "regimes.jsonl"
    assert finished_calls(results) == set()
    results.write_text('{"call": "conflict_nearest", "report": {}}\n\n')
    assert finished_calls(results) == {"conflict_nearest"}


def _run(method, kind, seed, hits, nll, ess=None):
    """A stored compare run: exact match per item (ids domain:k) and answer NLL, 2 tokens each."""
    ids = [f"{'ab'[k % 2]}:{k}" for k in range(len(hits))]
    return {
        "method": method,
        "kind": kind,
        "seed": seed,
        "trainable": 100,
        "s_per_step": 1.0 + seed,
        "effective_support_size": ess,
        "metrics": {
            "exact_match:test": {"kind": "mean", "ids": ids, "values": hits},
            "perplexity:test": {
                "kind": "perplexity",
                "ids": ids,
                "values": nll,
                "tokens": [2] * len(nll),
            },
        },
    }


def test_the_report_pairs_each_mixture_with_every_lora_by_hand(tmp_path):
    from bench.regimes_report import format_section, read_calls, regime_runs, write_report

    mix = [
        _run("mix", "mixture", s, h, [2.0] * 4, 1.5)
        for s, h in [(0, [1, 1, 0, 1]), (1, [1, 0, 0, 1])]
    ]
    lora6 = [_run("lora_r6", "lora", s, [0, 1, 0, 1], [2.0] * 4) for s in (0, 1)]
    lora4 = [_run("lora_r4", "lora", 0, [0, 0, 0, 0], [4.0] * 4)]
    results = tmp_path / "regimes.jsonl"
    calls = [("conflict_nearest", [*mix, *lora6]), ("conflict_r4", [*mix, lora4[0]])]
    results.write_text(
        "".join(
            json.dumps(
                {
                    "call": c,
                    "settings": {"steps": 5, "batch_size": 2, "lr": 0.1},
                    "report": {"runs": runs},
                }
            )
            + "\n"
            for c, runs in calls
        )
    )
    merged = regime_runs(read_calls(results))
    assert list(merged) == ["conflict"] and list(merged["conflict"]) == [
        "mix",
        "lora_r6",
        "lora_r4",
    ]
    assert [r["seed"] for r in merged["conflict"]["mix"]] == [0, 1]  # each run once
    text = format_section(read_calls(results))
    # exact match: mix 0.75 / 0.5, lora_r6 0.5 / 0.5; per item seed-averaged d = (1, -0.5, 0, 0):
    # mean 0.125, SE = sqrt(((0.875)^2 + (0.625)^2 + 2 (0.125)^2) / 12) = 0.3146
    assert "| mix | 100 | 2 | 0.625 ± 0.177 | 2.718 ± 0.000 | 1.500 ± 0.000 | 1.50 |" in text
    # by seed: 0.75 - 0.5, 0.5 - 0.5: mean 0.125, SE = sd (0.1768) / sqrt(2) = 0.125
    assert (
        "| mix − lora_r6 | 2 | +0.125 ± 0.315 (n=4) | +0.000 ± 0.000 (n=4) | +0.125 ± 0.125 |"
        in text
    )
    # only seed 0 pairs with lora_r4: d = (1, 1, 0, 1), log ppl 1 - 2 = -1 per item
    assert "| mix − lora_r4 | 1 | +0.750 ± 0.250 (n=4) | -1.000 ± 0.000 (n=4) | - |" in text
    # by domain (a: items 0, 2; b: 1, 3): mix seed 0 a 0.5 b 1, seed 1 a 0.5 b 0.5
    assert "| mix | 0.500 ± 0.000 | 0.750 ± 0.354 |" in text
    out = tmp_path / "RESULTS.md"
    out.write_text("# R\n\n## Other\n\nkept\n")
    write_report(results, out)
    write_report(results, out)  # rewritten in place, not appended twice
    assert out.read_text().count("## Regimes") == 1 and "kept" in out.read_text()


def test_the_report_pairs_with_the_base_model_and_lines_up_task_counts_by_hand(tmp_path):
    from bench.regimes_report import format_section, read_calls

    mix = [
        _run("mix", "mixture", s, h, [2.0] * 4, 1.5)
        for s, h in [(0, [1, 1, 0, 1]), (1, [1, 0, 0, 1])]
    ]
    lora = [_run("lora_r6", "lora", s, [0, 1, 0, 1], [2.0] * 4) for s in (0, 1)]
    base = {**_run("base", "base", 0, [0, 0, 1, 1], [3.0] * 4), "seed": None}
    base |= {"s_per_step": None, "trainable": 0}
    settings = {"steps": 5, "batch_size": 2, "lr": 0.1}
    calls = [
        ("tasks_4_nearest", [*mix, *lora]),
        ("tasks_2_nearest", [*mix, lora[0]]),
        ("retention_nearest", [*mix, *lora, base]),
    ]
    results = tmp_path / "regimes.jsonl"
    results.write_text(
        "".join(
            json.dumps({"call": c, "settings": settings, "report": {"runs": r}}) + "\n"
            for c, r in calls
        )
    )
    text = format_section(read_calls(results))
    retention = text[text.index("### retention") : text.index("### tasks_N")]
    assert "| base model (no training) | 0 | - | - | - |" in retention  # nothing trained
    # one row per metric: base, mix, lora_r6, mix - lora (items; by seed), each - base.
    # exact match: base 0.5; mix - lora as in the test above; mix - base per seed (1, 1, -1, 0),
    # (1, 0, -1, 0): dbar (1, 0.5, -1, 0), mean 0.125, SE = sqrt((0.875^2 + 0.375^2 + 1.125^2 +
    # 0.125^2) / 12) = 0.427; lora_r6 - base: d = (0, 1, -1, 0) at both seeds, SE sqrt(2/12)
    assert (
        "| exact match (test) | 0.625 ± 0.177 | 0.500 ± 0.000 | 0.500 | +0.125 ± 0.315 (n=4) "
        "| +0.125 ± 0.125 | +0.125 ± 0.427 (n=4) | +0.000 ± 0.408 (n=4) |"
    ) in retention
    # perplexity: base exp(3 * 4 / (2 * 4)) = 4.482; log differences 1 - 1.5 against the base
    assert (
        "| perplexity (test) (differences: its log) | 2.718 ± 0.000 | 2.718 ± 0.000 | 4.482 "
        "| +0.000 ± 0.000 (n=4) | +0.000 ± 0.000 | -0.500 ± 0.000 (n=4) | -0.500 ± 0.000 (n=4) |"
    ) in retention
    assert "method − base model" not in text and "by domain" not in retention
    # by seed, perplexity as its log: log ppl 1 against 2 and 1.5: -1, -0.5, SE 0.3536 / sqrt 2
    from bench.regimes_report import seed_cell

    other = [_run("lora_r6", "lora", s, [0] * 4, [v] * 4) for s, v in [(0, 4.0), (1, 3.0)]]
    assert seed_cell(pair_runs(mix, other)["perplexity:test"]) == "-0.750 ± 0.250"
    # task counts in order; tasks_2 pairs seed 0 only: 0.75 - 0.5, d = (1, 0, 0, 0), SE 0.25
    table = text[text.index("### tasks_N") :]
    assert table.index("| 2 | mix − lora_r6 |") < table.index("| 4 | mix − lora_r6 |")
    assert "| 2 | mix − lora_r6 | 0.625 ± 0.177 | 0.500 | +0.250 ± 0.250 (n=4) | - |" in table
    assert "| 4 | mix − lora_r6 | 0.625 ± 0.177 | 0.500 ± 0.000 | +0.125 ± 0.315 (n=4) |" in table
