"""The modular-skills study's arithmetic (bench/modular_report.py, bench/modular_parts.py)
against hand values."""

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.modular_parts import own_expert_share, task_information  # noqa: E402
from bench.modular_report import compose_correct, continual_matrix, forgetting, paired  # noqa: E402

TASKS = ["a", "b"]


def test_own_expert_share_per_task_per_layer_and_mean():
    usage = {
        "a": {"l1": torch.tensor([0.9, 0.1]), "l2": torch.tensor([0.5, 0.5])},
        "b": {"l1": torch.tensor([0.3, 0.7]), "l2": torch.tensor([0.2, 0.8])},
    }
    share = own_expert_share(usage, {"a": 0, "b": 1})
    assert share["per_task"] == pytest.approx(
        {"a": 0.7, "b": 0.75}
    )  # (0.9 + 0.5) / 2, (0.7 + 0.8) / 2
    assert share["per_layer"] == pytest.approx({"l1": 0.8, "l2": 0.65})
    assert share["mean"] == pytest.approx(0.725)


def test_task_information_is_one_bit_for_two_tasks_on_their_own_experts_and_zero_when_alike():
    usage = {
        "a": {"l1": torch.tensor([1.0, 0.0]), "l2": torch.tensor([0.5, 0.5])},
        "b": {"l1": torch.tensor([0.0, 1.0]), "l2": torch.tensor([0.5, 0.5])},
    }
    info = task_information(usage, {"a": 10, "b": 10})
    assert info["per_layer"]["l1"] == pytest.approx(1.0)
    assert info["per_layer"]["l2"] == pytest.approx(0.0, abs=1e-12)
    assert info["mean"] == pytest.approx(0.5)


def test_forgetting_is_best_earlier_accuracy_minus_final():
    matrix = [[0.6, None, None], [0.5, 0.7, None], [0.55, 0.4, 0.8]]
    # task a: best of 0.6 (stage 0), 0.5 (stage 1) -> 0.6 - 0.55; task b: 0.7 - 0.4
    assert forgetting(matrix) == pytest.approx([0.05, 0.3])


def test_paired_difference_and_its_standard_error_by_hand():
    a = {0: {"a": "1100", "b": "1111"}, 1: {"a": "1110", "b": "1011"}}
    b = {None: {"a": "1000", "b": "1011"}}  # seed-independent (the base model)
    p = paired(a, b, TASKS)
    # seed 0: (0.5 - 0.25 + 1 - 0.75) / 2 = 0.25; seed 1: (0.75 - 0.25 + 0.75 - 0.75) / 2 = 0.25
    assert p["mean"] == pytest.approx(0.25) and p["sd"] == pytest.approx(0.0) and p["seeds"] == 2
    d_a = torch.tensor([0, 1, 0.5, 0], dtype=torch.float64)  # per question, averaged over the seeds
    d_b = torch.tensor([0, 0.5, 0, 0], dtype=torch.float64)
    se = math.sqrt(float(d_a.var()) / 4 + float(d_b.var()) / 4) / 2
    assert p["se"] == pytest.approx(se)


def compose_row(method, seed, correct):
    return {"part": "compose", "method": method, "seed": seed, "correct": correct}


def test_oracle_is_each_task_scored_with_its_own_adapter():
    rows = [
        compose_row("adapter:a", 0, {"a": "11", "b": "00"}),
        compose_row("adapter:b", 0, {"a": "00", "b": "10"}),
    ]
    assert compose_correct(rows, TASKS)["oracle"] == {0: {"a": "11", "b": "10"}}


def test_continual_matrix_takes_stage_zero_of_the_sequential_lora_from_task_zeros_adapter():
    rows = [
        compose_row("adapter:a", 0, {"a": "1100", "b": "0000"}),
        {
            "part": "continual",
            "method": "seq_lora",
            "seed": 0,
            "stage": 1,
            "correct": {"a": "1000", "b": "1111"},
        },
    ]
    assert continual_matrix(rows, TASKS, "seq_lora") == {0: [[0.5, None], [0.25, 1.0]]}
    assert continual_matrix(rows[1:], TASKS, "lmoe_add") == {}  # an unfinished method is left out


