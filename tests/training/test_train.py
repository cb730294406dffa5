"""lmoe.training.loop: config validation and overrides, the LR schedule, and exact resume
from a checkpoint."""

import json
import math
import re

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from tiny import tiny_model_dir, train_config, write_jsonl
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmoe import load_adapter
from lmoe.data.encoding import encode_all
from lmoe.data.records import read_records
from lmoe.evaluation.logprobs import answer_logprobs
from lmoe.settings import apply_overrides
from lmoe.training.config import TrainConfig
from lmoe.training.loop import seed_step, train, warmup_cosine
from lmoe.training.metrics_log import read_metrics

ROWS = [
    {"prompt": f"What is {a} + {b}?", "completion": str(a + b)}
    for a in range(10, 16)
    for b in range(20, 23)
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    return tiny_model_dir(root / "model"), write_jsonl(root / "sums.jsonl", ROWS)


def test_warmup_cosine_against_hand_values():
    f = warmup_cosine(warmup=4, total=12)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(8) == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 8)))
    assert f(12) == pytest.approx(0.0) and f(20) == pytest.approx(0.0)


def test_seed_step_gives_each_process_its_own_reproducible_dropout():
    def mask(seed, step, rank):
        seed_step(seed, step, rank)
        return torch.nn.functional.dropout(torch.ones(4096), p=0.5) != 0

    reference = mask(0, 3, 0)
    assert torch.equal(
        mask(0, 3, 0), reference
    )  # resume: the same (seed, step, process), the same mask
    for other in [(0, 3, 1), (0, 4, 0), (1, 3, 0)]:  # another process, step or seed: another mask
        assert (mask(*other) != reference).float().mean() > 0.3, other


def test_config_validation_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 5\nlmoe:\n  num_experts: 2\n")
    cfg = TrainConfig.from_file(
        path, ["lmoe.rank=3", "data=[a.jsonl, b.csv]", "mixture.skills=[add]"]
    )
    assert (cfg.steps, cfg.lmoe.num_experts, cfg.lmoe.rank) == (5, 2, 3)
    default = TrainConfig().lmoe  # a partial lmoe section keeps the default run's other fields
    assert (cfg.lmoe.alpha, cfg.lmoe.target_modules) == (default.alpha, default.target_modules)
    dynamic = TrainConfig.from_file(None, ["lmoe.router=dynamic"]).lmoe
    assert (dynamic.rank, dynamic.target_modules, dynamic.load_balance_coef) == (
        default.rank,
        default.target_modules,
        1.0,
    )
    assert cfg.data == ["a.jsonl", "b.csv"] and cfg.mixture.skills == ["add"]
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="Did you mean 'steps'"):
        TrainConfig.from_file(None, ["stepz=3"])
    with pytest.raises(ValueError, match="lr=-1"):
        TrainConfig(lr=-1)
    with pytest.raises(ValueError, match="LMoEConfig.router"):
        TrainConfig.from_file(None, ["lmoe.router=nope"])
    with pytest.raises(ValueError, match="key=value"):
        apply_overrides({}, ["steps"])


