"""LMoEConfig: every bad value names the field and what is allowed; JSON round trip."""

import pytest

from lmoe import LMoEConfig

BAD = [
    (dict(rank=0), "rank"),
    (dict(num_experts=0), "num_experts"),
    (dict(num_experts=2.5), "num_experts"),
    (dict(router="hash"), "router.*softmax, topk, dynamic"),
    (dict(composition="sum"), "composition.*params, outputs"),
    (dict(router="topk", num_experts=2, top_k=3), "top_k.*1 to num_experts=2"),
    (dict(alpha=0), "alpha"),
    (dict(dropout=1.0), "dropout"),
    (dict(temperature=-1), "temperature"),
    (dict(target_modules=[]), "target_modules"),
    (dict(load_balance_coef=-0.1), "load_balance_coef"),
    (dict(z_loss_coef=float("nan")), "z_loss_coef"),
    (dict(rank=True), "rank"),
    (dict(router_init_std=-0.1), "router_init_std"),
    (dict(execution="fast"), "execution.*auto, dense, sparse"),
]


@pytest.mark.parametrize("kwargs,message", BAD)
def test_bad_values_raise_value_error_naming_the_field(kwargs, message):
    with pytest.raises(ValueError, match=f"LMoEConfig.{message}"):
        LMoEConfig(**kwargs)


def test_json_round_trip(tmp_path):
    cfg = LMoEConfig(
        num_experts=6, rank=3, router="topk", top_k=3, target_modules=r".*\.q_proj", dropout=0.1
    )
    assert LMoEConfig.from_json(cfg.to_json()) == cfg
    cfg.to_json(tmp_path / "c.json")
    assert LMoEConfig.from_json(tmp_path / "c.json") == cfg
    assert LMoEConfig.from_json(str(tmp_path / "c.json")) == cfg


def test_unknown_key_suggests_the_closest_field():
    with pytest.raises(ValueError, match="num_expert.*Did you mean 'num_experts'"):
        LMoEConfig.from_dict({"num_expert": 4})


def test_scaling_is_alpha_over_rank():
    assert LMoEConfig(rank=8, alpha=16).scaling == 2.0
