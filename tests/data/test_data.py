"""lmoe.data.encoding and lmoe.data.skills: records, chat-template encoding with answer-only labels,
batching, built-ins."""

import logging
import re

import pandas as pd
import pytest
import torch
from tiny import tiny_tokenizer, write_jsonl

from lmoe.data.builtin import Mixture, conversation_pairs
from lmoe.data.encoding import (
    IGNORE,
    Example,
    batch_stream,
    bucketed_batches,
    collate,
    encode,
    encode_all,
)
from lmoe.data.records import read_records
from lmoe.data.skills import generate, in_words


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_prompt_completion_labels_only_the_answer(tok):
    ex = encode(
        tok,
        {
            "messages": [
                {"role": "user", "content": "What is 12 + 30?"},
                {"role": "assistant", "content": "42"},
            ],
            "domain": "d",
        },
    )
    prompt = ids(tok, "<|im_start|>user\nWhat is 12 + 30?<|im_end|>\n<|im_start|>assistant\n")
    answer = ids(tok, "42<|im_end|>\n")
    assert ex.input_ids == prompt + answer
    assert ex.labels == [IGNORE] * len(prompt) + answer
    assert answer[-2] == tok.eos_token_id  # the model learns to stop


def test_multi_turn_labels_every_assistant_turn(tok):
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hi"},
        {"role": "user", "content": "the cat?"},
        {"role": "assistant", "content": "sat"},
    ]
    ex = encode(tok, {"messages": messages, "domain": "d"})
    pieces = [
        (
            "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhello<|im_end|>\n"
            "<|im_start|>assistant\n",
            False,
        ),
        ("hi<|im_end|>\n", True),
        ("<|im_start|>user\nthe cat?<|im_end|>\n<|im_start|>assistant\n", False),
        ("sat<|im_end|>\n", True),
    ]
    expected_ids, expected_labels = [], []
    for text, is_answer in pieces:
        expected_ids += ids(tok, text)
        expected_labels += ids(tok, text) if is_answer else [IGNORE] * len(ids(tok, text))
    assert ex.input_ids == expected_ids and ex.labels == expected_labels


def test_text_record_labels_every_token(tok):
    ex = encode(tok, {"text": "the cat sat", "domain": "d"})
    assert ex.input_ids == ids(tok, "the cat sat") + [tok.eos_token_id]
    assert ex.labels == ex.input_ids