def test_resume_equals_uninterrupted(setup, tmp_path):
    whole = train(train_config(setup, tmp_path / "whole"))
    straight = read_metrics(tmp_path / "whole")
    assert [r["step"] for r in straight] == [1, 2, 3, 4, 5, 6]
    assert all(r["load_balance"] != "" and r["tokens"] > 0 for r in straight)
    assert all(
        r["active_experts"] == 3 for r in straight
    )  # softmax routing: every expert, every token
    first = straight[0]  # logged from the forward before any update: fresh routers, near uniform
    assert 0.9 < first["routing_entropy"] <= 1 and first["top_weight_over_half"] < 0.5
    assert all(
        0 <= r["routing_entropy"] <= 1 and 0 <= r["top_weight_over_half"] <= 1 for r in straight
    )
    # fresh routers: ESS near E = 3, under half of the mass on the top expert
    assert 2.5 < first["effective_support_size"] <= 3 and 1 / 3 <= first["top_expert_share"] < 0.5
    # per token 1 / top <= ESS = 1 / sum_i g_i^2 <= E; the mean of 1 / top is >= 1 / the mean of top
    assert all(
        1 / r["top_expert_share"] - 1e-6 <= r["effective_support_size"] <= 3 for r in straight
    )

    class Interrupt(Exception):
        pass

    def stop_after_4(row):
        if row["step"] == 4:
            raise Interrupt

    with pytest.raises(Interrupt):  # dies after step 4; the last checkpoint is step 3
        train(train_config(setup, tmp_path / "split"), on_step=stop_after_4)
    train(train_config(setup, tmp_path / "split"), resume=True)
    resumed = read_metrics(tmp_path / "split")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(straight, resumed, strict=True):
        for key in (
            "loss",
            "lm_loss",
            "aux_loss",
            "active_experts",
            "effective_support_size",
            "top_expert_share",
            "lr",
            "grad_norm",
            "tokens",
        ):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), (a["step"], key)
    final_a = load_file(str(whole.adapter_dir / "adapter_model.safetensors"))
    final_b = load_file(str(tmp_path / "split" / "adapter" / "adapter_model.safetensors"))
    assert final_a.keys() == final_b.keys()
    for key in final_a:
        torch.testing.assert_close(final_a[key], final_b[key], rtol=1e-6, atol=1e-7)
    assert straight[0]["loss"] > straight[-1]["loss"]  # it learns
    assert not list((tmp_path / "split").glob(".*.tmp"))  # atomic writes leave no temp files


def test_resume_without_checkpoint_says_what_to_do(setup, tmp_path):
    with pytest.raises(FileNotFoundError, match="train without --resume first"):
        train(train_config(setup, tmp_path / "fresh"), resume=True)


def test_builtin_mixture_compares_base_and_trained(setup, tmp_path):
    mixture = {
        "domains": ["german"],
        "skills": ["add", "sort"],
        "per_domain": 8,
        "per_skill": 8,
        "test_per_domain": 4,
        "test_per_skill": 4,
    }
    result = train(
        train_config(setup, tmp_path / "mix", data=[], steps=2, compare_base=True, mixture=mixture)
    )
    assert set(result.results) == {"base", "trained"}
    for run in result.results.values():
        assert set(run["exact_match"]) == {"add", "sort"} and set(run["perplexity"]) == {"german"}
    assert (tmp_path / "mix" / "eval.json").is_file() and (
        tmp_path / "mix" / "eval_base.json"
    ).is_file()
    routing = json.loads(
        (tmp_path / "mix" / "routing.json").read_text()
    )  # the held-out answer tokens, per layer
    assert (
        set(routing["tokens"]) == {"add", "sort", "german"}
        and "routing" not in result.results["base"]
    )
    assert result.results["trained"]["routing"] == {
        k: routing[k] for k in result.results["trained"]["routing"]
    }
    saved = json.loads((tmp_path / "mix" / "eval.json").read_text())["trained"]["routing"]
    for key in ("effective_support_size", "top_expert_share"):  # in eval.json, and per layer
        assert saved[key] == routing[key] and all(
            key in layer for layer in routing["layers"].values()
        )
    assert 1 <= saved["effective_support_size"] <= routing["num_experts"]
    assert 1 / routing["num_experts"] <= saved["top_expert_share"] <= 1
    assert (
        0
        <= routing["mutual_information_bits"]
        <= routing["mutual_information_max_bits"]
        == pytest.approx(math.log2(3))
    )


def test_other_processes_neither_evaluate_nor_save(setup, tmp_path, monkeypatch):
    monkeypatch.setattr(
        Accelerator, "is_main_process", property(lambda self: False)
    )  # as on rank 1 of 2
    mixture = {
        "domains": ["german"],
        "skills": ["add"],
        "per_domain": 4,
        "per_skill": 4,
        "test_per_domain": 2,
        "test_per_skill": 2,
    }
    result = train(
        train_config(
            setup, tmp_path / "rank1", data=[], steps=2, compare_base=True, mixture=mixture
        )
    )
    assert result.results == {} and not (tmp_path / "rank1").exists()


