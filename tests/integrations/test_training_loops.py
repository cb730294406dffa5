"""Any training loop trains lmoe: a training forward with labels returns loss = LM loss + router
losses and outputs.aux_loss (lmoe/inject.py, add_aux_to_loss). Plain transformers.Trainer and TRL's
SFTTrainer against a hand-written loop; code written before (out.loss + aux_loss(model), lmoe train,
LMoETrainer) counts them once."""

import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model
from test_hf_trainer import (
    ACCUM,
    BATCH,
    CFG,
    LR,
    adapted_model,
    assert_same_adapter,
    examples,
    pad,
    torchrun,
)
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import validate_quantization_for_training

import lmoe
from lmoe.data.encoding import IGNORE


def answer_tokens(batch: dict) -> torch.Tensor:
    return (batch["labels"][:, 1:] != IGNORE).sum()


def token_loss_sum(model, batch: dict) -> torch.Tensor:
    """The summed next-token cross entropy from a forward without labels (nothing of
    lmoe's loss code)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1),
        batch["labels"][:, 1:].flatten(),
        ignore_index=IGNORE,
        reduction="sum",
    )


def reference_step_tokens(model, steps: int) -> None:
    """SGD on Trainer's objective with num_items_in_batch: all token losses of the step over its N
    answer tokens, plus each micro-batch's router losses weighted by its share
    n/N of those tokens."""
    rows = examples(steps * BATCH * ACCUM)
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    for step in range(steps):
        micro = [
            pad(rows[i : i + BATCH])
            for i in range(step * BATCH * ACCUM, (step + 1) * BATCH * ACCUM, BATCH)
        ]
        N = sum(answer_tokens(b) for b in micro)
        loss = sum(
            (token_loss_sum(model, b) + answer_tokens(b) * lmoe.aux_loss(model)) / N for b in micro
        )
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                p -= LR * g


def args(out, steps: int, **overrides) -> dict:
    return {
        **dict(
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
        ),
        **overrides,
    }


def test_training_forward_with_labels_holds_the_router_losses(input_ids):
    model = adapted_model().train()
    batch = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": input_ids,
    }
    lm = token_loss_sum(model, batch) / answer_tokens(batch)
    aux = lmoe.aux_loss(model)  # of the forward without labels: nothing folded
    assert aux > 0
    out = model(**batch)
    torch.testing.assert_close(out.aux_loss, aux)
    torch.testing.assert_close(out.loss, lm + aux)
    assert lmoe.aux_loss(model) == 0  # the loss holds it already
    model.eval()
    torch.testing.assert_close(
        model(**batch).loss, lm, rtol=1e-5, atol=1e-6
    )  # evaluation: the LM loss alone


def test_old_readme_loop_counts_the_router_losses_once(input_ids):
    """`loss = out.loss + aux_loss(model)` (the README before) gives the gradient of
    LM loss + aux loss."""
    batch = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": input_ids,
    }
    model, reference = adapted_model().train(), adapted_model().train()
    out = model(**batch)
    (out.loss + lmoe.aux_loss(model)).backward()
    (token_loss_sum(reference, batch) / answer_tokens(batch) + lmoe.aux_loss(reference)).backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_lmoe_train_accumulate_weighs_the_router_losses_as_before():
    """lmoe train's step: mean over micro-batches of (each one's mean token loss + its aux loss).
    (One process; under DDP its token weights differ from the router losses' and
    tests/test_distributed.py compares.)"""
    from accelerate import Accelerator

    from lmoe.data.encoding import Example
    from lmoe.training.step import accumulate

    rows = examples(2 * BATCH)
    micro = [
        [Example(r["input_ids"], r["labels"]) for r in rows[i : i + BATCH]] for i in (0, BATCH)
    ]
    model, reference = adapted_model().train(), adapted_model().train()
    accumulate(Accelerator(cpu=True), model, micro, pad_id=0)
    loss = 0
    for b in (pad(rows[:BATCH]), pad(rows[BATCH:])):
        loss = (
            loss + (token_loss_sum(reference, b) / answer_tokens(b) + lmoe.aux_loss(reference)) / 2
        )
    loss.backward()
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("accepts_loss_kwargs", [True, False])
def test_plain_trainer_matches_the_hand_written_loop(tmp_path, accepts_loss_kwargs):
    """With num_items_in_batch the router losses count once per step, weighted by tokens; without it
    (a model whose forward takes no **kwargs) Trainer divides each micro-batch's loss, router losses
    in, by the accumulation steps: the mean over micro-batches, as lmoe train has it."""
    t = Trainer(
        model=adapted_model(),
        args=TrainingArguments(**args(tmp_path, steps=2)),
        train_dataset=examples(2 * BATCH * ACCUM),
        data_collator=pad,
    )
    t.model_accepts_loss_kwargs = accepts_loss_kwargs
    t.train()
    reference = adapted_model()
    if accepts_loss_kwargs:
        reference_step_tokens(reference, steps=2)
    else:
        from test_hf_trainer import micro_batch_tokens, reference_steps

        reference_steps(
            reference, steps=2, lm_denominator=micro_batch_tokens, router_lr_scale=1.0
        )  # one rate
    assert_same_adapter(t.model, reference)


def plain_trainer(out, steps: int, **overrides) -> Trainer:
    a = TrainingArguments(**args(out, steps, **overrides))
    return Trainer(
        model=adapted_model(),
        args=a,
        data_collator=pad,
        train_dataset=examples(steps * a.world_size * a.per_device_train_batch_size * ACCUM),
    )


def test_plain_trainer_under_ddp_equals_one_process_on_the_whole_batch(tmp_path):
    """2 processes (Trainer counts all their tokens in num_items_in_batch and multiplies each loss
    by 2) end with the adapter of 1 process on micro-batches twice as large: the router
    losses count once."""
    torchrun(__file__, tmp_path / "ddp")
    one = plain_trainer(tmp_path / "one", steps=2, per_device_train_batch_size=2 * BATCH)
    one.train()
    assert_same_adapter(lmoe.load_adapter(tiny_model("llama"), tmp_path / "ddp"), one.model)


def test_plain_trainer_on_a_peft_model_matches_the_loop_and_saves_the_adapter(tmp_path):
    """get_peft_model(model, LMoEConfig): Trainer trains it as the bare injected model and
    saves PEFT's files."""
    from peft import get_peft_model

    model = get_peft_model(tiny_model("llama"), CFG)
    torch.manual_seed(0)  # as adapted_model
    for _, layer in lmoe.lmoe_layers(model):
        torch.nn.init.normal_(layer.lora_B, std=0.1)
    t = Trainer(
        model=model,
        args=TrainingArguments(**args(tmp_path / "run", steps=2)),
        train_dataset=examples(2 * BATCH * ACCUM),
        data_collator=pad,
    )
    t.train()
    reference = adapted_model()
    reference_step_tokens(reference, steps=2)
    assert_same_adapter(model.get_base_model(), reference)
    t.save_model(str(tmp_path / "saved"))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {
        p.name for p in (tmp_path / "saved").iterdir()
    }
    assert_same_adapter(lmoe.load_adapter(tiny_model("llama"), tmp_path / "saved"), reference)


