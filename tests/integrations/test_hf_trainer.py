"""LMoETrainer against a hand-written loop: the objective per optimizer step is Trainer's LM loss
plus the mean over the step's micro-batches of lmoe.aux_loss. Trainer's LM loss (transformers 5):
for a model whose forward takes **kwargs (model_accepts_loss_kwargs), the summed token losses of all
the step's micro-batches over their number of answer tokens (num_items_in_batch); otherwise the mean
over micro-batches of each one's mean token loss (training_step divides by
gradient_accumulation_steps)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB, tiny_model
from tiny import worker_pythonpath
from transformers import TrainingArguments

import lmoe
from lmoe.data.encoding import IGNORE, Example, collate
from lmoe.integrations.hf_trainer import LMoETrainer
from lmoe.io import adapter_state_dict

# router_param_scale 1: these loops step by SGD, under which the scale c would multiply the routers'
# rate by c^2 (Adam's by c); the routers' rates here are the parameter groups' alone
CFG = lmoe.LMoEConfig(
    num_experts=3,
    rank=2,
    target_modules=["q_proj", "v_proj"],
    load_balance_coef=0.5,
    z_loss_coef=0.1,
    router_param_scale=1.0,
)
LR, BATCH, ACCUM = 0.5, 2, 2


def examples(n: int) -> list[dict]:
    """Rows of different lengths whose first tokens (the prompt) have no loss, so micro-batches hold
    different numbers of answer tokens and padding."""
    g = torch.Generator().manual_seed(2)
    rows = []
    for i in range(n):
        length, prompt = 4 + (3 * i) % 7, 1 + i % 3
        ids = torch.randint(0, VOCAB, (length,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [IGNORE] * prompt + ids[prompt:]})
    return rows


def pad(rows: list[dict]) -> dict:
    return collate([Example(r["input_ids"], r["labels"]) for r in rows], pad_id=0)


def adapted_model(seed: int = 0):
    """A tiny Llama with experts whose B is random (not zero), so every adapter
    tensor gets gradients."""
    model = lmoe.inject(tiny_model("llama"), CFG)
    torch.manual_seed(seed)
    for _, layer in lmoe.lmoe_layers(model):
        torch.nn.init.normal_(layer.lora_B, std=0.1)
    return model


def trainer(
    model, out, steps: int, eval_dataset=None, router_lr_scale: float = 30.0, **overrides
) -> LMoETrainer:
    args = dict(
        output_dir=str(out),
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=ACCUM,
        max_steps=steps,
        learning_rate=LR,
        optim="sgd",
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        train_sampling_strategy="sequential",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    args = TrainingArguments(**{**args, **overrides})
    rows = examples(steps * args.world_size * args.per_device_train_batch_size * ACCUM)
    return LMoETrainer(
        model=model,
        args=args,
        train_dataset=rows,
        eval_dataset=eval_dataset,
        data_collator=pad,
        router_lr_scale=router_lr_scale,
    )


def step_tokens(micro: list[dict], batch: dict):
    """Trainer's LM loss normalisation with num_items_in_batch: the answer tokens
    of the whole step."""
    return sum((b["labels"][:, 1:] != IGNORE).sum() for b in micro)


def micro_batch_tokens(micro: list[dict], batch: dict):
    """Without it: each micro-batch's own answer tokens, times the number of micro-batches."""
    return (batch["labels"][:, 1:] != IGNORE).sum() * len(micro)


def reference_steps(
    model, steps: int, lm_denominator=step_tokens, router_lr_scale: float = 30.0
) -> list[float]:
    """Plain SGD on the objective written out, the routers (by name) at LR * router_lr_scale (as
    LMoETrainer's groups); returns each step's mean aux loss."""
    rows = examples(steps * BATCH * ACCUM)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    rates = [LR * router_lr_scale if ".router." in n else LR for n, _ in named]
    assert any(".router." in n for n, _ in named) and any(".router." not in n for n, _ in named)
    model.train()
    aux_means = []
    for step in range(steps):
        micro = [
            pad(rows[i : i + BATCH])
            for i in range(step * BATCH * ACCUM, (step + 1) * BATCH * ACCUM, BATCH)
        ]
        lm = aux = 0
        for b in micro:
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            token_losses = F.cross_entropy(
                logits[:, :-1].flatten(0, 1),
                b["labels"][:, 1:].flatten(),
                ignore_index=IGNORE,
                reduction="sum",
            )
            lm = lm + token_losses / lm_denominator(micro, b)
            aux = aux + lmoe.aux_loss(model) / len(micro)
        grads = torch.autograd.grad(lm + aux, params)
        with torch.no_grad():
            for p, g, rate in zip(params, grads, rates, strict=True):
                p -= rate * g
        aux_means.append(float(aux.detach()))
    return aux_means


def assert_same_adapter(a, b) -> None:
    torch.testing.assert_close(adapter_state_dict(a), adapter_state_dict(b), rtol=1e-5, atol=1e-6)


def test_steps_match_reference_loop(tmp_path):
    t = trainer(adapted_model(), tmp_path, steps=2)
    t.train()
    reference = adapted_model()
    reference_steps(reference, steps=2)
    assert_same_adapter(t.model, reference)


