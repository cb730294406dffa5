"""PEFT's entry points on an lmoe adapter (lmoe/integrations/peft_tuner.py): get_peft_model(model,
LMoEConfig(...)), save_pretrained / PeftModel.from_pretrained (the files save_adapter writes),
disable_adapter, unload, merge_and_unload with a fixed routing; registration when
lmoe is imported."""

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, reset_accelerate, tiny_model
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import lmoe
from lmoe.inject import get_config
from lmoe.integrations.peft_tuner import PEFT_PREFIX, LMoETuner
from lmoe.io import CONFIG_FILE, WEIGHTS_FILE, adapter_state_dict

IDS = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))


def peft_model(router: str = "softmax", **overrides):
    """A tiny Llama through get_peft_model with an lmoe config; B random so the adapter
    changes the outputs."""
    cfg = lmoe.LMoEConfig(
        num_experts=3,
        rank=2,
        router=router,
        target_modules=["q_proj", "v_proj", "up_proj"],
        **overrides,
    )
    model = get_peft_model(tiny_model("llama"), cfg)
    torch.manual_seed(1)
    for _, layer in lmoe.lmoe_layers(model):
        torch.nn.init.normal_(layer.lora_B, std=0.2)
    return model.eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_get_peft_model_trains_exactly_the_experts_and_routers():
    model = peft_model()
    assert isinstance(model, PeftModel)
    trainable = {
        n.removeprefix("base_model.model.") for n, p in model.named_parameters() if p.requires_grad
    }
    assert trainable == set(adapter_state_dict(model.get_base_model()))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        model.print_trainable_parameters()
    n_trainable, n_total = lmoe.count_parameters(model)
    assert f"trainable params: {n_trainable:,} || all params: {n_total:,}" in out.getvalue()
    assert not torch.equal(logits(model), logits(tiny_model("llama")))


@pytest.mark.parametrize("router", ["softmax", "dynamic"])
def test_save_pretrained_and_from_pretrained_give_the_same_logits(tmp_path, router):
    model = peft_model(router)
    model.save_pretrained(tmp_path)
    assert {CONFIG_FILE, WEIGHTS_FILE} <= {p.name for p in tmp_path.iterdir()}
    assert json.loads((tmp_path / CONFIG_FILE).read_text())["peft_type"] == "LMOE"
    loaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path)
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)
    torch.testing.assert_close(
        logits(lmoe.load_adapter(tiny_model("llama"), tmp_path)), logits(model), rtol=0, atol=0
    )
    if (
        router == "dynamic"
    ):  # LD-MoLE's lambda head: saved once, one module for every layer after loading
        heads = {layer.router.lambda_head for _, layer in lmoe.lmoe_layers(loaded)}
        assert len(heads) == 1
        saved = [key for key in load_file(str(tmp_path / WEIGHTS_FILE)) if ".lambda_head." in key]
        assert len(saved) == len(heads.pop().state_dict())


def test_save_adapter_directory_loads_in_peft(tmp_path):
    model = lmoe.inject(
        tiny_model("llama"), lmoe.LMoEConfig(num_experts=2, rank=2, router="topk", top_k=1)
    )
    for _, layer in lmoe.lmoe_layers(model):
        torch.nn.init.normal_(layer.lora_B, std=0.2)
    lmoe.save_adapter(model, tmp_path)
    torch.testing.assert_close(
        logits(PeftModel.from_pretrained(tiny_model("llama"), tmp_path)),
        logits(model.eval()),
        rtol=0,
        atol=0,
    )


def test_adapters_saved_in_the_first_format_still_load(tmp_path):
    """Format 1 (lmoe 0.1.0 before PEFT's names): adapter.safetensors and a config
    without PEFT's keys."""
    model = lmoe.inject(tiny_model("llama"), lmoe.LMoEConfig(num_experts=2, rank=2))
    for _, layer in lmoe.lmoe_layers(model):
        torch.nn.init.normal_(layer.lora_B, std=0.2)
    save_file(
        adapter_state_dict(model), str(tmp_path / "adapter.safetensors"), metadata={"format": "pt"}
    )
    meta = {
        "lmoe_version": "0.1.0",
        "format_version": 1,
        "base_model_type": "llama",
        "config": get_config(model).to_dict(),
        "layers": {
            name: [layer.in_features, layer.out_features] for name, layer in lmoe.lmoe_layers(model)
        },
    }
    (tmp_path / CONFIG_FILE).write_text(json.dumps(meta))
    torch.testing.assert_close(
        logits(lmoe.load_adapter(tiny_model("llama"), tmp_path)),
        logits(model.eval()),
        rtol=0,
        atol=0,
    )


def test_disable_adapter_runs_the_base_exactly_and_keeps_trainability():
    base = logits(tiny_model("llama"))
    model = peft_model()
    adapted = logits(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with model.disable_adapter():
        torch.testing.assert_close(logits(model), base, rtol=0, atol=0)
    torch.testing.assert_close(logits(model), adapted, rtol=0, atol=0)
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}


