"""`lmoe train` with ReMix's router (router="remix"): a few steps train experts and routers, the
routing uses exactly k experts, and the saved adapter loads back with its router kind and serves
the same logits."""

import json

import pytest
import torch
from safetensors.torch import load_file
from tiny import tiny_model_dir, train_config, write_jsonl
from transformers import AutoModelForCausalLM

from lmoe import LMoEConfig, inject, lmoe_layers, load_adapter
from lmoe.training.loop import train
from lmoe.training.metrics_log import read_metrics

ROWS = [
    {"prompt": f"What is {a} + {b}?", "completion": str(a + b)} for a in range(6) for b in (2, 7)
]
REMIX = {"num_experts": 3, "rank": 2, "target_modules": "all-linear", "router": "remix"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("remix")
    return tiny_model_dir(root / "model"), write_jsonl(root / "sums.jsonl", ROWS)


def test_remix_trains_experts_and_routers_and_saves_its_router_kind(setup, tmp_path):
    """With activation checkpointing: the re-run forward draws the routing the first one drew
    (tests/test_remix.py checks the gradients against a run without it)."""
    cfg = train_config(
        setup,
        tmp_path,
        steps=4,
        save_every=0,
        gradient_checkpointing=True,
        lmoe={**REMIX, "top_k": 2, "remix_samples": 3},
    )
    result = train(cfg)
    rows = read_metrics(tmp_path)
    assert len(rows) == 4 and all(r["active_experts"] == pytest.approx(2.0) for r in rows)
    saved = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert saved["config"]["router"] == "remix" and saved["config"]["remix_samples"] == 3

    # the routers moved from their init (drawn from the seed as train's inject drew them)
    fresh = AutoModelForCausalLM.from_pretrained(setup[0])
    torch.manual_seed(cfg.seed)
    inject(fresh, cfg.lmoe)
    weights = load_file(result.adapter_dir / "adapter_model.safetensors")
    moved = [
        not torch.equal(weights[f"{name}.router.weight"], layer.router.weight)
        for name, layer in lmoe_layers(fresh)
    ]
    assert all(moved)

    # loaded back: a remix router, and evaluation (top-k, no draws) gives the trained model's logits
    loaded = load_adapter(AutoModelForCausalLM.from_pretrained(setup[0]), result.adapter_dir)
    assert all(layer.router.top_k == 2 for _, layer in lmoe_layers(loaded))
    ids = torch.tensor([[5, 9, 17, 3, 8]])
    result.model.eval()
    with torch.no_grad():
        assert torch.equal(loaded.eval()(ids).logits, result.model(ids).logits)


def test_remix_config_round_trips_through_json():
    cfg = LMoEConfig(router="remix", top_k=3, num_experts=5, remix_samples=4)
    again = LMoEConfig.from_json(cfg.to_json())
    assert again == cfg and again.load_balance_coef == 0.0
