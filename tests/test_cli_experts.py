"""`lmoe experts list | add | remove | replace` and `lmoe train frozen_experts=[...]` end to end on
a tiny model saved as a local HF directory, against PEFT's own forward of each adapter, hand values
and the files' slices."""

import math
import re

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from tiny import fix_routing, peft_lora_dir, tiny_model_dir, write_jsonl
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from lmoe import LMoEConfig, compose, lmoe_layers, load_adapter, record_routing, save_adapter
from lmoe.cli import main
from lmoe.modular.edit import describe_mixture
from lmoe.training.config import TrainConfig
from lmoe.training.metrics_log import read_metrics

WEIGHTS = "adapter_model.safetensors"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A base, four PEFT adapters (ranks 4, 2 with rsLoRA, 3 on q_proj only, 4 on v_proj only), the
    first three composed by the CLI (zero router) and the same mixture with a random
    router (`routed`)."""
    root = tmp_path_factory.mktemp("experts")
    base = tiny_model_dir(root / "model")
    loras = [
        peft_lora_dir(base, root / "a", 1),
        peft_lora_dir(base, root / "b", 2, r=2, lora_alpha=5, use_rslora=True),
        peft_lora_dir(base, root / "c", 3, r=3, lora_alpha=6, target_modules=["q_proj"]),
        peft_lora_dir(base, root / "d", 4, target_modules=["v_proj"]),
    ]
    adapters = ",".join(map(str, loras[:3]))
    main(["compose", f"adapters=[{adapters}]", f"model={base}", f"out={root / 'mix'}"])
    routed = compose(
        AutoModelForCausalLM.from_pretrained(base),
        loras[:3],
        LMoEConfig(composition="outputs", router_bias=True),
    )
    torch.manual_seed(5)
    with torch.no_grad():
        for _, layer in lmoe_layers(routed):
            layer.router.weight.normal_(std=1 / layer.router.scale)  # std 1 in use
            layer.router.bias.normal_(std=1 / layer.router.scale)
    save_adapter(routed, root / "routed")
    return {
        "root": root,
        "base": base,
        "loras": loras,
        "mix": root / "mix",
        "routed": root / "routed",
    }


@pytest.fixture
def ids():
    return torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))


def logits(base, ids, adapter=None, routing=None):
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    if adapter:
        load_adapter(model, adapter)
    if routing is not None:
        fix_routing(model, torch.as_tensor(routing, dtype=torch.float32))
    with torch.no_grad():
        return model(ids).logits


def peft_logits(base, directory, ids):
    with torch.no_grad():
        return (
            PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), directory)
            .eval()(ids)
            .logits
        )


def experts(s, action, mixture, **settings):
    """`lmoe experts ACTION mixture=MIXTURE key=value ...` on the tiny base."""
    words = [f"{key}={value}" for key, value in settings.items()]
    main(["experts", action, f"mixture={mixture}", f"model={s['base']}", *words])


def test_added_adapter_is_off_at_first_and_one_hot_gives_its_outputs(setup, ids, tmp_path, capsys):
    s, d = setup, setup["loras"][3]
    experts(s, "add", s["mix"], adapters=f"[{d}]", out=tmp_path / "exact", logit=-1e4)
    torch.testing.assert_close(
        logits(s["base"], ids, tmp_path / "exact"),
        logits(s["base"], ids, s["mix"]),
        rtol=1e-5,
        atol=1e-6,
    )
    experts(s, "add", s["mix"], adapters=d, out=tmp_path / "new")  # bias -4: e^-4 / (3 + e^-4)
    assert (
        "new experts: 3; next, train the router: lmoe train init_adapter="
        in capsys.readouterr().out
    )
    model = load_adapter(AutoModelForCausalLM.from_pretrained(s["base"]), tmp_path / "new")
    with record_routing(model) as rec, torch.no_grad():
        model(ids)
    share = math.exp(-4) / (3 + math.exp(-4))
    for g in rec.values():
        torch.testing.assert_close(g, torch.tensor([(1 - share) / 3] * 3 + [share]).expand_as(g))
    for i, directory in enumerate(s["loras"]):
        torch.testing.assert_close(
            logits(s["base"], ids, tmp_path / "new", torch.eye(4)[i]),
            peft_logits(s["base"], directory, ids),
            rtol=1e-5,
            atol=1e-5,
        )


def test_added_adapter_keeps_a_trained_routing_among_the_earlier_experts(setup, ids, tmp_path):
    s = setup
    experts(s, "add", s["routed"], adapters=s["loras"][3], out=tmp_path / "new")
    routings = []
    for adapter in (s["routed"], tmp_path / "new"):
        model = load_adapter(AutoModelForCausalLM.from_pretrained(s["base"]), adapter)
        with record_routing(model) as rec, torch.no_grad():
            model(ids)
        routings.append(rec)
    for name, before in routings[0].items():
        after = routings[1][name].double()
        assert torch.all(after[:, 3] <= math.exp(-4)) and torch.all(after[:, 3] > 0)
        if (
            ".layers.0." in name
        ):  # the first layer reads the same input before and after; later ones do not
            # the new row is the old rows' mean, its bias 4 lower: z_new = mean(z) - 4, so with g =
            # softmax(z), g_new / (1 - g_new) = exp(mean(log g_old) - 4); the old
            # weights shrink by 1 - g_new
            q = (before.double().log().mean(1) - 4).exp()
            torch.testing.assert_close(after[:, 3], q / (1 + q), rtol=1e-4, atol=1e-9)
            torch.testing.assert_close(
                after[:, :3], before.double() * (1 - after[:, 3:]), rtol=1e-5, atol=1e-7
            )


def test_replace_puts_the_adapter_in_the_slot_and_keeps_the_rest(setup, ids, tmp_path):
    s = setup
    experts(s, "replace", s["routed"], expert=0, adapter=s["loras"][3], out=tmp_path / "replaced")
    for i, directory in [(0, s["loras"][3]), (1, s["loras"][1])]:
        torch.testing.assert_close(
            logits(s["base"], ids, tmp_path / "replaced", torch.eye(3)[i]),
            peft_logits(s["base"], directory, ids),
            rtol=1e-5,
            atol=1e-5,
        )
    old, new = load_file(s["routed"] / WEIGHTS), load_file(tmp_path / "replaced" / WEIGHTS)
    assert old.keys() == new.keys()
    for key in old:  # copies, so equal exactly: the router and experts 1 and 2 as they were
        assert torch.equal(
            new[key] if ".router." in key else new[key][1:],
            old[key] if ".router." in key else old[key][1:],
        ), key


def test_remove_drops_the_slice(setup, ids, tmp_path):
    s = setup
    experts(s, "remove", s["routed"], experts=1, out=tmp_path / "removed")
    old, new = load_file(s["routed"] / WEIGHTS), load_file(tmp_path / "removed" / WEIGHTS)
    assert old.keys() == new.keys()
    assert all(torch.equal(new[key], old[key][[0, 2]]) for key in old), (
        "not the slices of experts 0 and 2"
    )
    assert describe_mixture(tmp_path / "removed")["num_experts"] == 2
    torch.testing.assert_close(
        logits(s["base"], ids, tmp_path / "removed", [0.0, 1.0]),
        peft_logits(s["base"], s["loras"][2], ids),
        rtol=1e-5,
        atol=1e-5,
    )


def test_list_against_the_adapters_own_products(setup, capsys):
    s = setup
    main(["experts", "list", f"mixture={s['mix']}"])
    out = capsys.readouterr().out
    assert "3 experts of rank 4 (scaling 1), softmax router, outputs composition" in out
    assert "wraps q_proj, v_proj in 4 layers of llama" in out
    desc = describe_mixture(s["mix"])
    # the mixture holds the first three adapters
    scales = [8 / 4, 5 / math.sqrt(2), 6 / 3]
    for e, (directory, scale) in enumerate(zip(s["loras"], scales, strict=False)):
        weights = load_file(directory / WEIGHTS)  # PEFT's own file, products formed in float64
        norms = [
            (scale * weights[key.replace("lora_A", "lora_B")].double() @ A.double()).norm()
            for key, A in weights.items()
            if "lora_A" in key
        ]
        assert desc["experts"][e]["update_norm"] == pytest.approx(sum(norms).item() / 4, rel=1e-6)
        assert (
            desc["experts"][e]["router_row_norm"] == 0 and desc["experts"][e]["router_bias"] is None
        )


def test_fresh_expert_trains_with_the_earlier_experts_frozen_and_resumes(setup, tmp_path, capsys):
    s = setup
    experts(s, "add", s["routed"], fresh=1, out=tmp_path / "fresh")
    assert "frozen_experts=[0,1,2] data=[NEW.jsonl,REPLAY.jsonl]" in capsys.readouterr().out
    main(["experts", "list", f"mixture={tmp_path / 'fresh'}"])
    assert re.search(r"\n\s+3\s+0 .*B = 0", capsys.readouterr().out)
    data = write_jsonl(
        tmp_path / "new.jsonl",
        [{"prompt": f"cat {i}?", "completion": f"sat {i}"} for i in range(8)],
    )
    run = [
        "train",
        f"model={s['base']}",
        f"init_adapter={tmp_path / 'fresh'}",
        "frozen_experts=[0,1,2]",
        f"data=[{data}]",
        f"output_dir={tmp_path / 'run'}",
        "batch_size=4",
        "save_every=1",
        "compare_base=false",
    ]
    main(run + ["steps=2"])
    main(run + ["steps=3", "--resume"])
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2, 3]
    assert TrainConfig.from_file(tmp_path / "run" / "train_config.yaml").frozen_experts == [0, 1, 2]
    start, final = (
        load_file(tmp_path / "fresh" / WEIGHTS),
        load_file(tmp_path / "run" / "adapter" / WEIGHTS),
    )
    for key in start:
        if key.endswith(("lora_A", "lora_B")):
            assert torch.equal(final[key][:3], start[key][:3]), f"a frozen expert moved: {key}"
            assert not torch.equal(final[key][3], start[key][3]) or key.endswith("lora_A"), key
        else:
            assert not torch.equal(final[key], start[key]), f"a router did not learn: {key}"
    assert any(final[key][3].abs().sum() > 0 for key in final if key.endswith("lora_B")), (
        "the fresh B stayed 0"
    )


def other_base_lora(tmp_path):
    """An adapter of another base: a Llama whose layers are 48 wide where the tiny base's are 32."""
    torch.manual_seed(0)
    other = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=48,
        )
    )
    return peft_lora_dir(other, tmp_path / "other", 0)


