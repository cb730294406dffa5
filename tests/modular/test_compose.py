"""Modular skills against independent references: PEFT's own forward of each adapter,
mixtures rebuilt by hand."""

import json

import pytest
import torch
from conftest import VOCAB, tiny_model
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from tiny import fix_routing

from lmoe import LMoEConfig, inject, lmoe_layers, load_adapter, record_routing, save_adapter
from lmoe.modular.compose import compose, load_experts, read_lora, read_peft_lora
from lmoe.modular.experts import (
    add_experts,
    freeze_experts,
    frozen_experts,
    remove_experts,
    unfreeze_experts,
)
from lmoe.modular.export import export_peft, mean_routing

TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"]}


def peft_adapter(tmp_path, name, kind="llama", seed=0, **lora):
    """Save a PEFT LoRA with random non-zero A and B (init_lora_weights=False) and
    return its directory."""
    model = tiny_model(kind)
    torch.manual_seed(seed)
    lora = {
        "r": 4,
        "lora_alpha": 8,
        "target_modules": TARGETS[kind],
        "init_lora_weights": False,
    } | lora
    peft = get_peft_model(model, LoraConfig(**lora))
    peft.save_pretrained(tmp_path / name)
    return tmp_path / name


def peft_logits(directory, input_ids, kind="llama"):
    with torch.no_grad():
        return PeftModel.from_pretrained(tiny_model(kind), directory).eval()(input_ids).logits


def lmoe_logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids).logits


