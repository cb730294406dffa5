"""save_adapter / load_adapter: only adapter tensors, bit-for-bit logits, clear
errors on a wrong base."""

import json
import os
import stat

import pytest
import torch
from conftest import tiny_model
from safetensors.torch import load_file

from lmoe import LMoEConfig, inject, lmoe_layers, load_adapter, load_adapter_weights, save_adapter


def trained_like(kind="llama", router="dynamic", dtype=torch.float32):
    """An injected tiny model whose experts and routers hold random, non-zero values."""
    model = tiny_model(kind).to(dtype)
    targets = ["c_attn"] if kind == "gpt2" else ["q_proj", "down_proj"]
    inject(
        model,
        LMoEConfig(num_experts=3, rank=2, router=router, router_bias=True, target_modules=targets),
    )
    torch.manual_seed(3)
    with torch.no_grad():
        for _, layer in lmoe_layers(model):
            for name, p in layer.named_parameters():
                if not name.startswith("base."):
                    p.normal_(std=0.2)
    return model


@pytest.mark.parametrize(
    "kind,router,dtype",
    [
        ("llama", "dynamic", torch.float32),
        ("gpt2", "topk", torch.float32),
        ("llama", "softmax", torch.bfloat16),
    ],
)
def test_save_then_load_reproduces_logits_bit_for_bit(tmp_path, input_ids, kind, router, dtype):
    model = trained_like(kind, router, dtype)
    ref = model(input_ids).logits
    save_adapter(model, tmp_path / "adapter")
    loaded = load_adapter(tiny_model(kind).to(dtype), tmp_path / "adapter")
    assert torch.equal(loaded(input_ids).logits, ref)


def test_files_hold_only_adapter_tensors_and_the_config(tmp_path):
    model = trained_like()
    save_adapter(model, tmp_path)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert tensors and not any(".base." in k for k in tensors)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable <= set(tensors)
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert meta["config"]["num_experts"] == 3 and meta["layers"][
        "model.layers.0.self_attn.q_proj"
    ] == [32, 32]
    assert not list(tmp_path.glob("*.tmp"))  # atomic writes leave no temporaries


def test_loading_onto_a_different_base_says_what_does_not_match(tmp_path):
    save_adapter(trained_like(), tmp_path)
    wider = tiny_model("llama", hidden_size=48)
    with pytest.raises(ValueError, match=r"different base model.*q_proj.*\(32, 32\).*\(48, 48\)"):
        load_adapter(wider, tmp_path)
    with pytest.raises(ValueError, match=r"different base model.*not in this model"):
        load_adapter(tiny_model("gpt2"), tmp_path)


def test_missing_or_corrupt_files_are_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json is missing"):
        load_adapter(tiny_model(), tmp_path)
    save_adapter(trained_like(), tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_adapter(tiny_model(), tmp_path)


def test_adapter_from_a_newer_format_asks_for_an_upgrade(tmp_path):
    save_adapter(trained_like(), tmp_path)
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    meta["format_version"] = 99
    (tmp_path / "adapter_config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="Upgrade lmoe"):
        load_adapter(tiny_model(), tmp_path)


def test_weights_load_into_a_model_with_the_same_mixture_only(tmp_path, input_ids):
    model = trained_like()
    save_adapter(model, tmp_path / "adapter")
    fresh = tiny_model("llama")
    inject(
        fresh,
        LMoEConfig(
            num_experts=3,
            rank=2,
            router="dynamic",
            router_bias=True,
            target_modules=["q_proj", "down_proj"],
        ),
    )
    assert not torch.equal(fresh(input_ids).logits, model(input_ids).logits)
    load_adapter_weights(fresh, tmp_path / "adapter")
    assert torch.equal(fresh(input_ids).logits, model(input_ids).logits)
    other = inject(
        tiny_model("llama"),
        LMoEConfig(
            num_experts=3,
            rank=4,
            router="dynamic",
            router_bias=True,
            target_modules=["q_proj", "down_proj"],
        ),
    )
    with pytest.raises(ValueError, match="another mixture than this model"):
        load_adapter_weights(other, tmp_path / "adapter")


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_files_get_the_mode_an_ordinary_write_gives_under_the_umask(tmp_path, umask):
    """Adapter, checkpoint and eval JSON: 0o666 less the umask (mkstemp's 0o600 kept others out)."""
    from lmoe.evaluation.scoring import write_json
    from lmoe.io import current_umask, save_state

    old = os.umask(umask)
    try:
        assert current_umask() == umask
        save_adapter(trained_like(), tmp_path / "adapter")
        save_state(tmp_path / "checkpoint.pt", {"step": 1})
        write_json({"a": 1}, tmp_path / "eval.json")
        (tmp_path / "plain.txt").write_text("an ordinary write")
    finally:
        os.umask(old)
    written = [
        tmp_path / "adapter" / "adapter_config.json",
        tmp_path / "adapter" / "adapter_model.safetensors",
        tmp_path / "checkpoint.pt",
        tmp_path / "eval.json",
    ]
    want = stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode)
    assert want == 0o666 & ~umask
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in written}
    assert modes == {path.name: want for path in written}