@pytest.mark.slow
def test_builtin_model_learns_the_mixture(tmp_path):
    mixture = {
        "domains": ["german"],
        "skills": ["add"],
        "per_domain": 80,
        "per_skill": 80,
        "test_per_domain": 20,
        "test_per_skill": 20,
    }
    result = train(
        TrainConfig.from_dict(
            {"output_dir": str(tmp_path), "steps": 30, "save_every": 0, "mixture": mixture}
        )
    )
    base, trained = result.results["base"], result.results["trained"]
    assert trained["perplexity"]["german"] < 0.8 * base["perplexity"]["german"]
    assert trained["exact_match"]["add"] > base["exact_match"]["add"] + 0.2


def test_routers_only_from_a_saved_adapter_keeps_every_expert_and_resumes(setup, tmp_path):
    start = train(train_config(setup, tmp_path / "experts", steps=3)).adapter_dir
    initial = load_file(str(start / "adapter_model.safetensors"))
    routers = train_config(
        setup, tmp_path / "routers", init_adapter=str(start), train_experts=False
    )
    final = load_file(str(train(routers).adapter_dir / "adapter_model.safetensors"))
    assert final.keys() == initial.keys()
    experts = [k for k in final if k.endswith(("lora_A", "lora_B"))]
    gates = [k for k in final if k.endswith("router.weight")]
    assert experts and gates
    assert all(torch.equal(final[k], initial[k]) for k in experts), "a frozen expert moved"
    assert all(not torch.equal(final[k], initial[k]) for k in gates), "a router did not learn"
    assert all(math.isfinite(r["loss"]) for r in read_metrics(tmp_path / "routers"))
    saved = TrainConfig.from_file(tmp_path / "routers" / "train_config.yaml")
    assert (saved.init_adapter, saved.train_experts, saved.lmoe) == (
        str(start),
        False,
        routers.lmoe,
    )

    class Interrupt(Exception):
        pass

    def stop_after_4(row):
        if row["step"] == 4:
            raise Interrupt

    split = train_config(setup, tmp_path / "split", init_adapter=str(start), train_experts=False)
    with pytest.raises(Interrupt):
        train(split, on_step=stop_after_4)
    resumed = load_file(str(train(split, resume=True).adapter_dir / "adapter_model.safetensors"))
    for key in final:
        torch.testing.assert_close(resumed[key], final[key], rtol=1e-6, atol=1e-7, msg=key)


def test_init_adapter_errors_say_what_to_change(setup, tmp_path):
    with pytest.raises(
        FileNotFoundError, match=r"init_adapter='.*nowhere': no adapter there .* drop init_adapter"
    ):
        train_config(setup, tmp_path, init_adapter=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="train_experts=false needs init_adapter=DIR"):
        train_config(setup, tmp_path, train_experts=False)
    start = train(train_config(setup, tmp_path / "a", steps=1, save_every=0)).adapter_dir
    with pytest.raises(
        ValueError, match=r"lmoe.rank=4 \(the adapter's is 2\)\. Drop those lmoe keys"
    ):
        train_config(setup, tmp_path, init_adapter=str(start), lmoe={"rank": 4})
    assert (
        TrainConfig(init_adapter=str(start)).lmoe.rank == 2
    )  # no lmoe section: the adapter's mixture


def test_train_runs_again_in_the_same_process_with_another_precision(setup, tmp_path):
    for precision in (
        "bf16",
        "no",
    ):  # accelerate keeps one precision per process unless told to forget it
        train(train_config(setup, tmp_path / precision, precision=precision, steps=2, save_every=0))
        assert len(read_metrics(tmp_path / precision)) == 2


def test_resume_with_another_mixture_names_the_keys(setup, tmp_path):
    train(train_config(setup, tmp_path, steps=2, save_every=2))
    for change, message in (
        ({"rank": 4}, "lmoe.rank=2 there, 4 here"),
        ({"router": "dynamic"}, "lmoe.router='softmax' there, 'dynamic' here"),
    ):
        cfg = train_config(setup, tmp_path, steps=4, save_every=2)
        cfg = TrainConfig.from_dict({**cfg.to_dict(), "lmoe": {**cfg.to_dict()["lmoe"], **change}})
        with pytest.raises(ValueError, match=re.escape(message)):
            train(cfg, resume=True)
    cfg = train_config(setup, tmp_path, steps=3, save_every=3)  # a loss weight may change
    train(
        TrainConfig.from_dict(
            {**cfg.to_dict(), "lmoe": {**cfg.to_dict()["lmoe"], "z_loss_coef": 0.01}}
        ),
        resume=True,
    )
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]