def test_router_lr_scale_one_keeps_trainers_single_rate_and_groups_keep_weight_decay(tmp_path):
    t = trainer(adapted_model(), tmp_path, steps=2, router_lr_scale=1.0)
    t.train()
    reference = adapted_model()
    reference_steps(reference, steps=2, router_lr_scale=1.0)
    assert_same_adapter(t.model, reference)
    split = trainer(adapted_model(), tmp_path / "wd", steps=1, weight_decay=0.1, learning_rate=1e-3)
    groups = split.create_optimizer().param_groups
    routers = {id(p) for n, p in split.model.named_parameters() if ".router." in n}
    for g in groups:
        kinds = {id(p) in routers for p in g["params"]}
        assert len(kinds) == 1  # a group holds routers only, or experts only
        assert g["lr"] == pytest.approx(1e-3 * (30 if kinds == {True} else 1))
    assert {g["weight_decay"] for g in groups} <= {0.0, 0.1}
    assert sum(len(g["params"]) for g in groups) == sum(
        p.requires_grad for p in split.model.parameters()
    )


def test_steps_match_reference_loop_without_loss_kwargs(tmp_path):
    t = trainer(adapted_model(), tmp_path, steps=2)
    t.model_accepts_loss_kwargs = False  # as for a model whose forward takes no **kwargs
    t.train()
    reference = adapted_model()
    reference_steps(reference, steps=2, lm_denominator=micro_batch_tokens)
    assert_same_adapter(t.model, reference)


def test_logs_aux_terms_averaged_over_interval(tmp_path):
    t = trainer(adapted_model(), tmp_path, steps=2, logging_steps=2)
    t.train()
    aux_means = reference_steps(adapted_model(), steps=2)
    [logged] = [row for row in t.state.log_history if "loss" in row]
    assert logged["step"] == 2 and {"load_balance", "z_loss"} <= set(logged)
    assert logged["aux_loss"] == pytest.approx(sum(aux_means) / 2, rel=1e-5)
    assert logged["aux_loss"] == pytest.approx(
        CFG.load_balance_coef * logged["load_balance"] + CFG.z_loss_coef * logged["z_loss"],
        rel=1e-5,
    )


def test_save_model_writes_adapter_that_load_adapter_reloads(tmp_path):
    t = trainer(adapted_model(), tmp_path / "run", steps=1)
    t.train()
    t.save_model(str(tmp_path / "saved"))
    files = {p.name for p in (tmp_path / "saved").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "training_args.bin"} <= files
    assert not files & {"model.safetensors", "pytorch_model.bin", "config.json"}
    loaded = lmoe.load_adapter(tiny_model("llama"), tmp_path / "saved")
    ids = torch.tensor([examples(1)[0]["input_ids"]])
    torch.testing.assert_close(loaded(ids).logits, t.model.eval()(ids).logits)


def test_resume_from_checkpoint_continues_exactly(tmp_path):
    adam = dict(optim="adamw_torch", learning_rate=0.01, save_strategy="steps", save_steps=2)
    whole = trainer(adapted_model(), tmp_path / "whole", steps=4, **adam)
    whole.train()
    checkpoint = tmp_path / "whole" / "checkpoint-2"
    assert (checkpoint / "adapter_model.safetensors").is_file() and not (
        checkpoint / "model.safetensors"
    ).exists()
    resumed = trainer(adapted_model(), tmp_path / "resumed", steps=4, **adam)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 4
    assert_same_adapter(resumed.model, whole.model)


def test_load_best_model_at_end_loads_that_checkpoints_adapter(tmp_path):
    # at lr 0.5 the eval loss rises in step 2: the best checkpoint is the first, not the last
    t = trainer(
        adapted_model(),
        tmp_path,
        steps=2,
        eval_dataset=examples(4),
        eval_strategy="steps",
        eval_steps=1,
        save_strategy="steps",
        save_steps=1,
        load_best_model_at_end=True,
        metric_for_best_model="loss",
    )
    t.train()
    assert t.state.best_model_checkpoint == str(tmp_path / "checkpoint-1")
    assert_same_adapter(t.model, lmoe.load_adapter(tiny_model("llama"), tmp_path / "checkpoint-1"))


def test_model_without_experts_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"lmoe\.inject.*lmoe\.load_adapter"):
        trainer(tiny_model("llama"), tmp_path, steps=1)


def test_lazy_export():
    assert lmoe.LMoETrainer is LMoETrainer


def test_ddp_equals_one_process_on_the_whole_batch(tmp_path):
    """2 processes with micro-batches of BATCH rows each = 1 process with 2 * BATCH: Trainer's LM
    loss counts the tokens of all processes and multiplies by their number; the aux
    losses must not be."""
    torchrun(__file__, tmp_path / "ddp")
    one = trainer(adapted_model(), tmp_path / "one", steps=2, per_device_train_batch_size=2 * BATCH)
    one.train()
    assert_same_adapter(
        lmoe.load_adapter(tiny_model("llama"), tmp_path / "ddp" / "final"), one.model
    )
    logged = json.loads((tmp_path / "ddp" / "history.json").read_text())
    for ddp_row, one_row in zip(
        logged, [row for row in one.state.log_history if "loss" in row], strict=True
    ):
        for key in ("loss", "aux_loss", "load_balance", "z_loss"):
            assert ddp_row[key] == pytest.approx(one_row[key], rel=1e-5), (ddp_row["step"], key)


def torchrun(script: str, out: Path) -> None:
    """Run script's __main__ in 2 CPU processes (torchrun) with out as its argument; fail
    with their stderr."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": worker_pythonpath(__file__)}
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "--monitor-interval",
            "0.1",
            script,
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert run.returncode == 0, run.stderr[-3000:]


def ddp_worker(out: str) -> None:
    """torchrun worker: 2 steps on this process's share of each batch; save_model (every process
    calls it, the main one writes) and the training logs."""
    t = trainer(adapted_model(), out, steps=2)
    t.train()
    t.save_model(f"{out}/final")
    if t.args.should_save:
        Path(out, "history.json").write_text(
            json.dumps([row for row in t.state.log_history if "loss" in row])
        )


if __name__ == "__main__":
    ddp_worker(sys.argv[1])
