"""bench/regimes.py: the settings it builds for `lmoe compare`, on lmoe.data.regimes' data."""

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
    runs = (mixtures + 1 + 1) * 2  # the mixtures and their LoRA, then the rank-4 LoRA, 2 seeds
    steps = calls["conflict_nearest"]["steps"]
    assert estimate_hours(calls, 1.0, 0.0, 0.0) * 3600 == pytest.approx(runs * steps)
    retention = study_calls(["retention"], "data", "runs", [0])
    assert list(retention) == ["retention_nearest"]
    questions = 3 * 200 * (len(retention["retention_nearest"]["mixtures"]) + 1)
    assert estimate_hours(retention, 0.0, 0.0, 1.0) * 3600 == pytest.approx(questions)
    results = tmp_path / "regimes.jsonl"
    assert finished_calls(results) == set()
    results.write_text('{"call": "conflict_nearest", "report": {}}\n\n')
    assert finished_calls(results) == {"conflict_nearest"}