def test_a_second_replay_share_is_its_own_row_of_the_continual_table():
    from bench.modular import replay_method
    from bench.modular_report import continual_methods, continual_table

    assert replay_method("lmoe_add", 0.25) == "lmoe_add_replay25"
    rows = [compose_row("adapter:a", 0, {"a": "11"}), compose_row("adapter:b", 0, {"b": "11"})]
    for method, final in [
        ("lmoe_add", {"a": "10", "b": "11"}),
        ("lmoe_add_replay25", {"a": "11", "b": "01"}),
    ]:
        rows += [
            {"part": "continual", "method": method, "seed": 0, "stage": 0, "correct": {"a": "11"}},
            {"part": "continual", "method": method, "seed": 0, "stage": 1, "correct": final},
        ]
    assert continual_methods(rows)[-1] == "lmoe_add_replay25" and continual_methods(rows)[:4] == [
        "seq_lora",
        "seq_lora_replay",
        "lmoe_add",
        "lmoe_add_replay",
    ]
    table = {
        line.split(" | ")[0].strip("| "): line
        for line in continual_table(rows, TASKS).splitlines()[2:]
    }
    assert set(table) == {"lmoe_add", "lmoe_add_replay25"}
    assert (
        "| 0.750 | 0.500 |" in table["lmoe_add"]
        and "| 0.750 | 0.000 |" in table["lmoe_add_replay25"]
    )


def test_layer_share_table_averages_each_module_kind_within_its_depth_range():
    from bench.modular_report import layer_share_table

    per_layer = {
        "m.layers.0.q_proj": 0.2,
        "m.layers.1.q_proj": 0.4,
        "m.layers.2.q_proj": 0.9,
        "m.layers.3.q_proj": 0.5,
        "m.layers.0.up_proj": 0.3,
        "m.layers.1.up_proj": 0.3,
        "m.layers.2.up_proj": 0.6,
        "m.layers.3.up_proj": 0.8,
    }
    row = {
        "part": "compose",
        "method": "zero_router",
        "own_share": {"per_layer": per_layer},
        "information": {"per_layer": {k: 2 * v for k, v in per_layer.items()}},
    }
    table = layer_share_table([row], groups=2)
    assert (
        "| q_proj | 0.300 / 0.600 | 0.700 / 1.400 |" in table
    )  # blocks 0-1: (0.2 + 0.4) / 2; blocks 2-3
    assert "| up_proj | 0.300 / 0.600 | 0.700 / 1.400 |" in table
    assert "blocks 0-1 | blocks 2-3" in table


def test_compose_table_gives_routed_methods_their_mean_own_share_and_information_over_seeds():
    from bench.modular_report import compose_table

    rows = [compose_row("oracle", 0, {"a": "11", "b": "10"})]
    for seed, share, info in [(0, 0.3, 0.1), (1, 0.5, 0.3)]:
        row = compose_row("zero_router", seed, {"a": "10", "b": "00"})
        row |= {"own_share": {"mean": share}, "information": {"mean": info}}
        rows.append(row)
    cells = {
        line.split(" | ")[0].strip("| "): line.strip("| ").split(" | ")
        for line in compose_table(rows, TASKS).splitlines()[2:]
    }
    # accuracy a, b, average; then share (0.3 + 0.5) / 2 with sd 0.141, information likewise
    assert cells["(d) lmoe composed, zero router trained alone"][2:] == [
        "0.500 ± 0.000",
        "0.000 ± 0.000",
        "0.250 ± 0.000",
        "0.400 ± 0.141",
        "0.200 ± 0.141",
    ]
    assert cells["(b) each task with its own adapter (oracle)"][-2:] == ["-", "-"]
