"""Routing analysis on a tiny random model: statistics against a direct count, JSON
summary, readable PNGs."""

import json
import math

import pytest
import torch
from conftest import VOCAB, tiny_model
from test_routing_stats import mi_from_joint

from lmoe import LMoEConfig, inject, lmoe_layers, record_routing, save_adapter
from lmoe.data.encoding import IGNORE, encode_all
from lmoe.data.records import read_records
from lmoe.evaluation.analysis import (
    SUMMARY_FILE,
    analyze,
    collect_routing,
    mean_active_experts,
)
from lmoe.evaluation.plots import PLOT_FILES, short_layer_names
from lmoe.routing_stats import active_experts, routing_stats

E = 5


def randomised(router: str, **cfg) -> torch.nn.Module:
    """A tiny injected llama whose routers hold random values (so routing is far from uniform; scale
    1: the values set are the ones in use)."""
    model = tiny_model("llama")
    inject(
        model,
        LMoEConfig(
            num_experts=E,
            router=router,
            target_modules="all-linear",
            lambda_hidden=8,
            router_param_scale=1.0,
            **cfg,
        ),
    )
    torch.manual_seed(0)
    with torch.no_grad():
        for _, layer in lmoe_layers(model):
            for name, p in layer.router.named_parameters():
                p.normal_(std=1.0 if name == "weight" else 0.5)
    return model


def groups():
    gen = torch.Generator().manual_seed(2)
    padded = torch.randint(0, VOCAB, (3, 7), generator=gen)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 4:] = 0
    mask[2, 2:] = 0
    return {
        "add": [
            {"input_ids": padded, "attention_mask": mask},
            torch.randint(0, VOCAB, (2, 5), generator=gen),
        ],
        "sort": [torch.randint(0, VOCAB, (4, 6), generator=gen)],
    }


def labelled_groups():
    """groups() with labels: -100 on each row's first tokens (the prompt) and on padding."""
    out = {}
    for name, batches in groups().items():
        out[name] = []
        for batch in batches:
            batch = (
                batch
                if isinstance(batch, dict)
                else {"input_ids": batch, "attention_mask": torch.ones_like(batch)}
            )
            labels = torch.where(batch["attention_mask"].bool(), batch["input_ids"], IGNORE)
            labels[:, :2] = IGNORE
            out[name].append({**batch, "labels": labels})
    return out


def direct_weights(model, batches_by_name, answers=False):
    """Independent reference: record every forward, then keep the real (or
    answer) tokens by hand."""
    out = {}
    for name, batches in batches_by_name.items():
        rows = {}
        for batch in batches:
            ids, mask = (
                (batch["input_ids"], batch["attention_mask"])
                if isinstance(batch, dict)
                else (batch, None)
            )
            with record_routing(model) as rec, torch.no_grad():
                model(
                    ids
                )  # padding positions do not change the real tokens' routing (causal, right-padded)
            keep = (
                torch.ones(ids.numel(), dtype=torch.bool)
                if mask is None
                else mask.reshape(-1).bool()
            )
            if answers:
                keep &= batch["labels"].reshape(-1) != IGNORE
            for layer in rec:
                rows.setdefault(layer, []).append(rec[layer][keep])
        out[name] = {layer: torch.cat(chunks) for layer, chunks in rows.items()}
    return out


def test_statistics_match_a_direct_count():
    model = randomised("dynamic")
    data = groups()
    stats = routing_stats(collect_routing(model, data))
    ref = direct_weights(model, data)
    assert stats.tokens == {"add": 7 + 4 + 2 + 10, "sort": 24}
    assert stats.layers == [name for name, _ in lmoe_layers(model)]
    for i, layer in enumerate(stats.layers):
        g = torch.cat([ref["add"][layer], ref["sort"][layer]])
        counts = (g > 0).sum(-1)
        torch.testing.assert_close(stats.mean_active[i], counts.float().mean())
        torch.testing.assert_close(
            stats.active_hist[i],
            torch.tensor([(counts == k).float().mean() for k in range(1, E + 1)]),
        )
        torch.testing.assert_close(stats.load[i], g.mean(0))
        torch.testing.assert_close(stats.group_usage[1, i], ref["sort"][layer].mean(0))
    torch.testing.assert_close(stats.load.sum(-1), torch.ones(len(stats.layers)))
    assert 1 <= stats.mean_active.min() and stats.mean_active.max() <= E
    assert len(set(stats.mean_active.tolist())) > 1  # the dynamic router's count varies by layer
    per_layer = mean_active_experts(model, data["add"] + data["sort"])
    assert list(per_layer) == stats.layers
    assert per_layer == pytest.approx(
        dict(zip(stats.layers, stats.mean_active.tolist(), strict=True)), abs=1e-6
    )