def test_eval_every_logs_the_held_out_loss_of_the_model_at_that_step(setup, tmp_path):
    model_dir, data = setup
    result = train(
        train_config(setup, tmp_path, steps=4, save_every=0, eval_every=2, eval_data=[str(data)])
    )
    rows = read_metrics(tmp_path)
    assert [r["eval_loss"] == "" for r in rows] == [True, False, True, False]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples = encode_all(tokenizer, read_records(data), 128)
    model = load_adapter(AutoModelForCausalLM.from_pretrained(model_dir), result.adapter_dir)
    scores = answer_logprobs(
        model, examples, tokenizer.pad_token_id
    )  # the final model, scored independently
    expected = -sum(lp for lp, _ in scores) / sum(n for _, n in scores)
    assert rows[-1]["eval_loss"] == pytest.approx(expected, rel=1e-5)
    assert rows[1]["eval_loss"] > rows[-1]["eval_loss"]  # it learns on what it is scored on
    with pytest.raises(ValueError, match=r"eval_every=2 needs held-out data: .*eval_data="):
        train(train_config(setup, tmp_path / "none", eval_every=2))


def test_dynamic_router_with_the_default_lambda_width_resumes(setup, tmp_path):
    """lambda_hidden left unset: train_config.yaml keeps it unset, the adapter and checkpoints hold
    the width inject chose, and a killed run resumes (the mixture check compares
    the chosen widths)."""
    lmoe_cfg = {"num_experts": 3, "rank": 2, "target_modules": "all-linear", "router": "dynamic"}

    class Interrupt(Exception):
        pass

    def stop_after_4(row):
        if row["step"] == 4:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(train_config(setup, tmp_path / "run", lmoe=lmoe_cfg), on_step=stop_after_4)
    result = train(train_config(setup, tmp_path / "run", lmoe=lmoe_cfg), resume=True)
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2, 3, 4, 5, 6]
    saved = json.loads((result.adapter_dir / "adapter_config.json").read_text())["config"]
    assert isinstance(saved["lambda_hidden"], int) and saved["lambda_hidden"] >= 32


def test_router_lr_scale_puts_routers_and_lambda_heads_in_their_own_group(setup):
    from lmoe import LMoEConfig, inject, lmoe_layers, param_groups

    model = inject(
        AutoModelForCausalLM.from_pretrained(setup[0]),
        LMoEConfig(num_experts=3, rank=2, router="dynamic", target_modules="all-linear"),
    )
    experts, routers = param_groups(model, 1e-3, router_lr_scale=25.0)
    assert experts["lr"] == 1e-3 and routers["lr"] == pytest.approx(0.025)
    router_ids = {id(p) for _, layer in lmoe_layers(model) for p in layer.router.parameters()}
    assert {
        id(p) for p in routers["params"]
    } == router_ids  # the shared lambda head once, with the gates
    assert len(routers["params"]) == len(router_ids)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sorted(map(id, experts["params"] + routers["params"])) == sorted(map(id, trainable))
    with pytest.raises(ValueError, match="router_lr_scale"):
        TrainConfig(router_lr_scale=0)


def test_adamw_is_fused_where_it_can_be_and_steps_as_the_per_tensor_loop(setup):
    """lmoe train's optimizer: torch's fused AdamW for plain CPU parameters, the same update as the
    default loop (float64, with weight decay and the routers' own rate); unfused for
    a tensor subclass."""
    from lmoe import LMoEConfig, inject, param_groups
    from lmoe.training.optim import adamw

    torch.manual_seed(0)
    models = [
        inject(
            AutoModelForCausalLM.from_pretrained(setup[0]).double(),
            LMoEConfig(num_experts=3, rank=2, target_modules="all-linear"),
        )
        for _ in range(2)
    ]
    models[1].load_state_dict(models[0].state_dict())
    optimizers = [
        adamw(param_groups(models[0], 1e-2, 30.0), weight_decay=0.1),
        torch.optim.AdamW(param_groups(models[1], 1e-2, 30.0), weight_decay=0.1),
    ]
    assert optimizers[0].defaults["fused"] and not optimizers[1].defaults["fused"]
    ids = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        for model, optimizer in zip(models, optimizers, strict=True):
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert all(
        p.abs().sum() > 0 for n, p in models[0].named_parameters() if "lora_B" in n
    )  # B left its zero init

    class Wrapped(torch.Tensor):  # e.g. FSDP's DTensor: left to torch's default
        pass

    assert not adamw([{"params": [nn.Parameter(torch.zeros(2).as_subclass(Wrapped))]}]).defaults[
        "fused"
    ]


