"""lmoe.data.choices: the two prompt protocols against hand-written text, and multiple-choice rows
as training data."""

import pytest
from tiny import tiny_tokenizer, write_jsonl

from lmoe.data.choices import MultipleChoice, choice_record, fit, request, segments, training_record
from lmoe.data.encoding import IGNORE, encode
from lmoe.data.records import read_records
from lmoe.training.config import TrainConfig
from lmoe.training.data import training_examples

Q = {
    "question": "Which is a fruit?",
    "choices": ["stone", "apple", "river"],
    "gold": 1,
    "domain": "mc",
    "where": "q",
}


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_letter_prompt_in_the_chat_template(tok):
    user = (
        "Below is a multiple-choice question. Choose the correct answer.\nWhich is a fruit?\n"
        "Options:\nA. stone\nB. apple\nC. river\nAnswer:"
    )
    assert segments(tok, Q, MultipleChoice("letter", "chat"), "B") == [
        (f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n", False),
        ("B<|im_end|>\n", True),
    ]
    assert segments(tok, Q, MultipleChoice("letter", "plain"), "B") == [(user, False), (" B", True)]


def test_cloze_prompt_uses_the_cloze_text_and_the_choice(tok):
    q = {**Q, "cloze": "Question: Which is a fruit?\nAnswer:"}
    assert segments(tok, q, MultipleChoice("cloze", "plain"), "apple") == [
        (q["cloze"], False),
        (" apple", True),
    ]
    assert segments(tok, Q, MultipleChoice("cloze", "chat"), "apple") == [
        ("<|im_start|>user\nWhich is a fruit?<|im_end|>\n<|im_start|>assistant\n", False),
        ("apple<|im_end|>\n", True),
    ]


def test_requests_tokenise_prompt_and_answers_apart(tok):
    prefix, conts = request(tok, Q, MultipleChoice("cloze", "plain"))
    assert prefix == tok("Which is a fruit?", add_special_tokens=False)["input_ids"]
    assert conts == [tok(" " + c, add_special_tokens=False)["input_ids"] for c in Q["choices"]]
    prefix, letters = request(tok, Q, MultipleChoice("letter", "chat"))
    assert letters == [
        tok(f"{x}<|im_end|>\n", add_special_tokens=False)["input_ids"][:1] for x in "ABC"
    ]


def test_fit_cuts_the_prompt_from_the_left_and_never_an_answer():
    assert fit(list(range(10)), [[1, 2, 3], [4]], max_length=8, where="q") == [5, 6, 7, 8, 9]
    assert fit(list(range(4)), [[1, 2, 3]], max_length=8, where="q") == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="q: a choice is 8 tokens"):
        fit([1], [list(range(8))], max_length=8, where="q")


def test_bad_rows_name_their_place():
    for row, why in [
        ({"question": "q", "choices": ["a"], "answer": 0}, "at least two choices"),
        ({"question": "q", "choices": ["a", "b"], "answer": "c"}, "not in list"),
        ({"choices": ["a", "b"], "answer": 0}, "question"),
    ]:
        with pytest.raises(ValueError, match=f"f.jsonl:3: expected .*{why}"):
            choice_record(row, "d", "f.jsonl:3")


@pytest.mark.parametrize(
    "protocol,target", [("letter", "B"), ("cloze", "apple"), ("auto", "apple"), (None, "apple")]
)
def test_multiple_choice_rows_train_on_the_letter_or_the_choice(tok, tmp_path, protocol, target):
    """Letter trains on the letter after the listed options; cloze, auto and the default (auto) on
    the gold choice's text after the bare question."""
    path = write_jsonl(
        tmp_path / "mc.jsonl",
        [{"question": Q["question"], "choices": Q["choices"], "answer": "apple"}],
    )
    cfg = TrainConfig(data=[str(path)], **({"mc": {"protocol": protocol}} if protocol else {}))
    (ex,) = training_examples(cfg, tok)
    answer = [t for t in ex.labels if t != IGNORE]
    assert tok.decode(answer) == f"{target}<|im_end|>\n"
    assert ("Options:\nA. stone" in tok.decode(ex.input_ids)) == (target == "B")
    assert ex.input_ids == encode(tok, training_record(read_records(path)[0], cfg.mc)).input_ids


def test_auto_is_the_default_and_scores_both_protocols():
    fmt = MultipleChoice()
    assert fmt.protocol == "auto" and TrainConfig().mc == fmt
    assert [(f.protocol, f.template, f.key) for f in MultipleChoice(template="plain").scored()] == [
        ("letter", "plain", "letter/plain"),
        ("cloze", "plain", "cloze/plain"),
    ]
    assert MultipleChoice("letter").scored() == [
        MultipleChoice("letter")
    ] and fmt.trained() == MultipleChoice("cloze")
    assert MultipleChoice("letter").trained() == MultipleChoice("letter")
    with pytest.raises(
        ValueError, match="mc.protocol='letters' is invalid: expected one of auto, letter, cloze"
    ):
        MultipleChoice("letters")
    with pytest.raises(ValueError, match="one protocol at a time"):
        request(None, Q, fmt)


def test_plain_template_trains_on_the_answer_only(tok):
    ex = encode(tok, training_record(Q, MultipleChoice("letter", "plain")))
    assert tok.decode([t for t in ex.labels if t != IGNORE]) == " B"
    assert tok.decode(ex.input_ids).endswith("Answer: B")
