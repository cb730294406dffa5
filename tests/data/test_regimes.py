"""lmoe.data.regimes: the mixture-vs-LoRA study's generated data (conflict, tasks_N, retention)."""

from __future__ import annotations

import json
import re

import pytest

from lmoe.data.records import read_records
from lmoe.data.regimes import (
    FORMATS,
    MAPPINGS,
    OPERATIONS,
    RegimeSizes,
    conflict,
    main,
    narrow,
    opaque_code,
    regime_files,
    task_list,
    tasks,
    write_regimes,
)

SMALL = RegimeSizes(
    conflict_train_inputs=40,
    conflict_test_inputs=10,
    tasks_train_total=160,
    tasks_test_total=32,
    retention_train=50,
    retention_test=20,
)
WORDS = ["tiger", "apple", "window"]


def test_each_mapping_answers_as_its_rule_says_on_hand_written_words():
    expected = {
        "reverse": "window apple tiger",
        "initials": "taw",
        "sorted": "apple tiger window",
        "last_twice": "window window",
        "rotate": "apple window tiger",
        "lengths": "5 5 6",
        "first_last": "tiger window",
        "last_letters": "rew",
    }
    assert {name: rule(WORDS) for name, rule in MAPPINGS.items()} == expected


def test_each_operation_and_format_on_hand_written_words():
    assert {name: op(WORDS) for name, op in OPERATIONS.items()} == {
        "copy": WORDS,
        "reverse": ["window", "apple", "tiger"],
        "sort": ["apple", "tiger", "window"],
        "initials": ["t", "a", "w"],
    }
    assert {name: fmt(["t", "a"]) for name, fmt in FORMATS.items()} == {
        "json": '["t", "a"]',
        "brackets": "[t] [a]",
        "pipes": "t | a",
        "numbered": "1) t 2) a",
    }


def test_conflict_maps_the_same_input_differently_under_each_opaque_code():
    records = conflict(30, "train", seed=0, domains=4)
    by_input: dict[str, list[dict]] = {}
    for r in records:
        by_input.setdefault(r["input"], []).append(r)
        code = opaque_code(f"conflict/{r['domain']}")
        assert r["prompt"] == f"[code {code}] {r['input']}"
        assert r["completion"] == MAPPINGS[r["domain"]](r["input"].split())
    assert len(by_input) == 30
    for group in by_input.values():
        assert sorted(r["domain"] for r in group) == sorted(list(MAPPINGS)[:4])
        assert len({r["completion"] for r in group}) == 4  # the same input, four answers
        assert len({r["prompt"] for r in group}) == 4
    codes = {re.match(r"\[code (\w+)\]", r["prompt"]).group(1) for r in records}
    assert len(codes) == 4 and not codes & {"reverse", "initials", "sorted", "last_twice"}


def test_tasks_have_their_count_formats_and_a_fixed_total():
    pairs = task_list()
    assert len(set(pairs)) == 16  # every (operation, format) once
    for n in (2, 4, 8, 16):
        records = tasks(n, 160, "train", seed=0)
        assert len(records) == 160
        names = {r["domain"] for r in records}
        assert len(names) == n
        assert all(sum(r["domain"] == name for r in records) == 160 // n for name in names)
        chosen = pairs[:n]
        assert len({fmt for _, fmt in chosen}) == min(n, 4)
        assert len({op for op, _ in chosen}) == min(n, 4)
        for r in records:
            operation, fmt = r["domain"].split("_", 1)
            items = OPERATIONS[operation](r["input"].split())
            assert r["completion"] == FORMATS[fmt](items)
            assert r["prompt"] == f"[task {opaque_code('tasks/' + r['domain'])}] {r['input']}"
            if fmt == "json":  # an independent reading of the format
                assert json.loads(r["completion"]) == items
            if fmt == "pipes":
                assert r["completion"].split(" | ") == items
    with pytest.raises(ValueError, match="divide the total"):
        tasks(3, 160, "train", seed=0)


def test_files_are_deterministic_disjoint_and_cover_every_domain(tmp_path):
    files = regime_files(SMALL, seed=0, conversations=False)
    assert files == regime_files(SMALL, seed=0, conversations=False)
    assert files != regime_files(SMALL, seed=1, conversations=False)
    train_inputs, test_inputs = set(), set()
    for regime in ["conflict", "tasks_2", "tasks_4", "tasks_8", "tasks_16", "retention"]:
        train, test = files[f"{regime}/train.jsonl"], files[f"{regime}/test.jsonl"]
        assert {r["domain"] for r in train} == {r["domain"] for r in test}
        train_inputs |= {r["input"] for r in train}
        test_inputs |= {r["input"] for r in test}
    assert train_inputs and test_inputs and not train_inputs & test_inputs  # across regimes too
    assert len(files["conflict/test.jsonl"]) == 10 * 4
    assert len(files["tasks_16/test.jsonl"]) == 32
    add = files["retention/train.jsonl"]
    for r in add:
        a, b = map(int, re.findall(r"\d+", r["prompt"]))
        assert r["completion"] == str(a + b)

    first = write_regimes(tmp_path / "a", 0, SMALL, conversations=False)
    write_regimes(tmp_path / "b", 0, SMALL, conversations=False)
    for path in first["records"]:
        assert (tmp_path / "a" / path).read_bytes() == (tmp_path / "b" / path).read_bytes()
        records = read_records(tmp_path / "a" / path)  # what lmoe train / lmoe eval read
        assert len(records) == first["records"][path]
        assert {r["domain"] for r in records} == {r["domain"] for r in files[path]}
        assert records[0]["messages"][-1] == {
            "role": "assistant",
            "content": files[path][0]["completion"],
        }
    manifest = json.loads((tmp_path / "a" / "regimes.json").read_text())
    assert manifest["seed"] == 0 and manifest["sizes"]["conflict_domains"] == 4


def test_bad_sizes_are_one_clear_error(tmp_path, capsys):
    with pytest.raises(ValueError, match="expected 2 to 8"):
        conflict(5, "train", seed=0, domains=9)
    with pytest.raises(ValueError, match="unknown skill"):
        narrow("juggle", 5, "train", seed=0)
    with pytest.raises(SystemExit) as stopped:
        main([str(tmp_path), "--conflict-domains", "1"])
    assert stopped.value.code == 2
    assert "domains=1" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing written
