"""lmoe compare's pieces without training: the LoRA's parameter count against PEFT's, the nearest
rank, the paired standard error against a hand computation, the held-out split, per-item scores
against lmoe's aggregate evaluation."""

import math

import pytest
from conftest import tiny_model
from tiny import tiny_llama, tiny_model_dir, tiny_tokenizer, write_jsonl

from lmoe.compare import CompareConfig
from lmoe.compare.items import PERPLEXITY, metric_value, score_items
from lmoe.compare.runs import lora_params_per_rank, nearest_rank, plan_methods
from lmoe.compare.split import split_files
from lmoe.compare.stats import paired_difference
from lmoe.data.records import read_records
from lmoe.evaluation.scoring import evaluate_file
from lmoe.inject import count_parameters
from lmoe.training.config import TrainConfig

TARGETS = ["q_proj", "v_proj", "up_proj"]


@pytest.mark.parametrize("rank", [1, 3, 18])
def test_lora_count_is_peft_lora_count(rank):
    peft = pytest.importorskip("peft")
    model = tiny_model("llama")
    lora = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=rank, target_modules=TARGETS))
    assert rank * lora_params_per_rank(model, TARGETS) == count_parameters(lora)[0]


def test_nearest_rank_by_hand():
    assert nearest_rank(100, 30) == 3  # 90 (off by 10) beats 120 (off by 20)
    assert nearest_rank(105, 30) == 3  # a tie: the lower rank
    assert nearest_rank(106, 30) == 4
    assert nearest_rank(5, 30) == 1  # never below rank 1
    assert nearest_rank(120, 30) == 4  # equal where one is


def test_plan_matches_each_mixture_with_the_nearest_lora(tmp_path):
    peft = pytest.importorskip("peft")
    model_dir = tiny_model_dir(tmp_path / "model")
    cfg = CompareConfig.from_file(
        None,
        [
            f"model={model_dir}",
            "mixtures.soft={}",
            "mixtures.dyn.lmoe.router=dynamic",  # its lambda heads: no LoRA of equal count
            "mixtures.small.lmoe.rank=1",
            f"output_dir={tmp_path / 'out'}",
        ],
    )
    from lmoe.models import load_model

    model = load_model(str(model_dir))[0]
    methods = {m.name: m for m in plan_methods(cfg, model)}
    per_rank = lora_params_per_rank(model, TARGETS)
    for name in ("soft", "dyn", "small"):
        mix, lora = methods[name], methods[methods[name].lora]
        assert lora.kind == "lora" and lora.trainable == lora.rank * per_rank
        # nearest: no other rank is closer to the mixture's count
        gap = abs(lora.trainable - mix.trainable)
        assert gap <= per_rank / 2
        # the count is what PEFT trains at that rank
        peft_lora = peft.get_peft_model(
            load_model(str(model_dir))[0], peft.LoraConfig(r=lora.rank, target_modules=TARGETS)
        )
        assert count_parameters(peft_lora)[0] == lora.trainable
    assert methods["soft"].trainable == methods[methods["soft"].lora].trainable  # 4 x 4 + routers
    assert methods["dyn"].trainable > methods["soft"].trainable
    assert methods["small"].lora != methods["soft"].lora


def test_paired_standard_error_by_hand():
    def metric(values):
        return {"kind": "mean", "ids": ["a", "b", "c", "d"], "values": values}

    mixture = [metric([1, 0, 1, 1]), metric([1, 1, 0, 1])]  # seeds 0 and 1
    lora = [metric([0, 0, 1, 0]), metric([1, 0, 0, 0])]
    # d = [1, 0, 0, 1] and [0, 1, 0, 1]; per item over seeds [0.5, 0.5, 0, 1]; mean 0.5;
    # squared deviations 0 + 0 + 0.25 + 0.25 = 0.5; SE = sqrt(0.5 / (4 * 3))
    got = paired_difference(mixture, lora)
    assert got["difference"] == pytest.approx(0.5)
    assert got["paired_se"] == pytest.approx(math.sqrt(0.5 / 12))
    assert (got["n"], got["seeds"]) == (4, 2)
    # the seeds' gaps 0.5 and 0.5: no spread between seeds
    assert got["seed_se"] == pytest.approx(0.0)
    lora[1] = metric([1, 1, 1, 1])  # seed 1's gap is now -0.25: sd 0.5303, SE 0.375
    assert paired_difference(mixture, lora)["seed_se"] == pytest.approx(0.375)
    assert paired_difference(mixture[:1], lora[:1])["seed_se"] is None
    with pytest.raises(ValueError, match="different held-out items"):
        paired_difference([metric([1, 0, 1, 1])], [{**metric([0, 0, 0, 0]), "ids": list("abce")}])