def test_a_higher_router_lr_moves_the_routers_further(setup, tmp_path):
    """AdamW steps scale with the learning rate: at 30x, the gates travel much
    further from their init."""
    travel = {}
    for scale in (1.0, 30.0):
        torch.manual_seed(0)
        out = tmp_path / f"x{scale:g}"
        train(train_config(setup, out, router_lr_scale=scale, lr=1e-3, save_every=0))
        final = load_file(str(out / "adapter" / "adapter_model.safetensors"))
        travel[scale] = sum(float((final[k] - v).norm()) for k, v in _gate_weights(out).items())
    assert travel[30.0] > 8 * travel[1.0] > 0


def _gate_weights(out) -> dict:
    """The gates' initial weights of the run in `out`: the same seed re-injects the same init."""
    from lmoe import LMoEConfig, inject
    from lmoe.io import read_adapter_meta

    torch.manual_seed(0)
    cfg = LMoEConfig.from_dict(read_adapter_meta(out / "adapter")["config"])
    model = inject(
        AutoModelForCausalLM.from_pretrained(
            TrainConfig.from_file(out / "train_config.yaml").model
        ),
        cfg,
    )
    return {k: v for k, v in model.state_dict().items() if k.endswith("router.weight")}


def test_ld_mole_recipe_fills_the_fields_left_at_their_defaults():
    from lmoe.training.config import RECIPES, SEVEN_PROJECTIONS

    cfg = TrainConfig.from_file(None, ["recipe=ld-mole"])
    assert (cfg.label_smoothing, cfg.weight_decay) == (0.1, 0.1)
    m = cfg.lmoe
    assert (
        m.num_experts,
        m.rank,
        m.alpha,
        m.dropout,
        m.router,
        m.composition,
        m.load_balance_coef,
    ) == (8, 8, 16, 0.1, "dynamic", "outputs", 1.0)
    assert m.router_reads_dropout and m.target_modules == SEVEN_PROJECTIONS
    mine = TrainConfig.from_file(None, ["recipe=ld-mole", "label_smoothing=0.2", "lmoe.rank=4"])
    assert (
        mine.label_smoothing == 0.2 and mine.lmoe.rank == 4 and mine.lmoe.num_experts == 8
    )  # given values win
    assert TrainConfig(recipe="ld-mole").lmoe.num_experts == 8  # from Python too
    assert set(RECIPES) == {"ld-mole"}
    with pytest.raises(
        ValueError, match="TrainConfig.recipe='lora' is invalid: expected null or one of ld-mole"
    ):
        TrainConfig(recipe="lora")


def test_label_smoothing_reaches_the_training_loss(setup, tmp_path):
    """Step 1 logs the LM loss of the same batch and weights (B = 0: the base model), so only the
    smoothing (whose formula tests/test_objective.py checks) can change it."""
    plain = train(train_config(setup, tmp_path / "plain", steps=1, save_every=0))
    smooth = train(
        train_config(setup, tmp_path / "smooth", steps=1, save_every=0, label_smoothing=0.3)
    )
    a, b = (
        read_metrics(tmp_path / "plain")[0]["lm_loss"],
        read_metrics(tmp_path / "smooth")[0]["lm_loss"],
    )
    assert abs(b - a) > 1e-3
    assert type(smooth.model.loss_function).__name__ == "SmoothedCausalLMLoss"
    assert type(plain.model.loss_function).__name__ != "SmoothedCausalLMLoss"
