"""ReMix's router (router="remix") under transformers' Trainer (LMoETrainer) and TRL's SFTTrainer:
each training forward runs every sequence under remix_samples drawn routings inside the model's
forward (lmoe/remix.py), so both loops train the experts and the routers without knowing of it.
tests/test_remix.py checks the loss and gradients those forwards give against hand-built ones."""

import pytest
import torch
from conftest import tiny_model
from test_hf_trainer import trainer
from test_training_loops import sft_trainer

import lmoe

REMIX = lmoe.LMoEConfig(
    num_experts=3, rank=2, target_modules=["q_proj", "v_proj"], router="remix", remix_samples=3
)


def remix_model():
    model = lmoe.inject(tiny_model("llama"), REMIX)
    torch.manual_seed(0)
    for _, layer in lmoe.lmoe_layers(model):
        torch.nn.init.normal_(layer.lora_B, std=0.1)  # the draws' losses differ from step 1
    return model


def adapter_tensors(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("loop", ["lmoe_trainer", "sft_trainer"])
def test_trainers_train_remix_routers_and_experts(tmp_path, loop):
    model = remix_model()
    before = adapter_tensors(model)
    make = trainer if loop == "lmoe_trainer" else sft_trainer
    t = make(model, tmp_path, steps=2)
    t.train()
    after = adapter_tensors(model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert any(".router." in n for n in changed) and any(".lora_A" in n for n in changed)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in t.state.log_history if "loss" in r)