def test_unload_gives_the_base_model_back():
    base = logits(tiny_model("llama"))
    unloaded = peft_model().unload()
    assert not list(lmoe.lmoe_layers(unloaded)) and not hasattr(unloaded, "peft_config")
    torch.testing.assert_close(logits(unloaded), base, rtol=0, atol=0)


def test_merge_and_unload_folds_a_fixed_routing_as_peft_lora_does(tmp_path):
    """Reference: the same routing exported as a plain LoRA (export_peft) and run by
    PEFT's own LoRA code."""
    model = peft_model(composition="outputs")
    g = torch.tensor([0.5, 0.3, 0.2])
    lmoe.export_peft(model.get_base_model(), tmp_path, g)
    lora = PeftModel.from_pretrained(tiny_model("llama"), tmp_path)
    merged = model.merge_and_unload(routing=g)
    assert not list(lmoe.lmoe_layers(merged))
    torch.testing.assert_close(logits(merged), logits(lora), rtol=1e-5, atol=1e-5)


def test_merge_and_unload_refuses_per_token_routing():
    with pytest.raises(ValueError, match=r"merge_and_unload needs a fixed routing.*routing=g"):
        peft_model().merge_and_unload()


def test_a_second_adapter_is_refused():
    model = peft_model()
    with pytest.raises(ValueError, match="one lmoe adapter"):
        model.add_adapter("other", lmoe.LMoEConfig(num_experts=2, rank=2))


@pytest.mark.parametrize("order", ["import lmoe", "import peft, lmoe"])
def test_importing_lmoe_files_it_in_pefts_tables(order):
    """In a fresh interpreter, peft imported first or not (this checkout's lmoe: cwd on
    sys.path)."""
    code = (
        f"{order}; from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING as M, "
        "PEFT_TYPE_TO_CONFIG_MAPPING as C; print(M['LMOE'].__name__, C['LMOE'].__name__)"
    )
    run = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert run.stdout.split() == ["LMoETuner", "LMoEPeftConfig"], run.stderr[-2000:]


def test_lmoe_functions_take_the_peft_model_as_the_model_inside(tmp_path):
    """Layer names (record_routing, save_adapter, export) are the transformers model's,
    PeftModel or not."""
    model = peft_model()
    with lmoe.record_routing(model) as rec:
        model(input_ids=IDS)
    assert set(rec) == {name for name, _ in lmoe.lmoe_layers(model.get_base_model())}
    assert all(not name.startswith("base_model.") for name in rec)
    lmoe.save_adapter(model, tmp_path)
    torch.testing.assert_close(
        logits(lmoe.load_adapter(tiny_model("llama"), tmp_path)), logits(model), rtol=0, atol=0
    )


def test_trl_sft_trainer_takes_an_lmoe_config_as_its_peft_config(tmp_path):
    """TRL's usual call, a model directory and `peft_config=lmoe.LMoEConfig(...)`, two steps: every
    expert and router tensor moved, nothing of the base did."""
    from datasets import Dataset
    from tiny import CORPUS, tiny_model_dir
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    base = str(tiny_model_dir(tmp_path / "base"))
    args = SFTConfig(
        str(tmp_path / "out"),
        max_steps=2,
        use_cpu=True,
        report_to="none",
        learning_rate=1e-2,
        save_strategy="no",
    )
    trainer = SFTTrainer(
        model=base,
        args=args,
        train_dataset=Dataset.from_dict({"text": CORPUS}),
        processing_class=AutoTokenizer.from_pretrained(base),
        peft_config=lmoe.LMoEConfig(num_experts=4, rank=8),
    )
    assert isinstance(trainer.model, PeftModel) and isinstance(trainer.model.base_model, LMoETuner)
    start = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()
    reset_accelerate()
    moved = {
        name for name, p in trainer.model.named_parameters() if not torch.equal(p, start[name])
    }
    assert moved == {
        PEFT_PREFIX + name for name in adapter_state_dict(trainer.model.get_base_model())
    }
    assert any(".router." in name for name in moved) and any(".lora_A" in name for name in moved)


def test_a_peft_config_built_from_lmoes_registers_itself(monkeypatch):
    """LMoEPeftConfig.from_lmoe(cfg) passed where a PeftConfig goes, with nothing filed in
    PEFT's tables yet."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    from lmoe.integrations.peft_tuner import LMoEPeftConfig

    for table in (PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING):
        monkeypatch.delitem(table, "LMOE")
    model = get_peft_model(
        tiny_model("llama"), LMoEPeftConfig.from_lmoe(lmoe.LMoEConfig(num_experts=2, rank=2))
    )
    assert isinstance(model.base_model, LMoETuner)