def test_jsonl_formats_and_domains(tmp_path):
    path = write_jsonl(
        tmp_path / "mine.jsonl",
        [
            {"prompt": "a", "completion": "b"},
            {
                "messages": [
                    {"role": "user", "content": "c"},
                    {"role": "assistant", "content": "d"},
                ],
                "domain": "chat",
            },
            {"text": "e"},
        ],
    )
    records = read_records(path)
    assert records == [
        {
            "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
            "domain": "mine",
        },
        {
            "messages": [{"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}],
            "domain": "chat",
        },
        {"text": "e", "domain": "mine"},
    ]


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"prompt": "a", "completion": ', "not valid JSON"),
        ('{"question": "a"}', "expected keys prompt+completion"),
        ('{"messages": [{"role": "user", "content": "a"}]}', "at least one assistant turn"),
    ],
)
def test_malformed_line_reported_with_line_number(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n\n' + line + "\n")
    with pytest.raises(ValueError, match=rf"bad.jsonl:3: .*{re.escape(message)}"):
        read_records(path)


def test_csv_and_parquet_through_datasets(tmp_path):
    frame = pd.DataFrame({"prompt": ["p1", "p2"], "completion": ["c1", "c2"]})
    frame.to_csv(tmp_path / "d.csv", index=False)
    frame.to_parquet(tmp_path / "d.parquet")
    for name in ("d.csv", "d.parquet"):
        records = read_records(tmp_path / name)
        assert [r["messages"][1]["content"] for r in records] == ["c1", "c2"]
        assert [r["messages"][0]["content"] for r in records] == ["p1", "p2"]


def test_truncation_warns_and_cuts(tok, caplog):
    records = [
        {"text": "the cat sat on the mat " * 10, "domain": "d"},
        {"text": "hi", "domain": "d"},
    ]
    with caplog.at_level(logging.WARNING):
        examples = encode_all(tok, records, max_length=8)
    assert "1 of 2 examples" in caplog.text and "max_length=8" in caplog.text
    assert [len(e.input_ids) for e in examples] == [8, len(ids(tok, "hi")) + 1]


def test_collate_pads_right_and_masks_padding():
    batch = collate([Example([5, 6, 7], [IGNORE, 6, 7]), Example([8], [8])], pad_id=0)
    assert torch.equal(batch["input_ids"], torch.tensor([[5, 6, 7], [8, 0, 0]]))
    assert torch.equal(batch["labels"], torch.tensor([[IGNORE, 6, 7], [8, IGNORE, IGNORE]]))
    assert torch.equal(batch["attention_mask"], torch.tensor([[1, 1, 1], [1, 0, 0]]))


def test_bucketed_batches_cover_each_example_once_with_similar_lengths():
    examples = [Example([1] * n, [1] * n) for n in [9, 1, 5, 3, 7, 2, 8, 4, 6, 10, 11, 12]]
    batches = bucketed_batches(examples, batch_size=4, seed=3, pool=8)
    assert sorted(i for b in batches for i in b) == list(range(12))
    for batch in batches:  # within a pool, a batch is a run of the length-sorted order
        lengths = [len(examples[i].input_ids) for i in batch]
        assert lengths == sorted(lengths)
    assert bucketed_batches(examples, 4, seed=3, pool=8) == batches


def test_batch_stream_resumes_at_any_batch():
    examples = [Example([1] * n, [1] * n) for n in range(1, 8)]
    whole = [
        [len(e.input_ids) for e in b]
        for b, _ in zip(batch_stream(examples, 2, seed=1), range(11), strict=False)
    ]
    tail = [
        [len(e.input_ids) for e in b]
        for b, _ in zip(batch_stream(examples, 2, seed=1, start=5), range(6), strict=False)
    ]
    assert tail == whole[5:]
    assert whole[:4] != whole[4:8]  # the second epoch is shuffled differently


def test_in_words_against_hand_written_values():
    assert [in_words(n) for n in (0, 7, 15, 20, 40, 42, 100, 347, 900, 999)] == [
        "zero",
        "seven",
        "fifteen",
        "twenty",
        "forty",
        "forty-two",
        "one hundred",
        "three hundred forty-seven",
        "nine hundred",
        "nine hundred ninety-nine",
    ]


def test_skills_have_exact_answers_and_disjoint_splits():
    for skill in ("add", "sort", "reverse_words", "count_letters", "number_words"):
        train, test = generate(skill, 60, "train", 0), generate(skill, 20, "test", 0)
        assert len(set(train)) == 60 and len(set(test)) == 20
        assert not {p for p, _ in train} & {p for p, _ in test}
        assert generate(skill, 20, "test", 0) == test  # deterministic
    for prompt, answer in generate("add", 30, "test", 1):
        a, b = map(int, re.findall(r"\d+", prompt))
        assert int(answer) == a + b
    for prompt, answer in generate("sort", 30, "train", 1):
        numbers = [int(x) for x in prompt.split(":")[1].split(",")]
        assert [int(x) for x in answer.split(",")] == sorted(numbers)
    for prompt, answer in generate("count_letters", 30, "train", 1):
        letter, word = re.findall(r"'(\w+)'", prompt)
        assert int(answer) == word.count(letter)
    for prompt, answer in generate("reverse_words", 30, "train", 1):
        assert answer.split() == prompt.split(":")[1].split()[::-1]


def test_builtin_conversations_split_is_deterministic_and_disjoint():
    mix = Mixture(
        domains=["german", "english/greetings+food"],
        skills=[],
        per_domain=1000,
        test_per_domain=1000,
    )
    train, test = mix.conversations("train"), mix.conversations("test")
    pairs = {(r["domain"], r["messages"][0]["content"]) for r in train}
    assert test and not pairs & {(r["domain"], r["messages"][0]["content"]) for r in test}
    assert {r["domain"] for r in test} == {"german", "english/greetings+food"}
    assert len(train) + len(test) == len(conversation_pairs("german")) + len(
        conversation_pairs("english/greetings+food")
    )
    assert mix.conversations("test") == test
    with pytest.raises(ValueError, match="Unknown conversation domain"):
        conversation_pairs("klingon")