def randomise(model, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for _, layer in lmoe_layers(model):
            layer.lora_A.normal_(std=0.3)
            layer.lora_B.normal_(std=0.3)
            layer.router.weight.normal_(std=1 / layer.router.scale)  # std 1 in use


@pytest.fixture
def adapters(tmp_path):
    """Three skills with different ranks, alphas, a rank/alpha pattern and rsLoRA."""
    return [
        peft_adapter(
            tmp_path, "a", seed=1, rank_pattern={"v_proj": 2}, alpha_pattern={"v_proj": 3}
        ),
        peft_adapter(tmp_path, "b", seed=2, r=2, lora_alpha=5, use_rslora=True),
        peft_adapter(tmp_path, "c", seed=3, r=3, lora_alpha=6, target_modules=["q_proj"]),
    ]


# ---------------------------------------------------------------- compose


@pytest.mark.parametrize("composition", ["outputs", "params"])
def test_each_expert_alone_reproduces_its_peft_adapter(adapters, input_ids, composition):
    model = compose(tiny_model("llama"), adapters, LMoEConfig(composition=composition))
    layer = next(layer for _, layer in lmoe_layers(model))
    assert (layer.num_experts, layer.rank, layer.scaling) == (3, 4, 1.0)
    for i, directory in enumerate(adapters):
        fix_routing(model, torch.eye(3)[i])
        torch.testing.assert_close(
            lmoe_logits(model, input_ids), peft_logits(directory, input_ids), rtol=1e-5, atol=1e-5
        )


def test_compose_gpt2_conv1d(tmp_path, input_ids):
    dirs = [
        peft_adapter(tmp_path, "g1", "gpt2", seed=1),
        peft_adapter(tmp_path, "g2", "gpt2", seed=2, r=2),
    ]
    model = compose(tiny_model("gpt2"), dirs)
    fix_routing(model, torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(
        lmoe_logits(model, input_ids), peft_logits(dirs[1], input_ids, "gpt2"), rtol=1e-5, atol=1e-5
    )


def test_compose_starts_uniform_at_the_average_of_the_adapters(adapters, input_ids):
    model = compose(tiny_model("llama"), adapters[:2])
    with record_routing(model) as rec:
        mixed = lmoe_logits(model, input_ids)
    assert all(torch.equal(w, torch.full_like(w, 0.5)) for w in rec.values())
    # PEFT reference: both adapters active at once, each at half its scale
    peft = PeftModel.from_pretrained(tiny_model("llama"), adapters[0], adapter_name="a")
    peft.load_adapter(adapters[1], adapter_name="b")
    peft.base_model.set_adapter(["a", "b"])
    for module in peft.modules():
        if hasattr(module, "scale_layer"):
            module.scale_layer(0.5)
    torch.testing.assert_close(mixed, lmoe_logits(peft, input_ids), rtol=1e-5, atol=1e-5)


def test_single_expert_lmoe_adapter_composes_as_a_lora(adapters, input_ids, tmp_path):
    single = inject(
        tiny_model("llama"), LMoEConfig(num_experts=1, rank=3, alpha=5, target_modules=["q_proj"])
    )
    randomise(single)
    save_adapter(single, tmp_path / "single")
    model = compose(tiny_model("llama"), [adapters[0], tmp_path / "single"])
    fix_routing(model, torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(
        lmoe_logits(model, input_ids), lmoe_logits(single, input_ids), rtol=1e-5, atol=1e-5
    )
    save_adapter(inject(tiny_model("llama"), LMoEConfig(num_experts=2)), tmp_path / "mixture")
    with pytest.raises(ValueError, match="mixture of 2 experts"):
        read_lora(tmp_path / "mixture")


def test_compose_errors_name_the_problem(tmp_path):
    gpt2 = peft_adapter(tmp_path, "g", "gpt2")
    with pytest.raises(ValueError, match="not linear layers of this LlamaForCausalLM"):
        compose(tiny_model("llama"), [gpt2])
    dora = peft_adapter(tmp_path, "d", use_dora=True)
    with pytest.raises(ValueError, match="use_dora"):
        read_peft_lora(dora)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        read_peft_lora(tmp_path / "nowhere")


def test_router_only_training_moves_routers_not_experts(adapters, input_ids):
    model = compose(tiny_model("llama"), adapters, LMoEConfig(router="softmax"))
    freeze_experts(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".router." in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(4):
        loss = model(input_ids, labels=input_ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) != (n in trainable), n


def test_cli_compose_writes_a_mixture_that_load_adapter_reads(
    adapters, input_ids, tmp_path, monkeypatch
):
    import lmoe.models
    from lmoe.cli import main

    monkeypatch.setattr(lmoe.models, "load_model", lambda name: (tiny_model("llama"), None))
    main(
        [
            "compose",
            f"adapters=[{adapters[0]},{adapters[1]}]",
            "model=tiny",
            f"out={tmp_path / 'mix'}",
        ]
    )
    loaded = load_adapter(tiny_model("llama"), tmp_path / "mix")
    fix_routing(loaded, torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(
        lmoe_logits(loaded, input_ids), peft_logits(adapters[1], input_ids), rtol=1e-5, atol=1e-5
    )


# ---------------------------------------------------------------- growing, shrinking, freezing


@pytest.mark.parametrize("router", ["softmax", "topk", "dynamic"])
@pytest.mark.parametrize("composition", ["params", "outputs"])
def test_added_experts_leave_routing_and_outputs_unchanged(
    router, composition, input_ids, tmp_path
):
    model = inject(
        tiny_model("llama"),
        LMoEConfig(num_experts=3, rank=2, router=router, composition=composition),
    )
    randomise(model)
    with record_routing(model) as before:
        ref = lmoe_logits(model, input_ids)
    assert add_experts(model, 2) == [3, 4]
    with record_routing(model) as after:
        logits = lmoe_logits(model, input_ids)
    for name in before:  # equal up to float rounding (a wider gate GEMM may round differently)
        torch.testing.assert_close(after[name][:, :3], before[name], rtol=1e-5, atol=1e-6)
        assert torch.equal(after[name][:, 3:], torch.zeros_like(after[name][:, 3:]))
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-6)
    layer = next(layer for _, layer in lmoe_layers(model))
    assert (
        layer.lora_A.shape[0] == 5
        and torch.all(layer.lora_B[3:] == 0)
        and torch.all(layer.lora_A[3:] != 0)
    )
    assert (
        layer.stacked()[1].data_ptr() == layer.lora_B.data_ptr()
    )  # the layer's layout: stacked B stays a view
    save_adapter(model, tmp_path / "grown")  # the grown config (5 experts, router bias) round-trips
    torch.testing.assert_close(
        lmoe_logits(load_adapter(tiny_model("llama"), tmp_path / "grown"), input_ids),
        ref,
        rtol=1e-5,
        atol=1e-6,
    )


def test_adapter_loaded_into_a_new_slot_is_off_until_routed(adapters, input_ids):
    model = compose(tiny_model("llama"), adapters[:2])
    randomise(model)
    ref = lmoe_logits(model, input_ids)
    load_experts(model, adapters[2:], add_experts(model))
    torch.testing.assert_close(lmoe_logits(model, input_ids), ref, rtol=1e-5, atol=1e-6)
    fix_routing(model, torch.tensor([0.0, 0.0, 1.0]))
    torch.testing.assert_close(
        lmoe_logits(model, input_ids), peft_logits(adapters[2], input_ids), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("router", ["softmax", "dynamic"])
def test_removed_expert_equals_a_mixture_built_without_it(router, input_ids):
    cfg = LMoEConfig(num_experts=4, rank=2, router=router, router_bias=True, composition="params")
    model = inject(tiny_model("llama"), cfg)
    randomise(model)
    keep = [0, 2, 3]
    ref_model = inject(tiny_model("llama"), LMoEConfig(**(cfg.to_dict() | {"num_experts": 3})))
    with torch.no_grad():
        for (_, small), (_, big) in zip(lmoe_layers(ref_model), lmoe_layers(model), strict=True):
            for name, p in small.named_parameters():
                src = big.get_parameter(name)
                p.copy_(
                    src[keep] if name.startswith(("lora_", "router.weight", "router.bias")) else src
                )
    remove_experts(model, [1])
    torch.testing.assert_close(
        lmoe_logits(model, input_ids), lmoe_logits(ref_model, input_ids), rtol=1e-5, atol=1e-6
    )
    with pytest.raises(ValueError, match="keep at least one"):
        remove_experts(model, [0, 1, 2])


def test_partly_frozen_experts_do_not_move_under_adamw(input_ids):
    model = inject(tiny_model("llama"), LMoEConfig(num_experts=3, rank=2))
    randomise(model)
    freeze_experts(model, [0, 2])
    assert frozen_experts(model) == [0, 2]
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1
    )
    for _ in range(2):
        model(input_ids, labels=input_ids).loss.backward()
        grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
        assert all(torch.all(g[[0, 2]] == 0) and torch.any(g[1] != 0) for g in grads)
        opt.step()
        opt.zero_grad()
    for name, p in model.named_parameters():
        if "lora_" in name:
            assert torch.equal(p[[0, 2]], before[name][[0, 2]]) and not torch.equal(
                p[1], before[name][1]
            ), name
    add_experts(model)
    assert frozen_experts(model) == [0, 2]
    remove_experts(model, [0])
    assert frozen_experts(model) == [1]
    unfreeze_experts(model)
    assert frozen_experts(model) == []


def test_experts_cannot_change_under_a_merged_routing():
    from lmoe.modular.merge import merge, unmerge

    model = inject(tiny_model("llama"), LMoEConfig(num_experts=2, rank=2))
    merge(model, torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match="unmerge"):
        add_experts(model)
    unmerge(model)
    assert add_experts(model) == [2]


# ---------------------------------------------------------------- export to PEFT


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("composition", ["outputs", "params"])
def test_export_fixed_routing_loads_in_peft_with_the_same_logits(
    kind, composition, input_ids, tmp_path
):
    model = inject(
        tiny_model(kind),
        LMoEConfig(num_experts=3, rank=2, composition=composition, target_modules=TARGETS[kind]),
    )
    randomise(model)
    g = torch.tensor([0.2, 0.0, 0.8])
    export_peft(model, tmp_path / "skill", g)
    fix_routing(model, g)
    torch.testing.assert_close(
        peft_logits(tmp_path / "skill", input_ids, kind),
        lmoe_logits(model, input_ids),
        rtol=1e-5,
        atol=1e-5,
    )
    assert read_peft_lora(tmp_path / "skill").rank == (6 if composition == "outputs" else 2)


def test_export_mean_routing_per_layer(input_ids, tmp_path):
    model = inject(tiny_model("llama"), LMoEConfig(num_experts=3, rank=2, composition="outputs"))
    randomise(model)
    with record_routing(model) as rec:
        model(torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(5)))
    g = mean_routing(rec)
    export_peft(model, tmp_path / "mean", g)
    fix_routing(model, g)  # the reference: every layer's router pinned to its own mean
    torch.testing.assert_close(
        peft_logits(tmp_path / "mean", input_ids),
        lmoe_logits(model, input_ids),
        rtol=1e-5,
        atol=1e-5,
    )


@pytest.mark.parametrize("composition, own, served", [("outputs", 6, 8), ("params", 2, 8)])
def test_export_padded_to_a_vllm_rank_is_exact(tmp_path, capsys, composition, own, served):
    """Zero rows of A and columns of B change no product: the padded adapter gives the
    unpadded one's logits."""
    model = inject(tiny_model("llama"), LMoEConfig(num_experts=3, rank=2, composition=composition))
    for _, layer in lmoe_layers(model):
        torch.nn.init.normal_(layer.lora_B, std=0.2)
    g = torch.tensor([0.2, 0.5, 0.3])
    export_peft(model, tmp_path / "own", g)
    export_peft(model, tmp_path / "vllm", g, rank="vllm")
    assert f"--max-lora-rank {served}" in capsys.readouterr().out
    assert json.loads((tmp_path / "vllm" / "adapter_config.json").read_text())["r"] == served
    own_w, padded = (
        load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("own", "vllm")
    )
    for key, tensor in own_w.items():
        assert padded[key].shape[0 if "lora_A" in key else 1] == served
        assert torch.equal(padded[key][:own] if "lora_A" in key else padded[key][:, :own], tensor)
        assert not (padded[key][own:] if "lora_A" in key else padded[key][:, own:]).any()
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    logits = [
        PeftModel.from_pretrained(tiny_model("llama"), tmp_path / d)(ids).logits
        for d in ("own", "vllm")
    ]
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-5, atol=1e-6)


def test_export_rank_below_its_own_is_refused(tmp_path):
    model = inject(tiny_model("llama"), LMoEConfig(num_experts=3, rank=2, composition="outputs"))
    with pytest.raises(ValueError, match=r"rank=4.*>= the LoRA's own rank 6"):
        export_peft(model, tmp_path, torch.ones(3) / 3, rank=4)
    with pytest.raises(ValueError, match="vLLM serves ranks up to 512"):
        from lmoe.modular.export import padded_rank

        padded_rank(600, "vllm")
