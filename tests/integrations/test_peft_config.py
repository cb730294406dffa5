"""LMoEConfig is a peft.PeftConfig (lmoe/config.py): PeftConfig's fields are keyword-only and stay
out of what lmoe compares, prints and saves; the files written for a fixed config are those written
before LMoEConfig became a PeftConfig (saved_files.json, made by that code, its
run-dependent values nulled)."""

import dataclasses
import json
from pathlib import Path

import peft
import pytest
import yaml
from conftest import tiny_model
from peft import get_peft_model

import lmoe
from lmoe.config import PEFT_FIELDS, LMoEPeftType
from lmoe.io import CONFIG_FILE
from lmoe.training.config import TrainConfig, default_lmoe

SAVED = json.loads((Path(__file__).parent / "saved_files.json").read_text())
RUN_DEPENDENT = ("lmoe_version", "weights_sha256", "peft_version")


def test_an_lmoe_config_is_a_peft_config_of_lmoes_type():
    cfg = lmoe.LMoEConfig(num_experts=3, rank=2)
    assert (
        isinstance(cfg, peft.PeftConfig)
        and cfg.peft_type is LMoEPeftType.LMOE
        and cfg.peft_type == "LMOE"
    )
    assert cfg.peft_version == peft.__version__  # PeftConfig's own __post_init__ ran


def test_positional_arguments_and_repr_are_the_mixtures():
    cfg = lmoe.LMoEConfig(3, 2, 4.0)
    assert (cfg.num_experts, cfg.rank, cfg.alpha) == (3, 2, 4.0)
    assert repr(cfg).startswith("LMoEConfig(num_experts=3, rank=2, alpha=4.0, ")
    assert not [name for name in PEFT_FIELDS if f"{name}=" in repr(cfg)]
    peft_fields = [f for f in dataclasses.fields(lmoe.LMoEConfig) if f.name in PEFT_FIELDS]
    assert {f.name for f in peft_fields} == {f.name for f in dataclasses.fields(peft.PeftConfig)}
    assert all(f.kw_only and not f.compare and not f.repr for f in peft_fields), peft_fields


def test_what_peft_sets_on_a_config_changes_neither_equality_nor_its_dict():
    """get_peft_model writes the base model's name into the config it is given."""
    cfg, model = default_lmoe(), tiny_model("llama")
    model.name_or_path = "tiny/llama"
    get_peft_model(model, cfg)
    assert cfg.base_model_name_or_path == "tiny/llama"
    cfg.inference_mode, cfg.revision = True, "main"
    assert cfg == default_lmoe() and cfg.to_dict() == default_lmoe().to_dict()
    assert cfg != dataclasses.replace(default_lmoe(), rank=2)


def test_from_dict_knows_the_mixtures_fields_only():
    with pytest.raises(ValueError, match=r"^LMoEConfig has no field 'peft_type'\."):
        lmoe.LMoEConfig.from_dict({"peft_type": "LMOE"})


def without_added_fields(config: dict, saved: dict) -> dict:
    """config less the fields added to LMoEConfig since saved_files.json was made: the
    mixture's own fields."""
    added = set(config) - set(saved)
    assert added <= set(lmoe.LMoEConfig.__annotations__) - PEFT_FIELDS, added
    return {key: value for key, value in config.items() if key not in added}


def same_file(written: dict, saved: dict) -> None:
    """adapter_config.json as saved_files.json holds it: the same keys in the same
    order, the same values."""
    written = {key: None if key in RUN_DEPENDENT else value for key, value in written.items()}
    written["config"] = without_added_fields(written["config"], saved["config"])
    assert list(written) == list(saved)
    assert written == saved


def test_to_json_is_todays():
    text = lmoe.LMoEConfig(**SAVED["config"]).to_json()
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True)
    assert without_added_fields(json.loads(text), SAVED["to_json"]) == SAVED["to_json"]


def test_save_adapter_writes_todays_adapter_config(tmp_path):
    lmoe.save_adapter(
        lmoe.inject(tiny_model("llama"), lmoe.LMoEConfig(**SAVED["config"])), tmp_path
    )
    same_file(json.loads((tmp_path / CONFIG_FILE).read_text()), SAVED["save_adapter"])


def test_peft_save_pretrained_writes_todays_adapter_config(tmp_path):
    get_peft_model(tiny_model("llama"), lmoe.LMoEConfig(**SAVED["config"])).save_pretrained(
        tmp_path
    )
    same_file(json.loads((tmp_path / CONFIG_FILE).read_text()), SAVED["save_pretrained"])


def test_train_config_yaml_holds_the_mixtures_fields_only():
    cfg = TrainConfig(lmoe=lmoe.LMoEConfig(**SAVED["config"]))
    section = yaml.safe_load(cfg.to_yaml())["lmoe"]
    assert without_added_fields(section, SAVED["train_config_lmoe"]) == SAVED["train_config_lmoe"]
    assert list(section) == list(cfg.lmoe.to_dict())
    assert TrainConfig.from_dict(yaml.safe_load(cfg.to_yaml())).lmoe == cfg.lmoe
