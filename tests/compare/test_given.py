"""lmoe compare's pieces for the bench studies, without training: a method given as whole lmoe train
settings builds the same TrainConfig back; runs paired by seed; the mean of several differences;
a metric per group of items."""

import math

import pytest

from bench import benchmarks, routing_study
from lmoe.compare.given import given_method
from lmoe.compare.items import PERPLEXITY, group_values
from lmoe.compare.runs import run_config
from lmoe.compare.stats import mean_difference, pair_runs, paired_difference
from lmoe.training.config import TrainConfig


def study_settings():
    """Every setting of both studies, as their run paths give them to lmoe compare."""
    for name, overrides in routing_study.CONFIGS.items():
        yield name, ["compare_base=false", "seed=1", "save_every=0", *overrides, "steps=300"]
    args = benchmarks.parse_args(["--set", "router_lr_scale=30"])
    for name, _ in benchmarks.CONFIGS:
        yield name, benchmarks.train_overrides(args, name, 2)


@pytest.mark.parametrize("name, overrides", list(study_settings()))
def test_a_given_setting_is_trained_as_given(name, overrides, tmp_path):
    given = TrainConfig.from_file(None, overrides)
    cfg, method = given_method(given, name, tmp_path)
    built = run_config(cfg, method, given.seed, tmp_path / "run", {}).to_dict()
    expected = given.to_dict() | {"output_dir": str(tmp_path / "run" / "train")}
    expected["recipe"] = None  # resolved: its settings are in the fields
    if method.kind == "lora":  # router-only settings: compare's LoRA leaves them at the default
        expected["router_lr_scale"] = TrainConfig().router_lr_scale
    assert method.kind == ("lora" if given.lmoe.num_experts == 1 else "mixture")
    assert built == expected
    assert cfg.seeds == [given.seed] and method.trainable is None


def test_a_given_setting_from_a_saved_adapter_is_refused(tmp_path):
    given = TrainConfig()
    given.init_adapter, given.frozen_experts = str(tmp_path), [0]  # (a real one needs an adapter)
    with pytest.raises(ValueError, match="sets init_adapter, frozen_experts: compare trains fresh"):
        given_method(given, "frozen", tmp_path)


def metric(values, ids=("a:0", "a:1", "b:2")):
    return {"kind": "mean", "ids": list(ids), "values": values}


def test_runs_pair_by_seed_and_rows_without_items_are_left_out():
    mixture = [
        {"seed": 0, "metrics": {"em": metric([1, 1, 0])}},
        {"seed": 1, "metrics": {"em": metric([1, 0, 0])}},
        {"seed": 2, "metrics": {"em": metric([1, 1, 1])}},  # no LoRA at seed 2
        {"seed": 3},  # recorded without per-item scores
    ]
    lora = [
        {"seed": 1, "metrics": {"em": metric([0, 0, 0])}},
        {"seed": 0, "metrics": {"em": metric([1, 0, 0])}},
        {"seed": 3},
    ]
    pairs = pair_runs(mixture, lora)
    expected = paired_difference(
        [metric([1, 1, 0]), metric([1, 0, 0])], [metric([1, 0, 0]), metric([0, 0, 0])]
    )
    assert pairs == {"em": {"kind": "mean", **expected, "seed_list": [0, 1]}}
    assert pairs["em"]["difference"] == pytest.approx(1 / 3)  # per item [0.5, 0.5, 0]
    assert pair_runs(mixture[3:], lora) == {}


def test_mean_of_differences_by_hand():
    pairs = [
        {"difference": 0.1, "paired_se": 0.03, "n": 50, "seeds": 3},
        {"difference": -0.02, "paired_se": 0.04, "n": 40, "seeds": 2},
    ]
    got = mean_difference(pairs)
    assert got["difference"] == pytest.approx(0.04)
    assert got["paired_se"] == pytest.approx(math.sqrt(0.03**2 + 0.04**2) / 2)  # 0.025
    assert (got["n"], got["seeds"]) == (90, 2)
    assert mean_difference([{**pairs[0], "paired_se": None}, pairs[1]])["paired_se"] is None


def test_group_values_are_lmoe_trains_per_domain_metrics():
    assert group_values(metric([1, 0, 1])) == {"a": 0.5, "b": 1.0}
    ppl = {
        "kind": PERPLEXITY,
        "ids": ["german:0", "german:1", "en/tech:2"],
        "values": [3.0, 1.0, 2.0],
        "tokens": [2, 2, 4],
    }
    got = group_values(ppl)  # pooled over the domain's answer tokens
    assert got == pytest.approx({"german": math.exp(4.0 / 4), "en/tech": math.exp(2.0 / 4)})