def sft_trainer(model, out, steps: int, **overrides):
    from datasets import Dataset
    from tiny import tiny_tokenizer
    from trl import SFTConfig, SFTTrainer

    config = SFTConfig(
        **args(out, steps), bf16=False, **overrides
    )  # float32 to compare; TRL's gradient checkpointing kept
    return SFTTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(examples(steps * BATCH * ACCUM)),
        data_collator=pad,
        processing_class=tiny_tokenizer(),
    )


def test_trl_sft_trainer_matches_the_hand_written_loop(tmp_path):
    """TRL's fused LM head computes its loss from log_probs, not outputs.loss: they carry the router
    losses' gradient, so the step is Trainer's."""
    t = sft_trainer(adapted_model(), tmp_path, steps=2)
    t.train()
    reference = adapted_model()
    reference_step_tokens(reference, steps=2)
    assert_same_adapter(t.model, reference)
    assert (
        t.state.log_history[0]["mean_token_accuracy"] >= 0
    )  # TRL's own metrics still come from log_probs


def test_trl_deprecated_chunked_nll_trains_the_same(tmp_path):
    with pytest.warns(FutureWarning, match="chunked_nll"):
        t = sft_trainer(adapted_model(), tmp_path, steps=1, loss_type="chunked_nll")
    t.train()
    reference = adapted_model()
    reference_step_tokens(reference, steps=1)
    assert_same_adapter(t.model, reference)


def test_trl_refuses_experts_on_lm_head(input_ids):
    """SFTTrainer installs TRL's fused head and calls the model with fused_lm_head=True. (Not
    through SFTTrainer.train: an error inside it leaves accelerate's shared GradientState
    mid-accumulation, and later accelerate loops in this process would skip their
    optimizer steps.)"""
    from trl.trainer.utils import add_fused_lm_head

    model = lmoe.inject(
        tiny_model("llama"),
        lmoe.LMoEConfig(num_experts=2, rank=2, target_modules=["q_proj", "lm_head"]),
    )
    add_fused_lm_head(model)
    model(
        input_ids=input_ids, labels=input_ids
    )  # TRL's patched forward without its flag: the model's own
    with pytest.raises(ValueError, match="lm_head.*TRL.*target_modules"):
        model.train()(input_ids=input_ids, labels=input_ids, fused_lm_head=True)


def test_quantised_base_passes_trainers_check():
    """transformers refuses a quantised model without adapters; with lmoe's it trains (as
    a PeftModel does)."""

    def quantised():
        model = tiny_model("llama")
        model.is_quantized = True
        model.hf_quantizer = SimpleNamespace(is_trainable=True, is_qat_trainable=False)
        return model

    with pytest.raises(ValueError, match="purely quantized"):
        validate_quantization_for_training(quantised())
    model = lmoe.inject(quantised(), CFG)
    validate_quantization_for_training(model)
    lmoe.remove(model)
    with pytest.raises(ValueError, match="purely quantized"):
        validate_quantization_for_training(model)


if __name__ == "__main__":  # torchrun worker of the DDP test
    t = plain_trainer(sys.argv[1], steps=2)
    t.train()
    if t.args.should_save:
        lmoe.save_adapter(t.accelerator.unwrap_model(t.model), sys.argv[1])