@pytest.mark.parametrize("router,expected", [("softmax", E), ("topk", 2), ("remix", 2)])
def test_fixed_routers_have_a_fixed_number_of_active_experts(router, expected):
    stats = routing_stats(collect_routing(randomised(router, top_k=2), groups()))
    assert (stats.mean_active == expected).all() and (stats.active_hist[:, expected - 1] == 1).all()


def test_answer_tokens_are_the_labelled_real_tokens():
    model = randomised("dynamic")
    data = labelled_groups()
    routed = collect_routing(model, data, tokens="answer")
    ref = direct_weights(model, data, answers=True)
    assert (
        next(iter(routed["add"].values())).shape[0] == 5 + 2 + 0 + 6
    )  # rows of 7, 4, 2 real tokens; 5 and 5
    for name in data:
        for layer in ref[name]:
            torch.testing.assert_close(routed[name][layer], ref[name][layer])
    with pytest.raises(ValueError, match="needs batches with"):
        collect_routing(model, groups(), tokens="answer")


def test_analyze_writes_summary_and_pngs(tmp_path):
    model = randomised("dynamic").train()
    data = labelled_groups()
    result = analyze(model, data, tmp_path)
    assert model.training  # the mode is restored
    on_disk = json.loads((tmp_path / SUMMARY_FILE).read_text())
    assert on_disk == result
    assert set(result["groups"]) == {"add", "sort"} and result["num_experts"] == E
    assert result["tokens_used"].startswith("answer tokens")
    ref = direct_weights(model, data, answers=True)
    sizes = torch.tensor([ref[g][next(iter(ref[g]))].shape[0] for g in ("add", "sort")])
    for layer, stats in result["layers"].items():
        g = torch.cat([ref["add"][layer], ref["sort"][layer]]).double()
        usage = torch.stack([ref[name][layer].double().mean(0) for name in ("add", "sort")])
        assert stats["mutual_information_bits"] == pytest.approx(
            mi_from_joint(usage, sizes), abs=1e-5
        )
        entropy = -(g * torch.where(g > 0, g.log(), 0)).sum(-1) / math.log(E)
        assert stats["routing_entropy"] == pytest.approx(entropy.mean().item(), abs=1e-5)
        assert stats["top_weight_over_half"] == pytest.approx(
            (g.max(-1).values > 0.5).double().mean().item(), abs=1e-6
        )
        top1 = torch.bincount(g.argmax(-1), minlength=E).double() / len(g)
        assert stats["expert_top1_share"] == pytest.approx(top1.tolist(), abs=1e-6)
        # ReMix's ESS of weights that sum to 1 is 1 / sum_i g_i^2; the top share is max_i g_i
        ess = 1 / (g**2).sum(-1)
        assert stats["effective_support_size"] == pytest.approx(ess.mean().item(), rel=1e-5)
        assert stats["top_expert_share"] == pytest.approx(g.max(-1).values.mean().item(), abs=1e-6)
    for key in (
        "mean_active_experts",
        "routing_entropy",
        "mutual_information_bits",
        "top_weight_over_half",
        "effective_support_size",
        "top_expert_share",
    ):
        per_layer = [v[key] for v in result["layers"].values()]
        assert result[key] == pytest.approx(sum(per_layer) / len(per_layer), abs=1e-5)
    assert 0 < result["mutual_information_bits"] < result["mutual_information_max_bits"] == 1
    for name in PLOT_FILES.values():
        data = (tmp_path / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000


def test_active_experts_counts_non_zero_weights():
    g = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.2, 0.3, 0.5]])
    assert active_experts(g).tolist() == [2, 1, 3]