def test_perplexity_difference_is_the_mean_gap_of_log_perplexity():
    tokens = [3, 1, 4, 2]

    def metric(nll):
        return {"kind": PERPLEXITY, "ids": list("abcd"), "values": nll, "tokens": tokens}

    mixture = [metric([3.0, 0.5, 6.0, 1.0]), metric([2.5, 0.7, 5.0, 1.5])]
    lora = [metric([3.3, 0.4, 6.4, 1.2]), metric([2.9, 0.9, 5.5, 1.1])]
    expected = sum(
        math.log(metric_value(m)) - math.log(metric_value(lo))
        for m, lo in zip(mixture, lora, strict=True)
    ) / len(mixture)
    assert metric_value(mixture[0]) == pytest.approx(math.exp(10.5 / 10))
    assert paired_difference(mixture, lora)["difference"] == pytest.approx(expected)


def test_split_is_disjoint_stable_and_complete(tmp_path):
    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(40)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = CompareConfig(data=[str(data)], held_out_fraction=0.3, output_dir=str(tmp_path / "o"))
    sides = split_files(cfg, tmp_path / "split")
    train, test = (read_records(p) for p in (sides["data"][0], sides["eval_data"][0]))
    key = [r["messages"][0]["content"] for r in read_records(data)]
    got = [r["messages"][0]["content"] for r in train + test]
    assert sorted(got) == sorted(key) and not {*map(str, train)} & {*map(str, test)}
    assert 0 < len(test) < len(train)
    assert split_files(cfg, tmp_path / "split2") == {
        "data": [str(tmp_path / "split2" / "d.train.jsonl")],
        "eval_data": [str(tmp_path / "split2" / "d.test.jsonl")],
    }
    assert read_records(tmp_path / "split2" / "d.test.jsonl") == test


def test_items_agree_with_lmoe_evaluation(tmp_path):
    tok = tiny_tokenizer()
    model = tiny_llama(len(tok))
    chats = write_jsonl(
        tmp_path / "chats.jsonl",
        [{"prompt": f"What is {a} + 30?", "completion": str(a + 30)} for a in range(10, 16)],
    )
    questions = write_jsonl(
        tmp_path / "mc.jsonl",
        [
            {"question": f"Pick {w}", "choices": ["cat", "mat", w], "answer": 2}
            for w in ("one", "two", "three", "four")
        ],
    )
    cfg = TrainConfig(
        model="x", data=[str(chats)], eval_data=[str(chats), str(questions)], compare_base=False
    )
    items = score_items(model, tok, cfg)
    assert set(items) == {
        "exact_match:chats",
        "perplexity:chats",
        "mc cloze/chat acc",
        "mc letter/chat acc",
    }
    ref = evaluate_file(model, tok, chats, cfg.max_length, cfg.mc)
    assert metric_value(items["perplexity:chats"]) == pytest.approx(ref["perplexity"]["chats"])
    assert metric_value(items["exact_match:chats"]) == ref["exact_match"]["chats"]
    assert len(items["perplexity:chats"]["values"]) == 6
    mc = evaluate_file(model, tok, questions, cfg.max_length, cfg.mc)["multiple_choice"]
    for key in ("cloze/chat", "letter/chat"):
        assert metric_value(items[f"mc {key} acc"]) == mc[key]["acc"]


def test_effective_support_is_read_where_the_routing_stats_have_it(tmp_path):
    from lmoe.compare.runs import SUPPORT_KEY, effective_support

    assert effective_support(tmp_path) == (None, None)  # neither file: '-'
    (tmp_path / "metrics.csv").write_text(
        f"step,{SUPPORT_KEY}\n" + "".join(f"{i},{i}\n" for i in range(1, 13))
    )
    assert effective_support(tmp_path) == (pytest.approx(7.5), "training")  # steps 3..12
    (tmp_path / "routing.json").write_text('{"mutual_information_bits": 0.3}')
    assert effective_support(tmp_path)[1] == "training"  # held-out statistics without it
    (tmp_path / "routing.json").write_text(f'{{"{SUPPORT_KEY}": 2.5}}')
    assert effective_support(tmp_path) == (2.5, "held-out")