def test_errors_name_the_adapter_the_module_and_the_fix(setup, tmp_path, capsys):
    s = setup
    cases = [
        (
            other_base_lora(tmp_path),
            r"other: model\.layers\.0\.self_attn\.q_proj maps 48 -> 48 features, this "
            r"base's layer 32 -> 32: it was trained on another base model",
        ),
        (
            peft_lora_dir(s["base"], tmp_path / "k", 0, target_modules=["k_proj"]),
            r"k adapts model\.layers\.0\.self_attn\.k_proj, "
            r"model\.layers\.1\.self_attn\.k_proj, which this mixture does not wrap "
            r"\(it wraps q_proj, v_proj\)\. Rebuild the mixture with `lmoe compose`",
        ),
        (
            peft_lora_dir(s["base"], tmp_path / "r8", 0, r=8),
            r"r8: .* has rank 8, above the mixture's rank 4 .* Rebuild the mixture with "
            r"`lmoe compose` .* takes the largest rank\. Or train this skill at rank <= 4\.",
        ),
    ]
    for adapter, message in cases:
        for action, settings in (
            ("add", {"adapters": adapter}),
            ("replace", {"expert": 0, "adapter": adapter}),
        ):
            with pytest.raises(SystemExit) as exit_:
                experts(s, action, s["mix"], **settings, out=tmp_path / "out")
            assert exit_.value.code == 2
            assert re.search(message, capsys.readouterr().err.splitlines()[-1]), (action, message)
    assert not (tmp_path / "out").exists()
    for argv, message in [
        (["experts", "add", f"mixture={s['mix']}", f"out={tmp_path / 'out'}"], "give adapters="),
        (["experts", "remove", f"mixture={s['mix']}", f"out={tmp_path}"], "needs experts="),
        (
            ["train", f"init_adapter={s['mix']}", "frozen_experts=[1,3]"],
            r"frozen_experts=\[1, 3\] is invalid: expected indices of init_adapter's 3 experts, "
            r"0 to 2",
        ),
        (["train", "frozen_experts=[0]"], r"frozen_experts=\[0\] needs init_adapter=DIR"),
        (
            ["train", f"init_adapter={s['mix']}", "frozen_experts=[0]", "train_experts=false"],
            "every expert is frozen already",
        ),
    ]:
        with pytest.raises(SystemExit):
            main(list(map(str, argv)))
        assert re.search(message, capsys.readouterr().err.splitlines()[-1]), argv