def test_short_layer_names_stay_unique():
    assert short_layer_names(
        ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    ) == ["0.q_proj", "1.down_proj"]
    gpt2 = ["transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_proj"]
    assert short_layer_names(gpt2) == ["0.attn.c_proj", "0.mlp.c_proj"]


def saved_adapter(tmp_path):
    """A tiny model directory and an adapter of it (tmp_path / "adapter"); returns tests/tiny.py
    and the model directory."""
    tiny = pytest.importorskip(
        "tiny"
    )  # the tiny tokenizer + model directory helpers of the CLI tests
    from lmoe.models import load_model

    model_dir = tiny.tiny_model_dir(tmp_path / "model")
    model, _ = load_model(str(model_dir))
    inject(
        model,
        LMoEConfig(
            num_experts=E, router="dynamic", target_modules=["q_proj", "down_proj"], lambda_hidden=8
        ),
    )
    save_adapter(model, tmp_path / "adapter")
    return tiny, model_dir


def test_cli_analyze_groups_data_by_domain(tmp_path, capsys):
    from lmoe.cli import main
    from lmoe.models import load_model

    tiny, model_dir = saved_adapter(tmp_path)
    add = tiny.write_jsonl(
        tmp_path / "add.jsonl",
        [{"prompt": f"What is {i} + 30?", "completion": str(i + 30)} for i in range(5)],
    )
    mixed = tiny.write_jsonl(
        tmp_path / "mixed.jsonl",
        [
            {"prompt": "hello there", "completion": "how are you?", "domain": "greet"},
            {"text": "the cat sat on the mat"},
        ],
    )
    main(
        [
            "analyze",
            f"adapter={tmp_path / 'adapter'}",
            f"model={model_dir}",
            f"data=[{add},{mixed}]",
            f"out={tmp_path / 'out'}",
        ]
    )
    result = json.loads((tmp_path / "out" / SUMMARY_FILE).read_text())
    assert set(result["groups"]) == {"add", "greet", "mixed"} and len(result["layers"]) == 4
    assert all((tmp_path / "out" / name).is_file() for name in PLOT_FILES.values())
    _, tokenizer = load_model(str(model_dir))
    answers = {}  # domain -> answer tokens (a text record: all of them)
    for ex in encode_all(tokenizer, read_records(add) + read_records(mixed), 512):
        answers[ex.domain] = answers.get(ex.domain, 0) + sum(label != IGNORE for label in ex.labels)
    assert result["tokens"] == answers
    printed = capsys.readouterr().out
    assert "mean active experts per token" in printed and "I(skill/domain; expert)" in printed
    assert (  # the JSON's collapse statistics, averaged over layers, in the summary too
        f"  effective support size: {result['effective_support_size']:.2f} of "
        f"{result['num_experts']}   top expert's share: {result['top_expert_share']:.3f}\n"
    ) in printed
    assert all(
        {"effective_support_size", "top_expert_share"} <= set(layer)
        for layer in result["layers"].values()
    )


def test_cli_analyze_writes_beside_the_adapter_and_groups_by_a_key(tmp_path, capsys):
    from lmoe.cli import main

    tiny, model_dir = saved_adapter(tmp_path)
    adapter_files = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    rows = [
        {
            "prompt": f"What is {i} + 30?",
            "completion": str(i + 30),
            "skill": "xy"[i % 2],
            "domain": "d",
        }
        for i in range(6)
    ]
    data = tiny.write_jsonl(tmp_path / "own.jsonl", rows)
    main(
        [
            "analyze",
            f"adapter={tmp_path / 'adapter'}",
            f"model={model_dir}",
            f"data=[{data}]",
            "group=skill",
        ]
    )
    out = tmp_path / "adapter-analysis"  # the default: beside the adapter, which stays as it was
    assert set(json.loads((out / SUMMARY_FILE).read_text())["groups"]) == {"x", "y"}
    assert all((out / name).is_file() for name in PLOT_FILES.values())
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == adapter_files
    assert f"wrote {out}: {SUMMARY_FILE}" in capsys.readouterr().out
