"""Router temperature annealing (lmoe.training.anneal): the schedule's values, every router set, the
training loop following the schedule and ending at lmoe.temperature, a resumed run alike, and the
config's refusals."""

import math

import pytest
import torch
from tiny import tiny_model_dir, write_jsonl
from transformers import AutoModelForCausalLM

import lmoe.training.loop as train_module
from lmoe import LMoEConfig, inject, lmoe_layers
from lmoe.training.anneal import annealed_temperature, set_router_temperature
from lmoe.training.config import TrainConfig
from lmoe.training.loop import train
from lmoe.training.metrics_log import read_metrics

ROWS = [
    {"prompt": f"What is {a} + {b}?", "completion": str(a + b)}
    for a in range(10, 14)
    for b in range(20, 23)
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("anneal")
    return tiny_model_dir(root / "model"), write_jsonl(root / "sums.jsonl", ROWS)


def config(setup, out, **kw) -> TrainConfig:
    fields = dict(
        model=str(setup[0]),
        data=[str(setup[1])],
        output_dir=str(out),
        steps=6,
        batch_size=4,
        lr=1e-2,
        warmup_steps=2,
        save_every=3,
        compare_base=False,
        temperature_start=4.0,
        temperature_anneal_steps=4,
        lmoe={"num_experts": 3, "rank": 2, "target_modules": "all-linear", "temperature": 1.0},
    )
    fields.update(kw)
    return TrainConfig.from_dict(fields)


def test_the_schedule_is_geometric_from_start_to_end():
    # hand values: 4 * (1/4) ** (s/4) = 4, 2^1.5, 2, 2^0.5, 1
    assert [annealed_temperature(4.0, 1.0, 4, s) for s in range(6)] == pytest.approx(
        [4, 2**1.5, 2, 2**0.5, 1, 1]
    )
    assert annealed_temperature(0.5, 2.0, 3, 1) == pytest.approx(0.5 * 4 ** (1 / 3))  # upward too
    assert annealed_temperature(4.0, 1.0, 0, 0) == 1.0


def test_every_router_routes_at_the_temperature_set(setup):
    model = inject(
        AutoModelForCausalLM.from_pretrained(setup[0]),
        LMoEConfig(num_experts=3, rank=2, target_modules="all-linear"),
    )
    layers = list(lmoe_layers(model))
    assert set_router_temperature(model, 0.25) == len(layers) > 1
    router = layers[0][1].router
    x = torch.randn(5, router.in_features)
    expected = torch.softmax(x.double() @ router.effective_weight().double().t() / 0.25, dim=-1)
    torch.testing.assert_close(router.route(x).weights.double(), expected, rtol=1e-5, atol=1e-6)


def test_training_follows_the_schedule_and_ends_at_the_configured_temperature(
    setup, tmp_path, monkeypatch
):
    seen = []

    def record(model, temperature):
        seen.append(temperature)
        return set_router_temperature(model, temperature)

    monkeypatch.setattr(train_module, "set_router_temperature", record)
    result = train(config(setup, tmp_path / "run", save_every=0))
    assert seen == pytest.approx(
        [4, 2**1.5, 2, 2**0.5, 1, 1, 1]
    )  # steps 0-5, then the end of training
    assert {layer.router.temperature for _, layer in lmoe_layers(result.model)} == {1.0}


def test_a_resumed_run_anneals_as_the_uninterrupted_one(setup, tmp_path):
    train(config(setup, tmp_path / "whole"))

    class Interrupt(Exception):
        pass

    def stop_after_4(row):
        if row["step"] == 4:
            raise Interrupt

    with pytest.raises(Interrupt):  # the last checkpoint is step 3, inside the annealing
        train(config(setup, tmp_path / "split"), on_step=stop_after_4)
    train(config(setup, tmp_path / "split"), resume=True)
    for a, b in zip(
        read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "split"), strict=True
    ):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6), a["step"]
        assert math.isfinite(a["routing_entropy"])


def test_the_config_refuses_what_cannot_anneal():
    with pytest.raises(
        ValueError,
        match=r"temperature_anneal_steps=9 is invalid: expected an integer in 1..steps \(6\)",
    ):
        TrainConfig(steps=6, temperature_start=3.0, temperature_anneal_steps=9)
    with pytest.raises(ValueError, match="expected 0 without temperature_start"):
        TrainConfig(temperature_anneal_steps=5)
    with pytest.raises(ValueError, match="temperature_start=0.0 is invalid"):
        TrainConfig(temperature_start=0.0, temperature_anneal_steps=5)
    with pytest.raises(ValueError, match="lmoe.router=dynamic has no temperature"):
        TrainConfig(temperature_start=3.0, temperature_anneal_steps=5, lmoe={"router": "dynamic"})
