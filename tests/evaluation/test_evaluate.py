"""lmoe.evaluation.scoring against hand-computed references: a bigram model whose
log-probabilities we know."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
from tiny import tiny_llama, tiny_tokenizer, write_jsonl
from torch import nn

import lmoe.evaluation.logprobs as lp
import lmoe.evaluation.multiple_choice as mcs
import lmoe.evaluation.scoring as ev
from lmoe.data.choices import MultipleChoice, letter_prompt, requests
from lmoe.data.encoding import Example, encode, render_prompt
from lmoe.data.records import read_records


class Bigram(nn.Module):
    """logits[t] = table[input_ids[t]]: next-token log-probs are a fixed table, easy
    to compute by hand."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = nn.Parameter(table)

    def forward(self, input_ids, attention_mask=None, **_):
        return SimpleNamespace(logits=self.table[input_ids])


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_uniform_model_has_perplexity_vocab_size():
    model = Bigram(torch.zeros(10, 10))
    examples = [Example([1, 2, 3], [-100, 2, 3], "a"), Example([4, 5], [-100, 5], "b")]
    result = lp.perplexity(model, examples, pad_id=0)
    assert result == pytest.approx({"a": 10.0, "b": 10.0})


def test_answer_logprobs_match_a_hand_sum():
    table = torch.randn(6, 6, generator=torch.Generator().manual_seed(0))
    logp = torch.log_softmax(table, -1)
    examples = [Example([1, 2, 3, 4], [-100, -100, 3, 4]), Example([5, 1], [-100, 1])]
    got = lp.answer_logprobs(Bigram(table), examples, pad_id=0, batch_size=2)
    want = [(float(logp[2, 3] + logp[3, 4]), 2), (float(logp[5, 1]), 1)]
    assert [n for _, n in got] == [n for _, n in want]
    assert [s for s, _ in got] == pytest.approx([s for s, _ in want], abs=1e-5)
    ppl = lp.perplexity(Bigram(table), [Example(e.input_ids, e.labels, "d") for e in examples], 0)[
        "d"
    ]
    assert ppl == pytest.approx(math.exp(-(want[0][0] + want[1][0]) / 3), rel=1e-5)


def _choice_score(tok, table, question, choice):
    ex = encode(
        tok,
        {
            "messages": [
                {"role": "user", "content": question},
                {"role": "assistant", "content": choice},
            ],
            "domain": "mc",
        },
    )
    logp = torch.log_softmax(table, -1)
    return sum(
        float(logp[ex.input_ids[t - 1], ex.input_ids[t]])
        for t in range(1, len(ex.labels))
        if ex.labels[t] != -100
    )


def test_multiple_choice_raw_and_length_normalised(tok, tmp_path):
    table = torch.randn(len(tok), len(tok), generator=torch.Generator().manual_seed(1)) * 3
    rows = [
        {
            "question": "the cat?",
            "choices": ["sat", "the mat on the mat", "hello there"],
            "answer": 1,
        },
        {"question": "What is 12 + 30?", "choices": ["42", "one two three"], "answer": "42"},
    ]
    path = write_jsonl(tmp_path / "mc.jsonl", rows)
    got = ev.evaluate_file(Bigram(table), tok, path, fmt=MultipleChoice("cloze", "chat"))[
        "multiple_choice"
    ]
    acc = acc_norm = 0
    for row in rows:
        gold = (
            row["answer"] if isinstance(row["answer"], int) else row["choices"].index(row["answer"])
        )
        scores = [_choice_score(tok, table, row["question"], c) for c in row["choices"]]
        acc += max(range(len(scores)), key=scores.__getitem__) == gold
        acc_norm += (
            max(range(len(scores)), key=lambda i: scores[i] / len(row["choices"][i])) == gold
        )
    assert got == {
        "n": 2,
        "chance": (1 / 3 + 1 / 2) / 2,
        "cloze/chat": {
            "protocol": "cloze",
            "template": "chat",
            "acc": acc / 2,
            "acc_norm": acc_norm / 2,
        },
    }


def test_bad_multiple_choice_line_names_its_number(tmp_path, tok):
    path = tmp_path / "mc.jsonl"
    path.write_text(
        json.dumps({"question": "q", "choices": ["a", "b"], "answer": 0})
        + "\n"
        + json.dumps({"question": "q", "choices": ["a", "b"], "answer": 5})
        + "\n"
    )
    with pytest.raises(ValueError, match=r"mc.jsonl:2:.*out of range"):
        ev.evaluate_file(Bigram(torch.zeros(len(tok), len(tok))), tok, path)


def test_exact_match_per_domain_normalises_case_space_and_full_stop(tok, monkeypatch):
    records = [
        {
            "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": a}],
            "answer": a,
            "domain": d,
        }
        for a, d in [("42", "add"), ("Forty", "words"), ("b a", "rev"), ("7", "add")]
    ]
    budgets = []

    def replies(model, tokenizer, prompts, budget, *args):
        budgets.extend(budget)
        return [" 42.", "forty", "a b", "8"]

    monkeypatch.setattr(ev, "greedy_replies", replies)
    assert ev.exact_match(None, tok, records) == {"add": 0.5, "words": 1.0, "rev": 0.0}
    assert budgets == [
        len(tok(r["answer"], add_special_tokens=False)["input_ids"]) + ev.EM_SLACK for r in records
    ]  # each its own answer's length


def test_generate_greedy_matches_step_by_step_argmax(tok):
    model = tiny_llama(len(tok))
    replies = ev.generate(model, tok, ["the cat", "What is 12 + 30? please"], max_new_tokens=5)
    for prompt, reply in zip(["the cat", "What is 12 + 30? please"], replies, strict=True):
        ids = tok(
            render_prompt(tok, [{"role": "user", "content": prompt}]),
            add_special_tokens=False,
            return_tensors="pt",
        )["input_ids"]
        new = []
        for _ in range(5):  # unpadded, uncached greedy decoding as the reference
            with torch.no_grad():
                nxt = int(
                    model(torch.cat([ids, torch.tensor([new], dtype=torch.long)], 1))
                    .logits[0, -1]
                    .argmax()
                )
            if nxt == tok.eos_token_id:
                break
            new.append(nxt)
        assert reply == tok.decode(new, skip_special_tokens=True).strip()


def test_format_table_side_by_side():
    mc = {"n": 500, "letter/chat": {"protocol": "letter", "template": "chat", "acc": 0.25}}
    table = ev.format_table(
        {
            "base": {"exact_match": {"add": 0.1}, "perplexity": {"german": 20.0}},
            "trained": {
                "exact_match": {"add": 0.9},
                "perplexity": {"german": 5.5},
                "multiple_choice:mc": mc,
            },
        }
    )
    lines = table.splitlines()
    assert lines[0].split() == ["metric", "base", "trained"]
    assert lines[1].split() == ["exact_match", "add", "0.100", "0.900"]
    assert lines[2].split() == ["perplexity", "german", "20.000", "5.500"]
    assert lines[3].split() == ["multiple_choice:mc", "n", "-", "500"]  # counts as counts
    assert lines[4].split() == [
        "multiple_choice:mc",
        "letter/chat",
        "acc",
        "-",
        "0.250",
    ]  # protocol/template named
    assert len(lines) == 5


# ----------------------------------------------------- multiple choice on a real (tiny) transformer


def _brute_force(model, prefix, continuation):
    """log p(continuation | prefix) from one unpadded, uncached forward of prefix +
    continuation (float64)."""
    ids = torch.tensor([prefix + continuation])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), -1)
    return sum(float(logp[len(prefix) + t - 1, tok_id]) for t, tok_id in enumerate(continuation))


def sharp_llama(vocab: int, seed: int):
    """A tiny Llama with sharp attention (query and key weights x 8), so that a wrong
    position or mask shows."""
    model = tiny_llama(vocab, seed=seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(8)
    return model


QUESTIONS = [
    {
        "question": "the cat sat on" + " the mat" * k,
        "choices": [
            "sat",
            "the mat on the mat",
            "hello there" * (1 + k % 3),
            "one two",
            "What is 12 + 30?",
        ][: 2 + k % 4],
        "gold": k % 2,
        "domain": "mc",
        "where": f"q{k}",
    }
    for k in range(9)
]


@pytest.mark.parametrize(
    "batch_tokens", [1, 120, 100_000]
)  # one question per batch, a few, all at once
@pytest.mark.parametrize(
    "protocol,template",
    [("cloze", "chat"), ("cloze", "plain"), ("letter", "chat"), ("letter", "plain")],
)
def test_prefix_shared_scores_equal_each_sequence_scored_alone(
    tok, protocol, template, batch_tokens
):
    model = sharp_llama(len(tok), seed=3)
    reqs = requests(tok, QUESTIONS, MultipleChoice(protocol, template), max_length=512)
    got = lp.continuation_logprobs(
        model, reqs, tok.pad_token_id, batch_tokens=batch_tokens, progress=False
    )
    want = [[_brute_force(model, prefix, c) for c in conts] for prefix, conts in reqs]
    assert [len(g) for g in got] == [len(q["choices"]) for q in QUESTIONS]
    torch.testing.assert_close(
        torch.tensor(sum(got, []), dtype=torch.float64),
        torch.tensor(sum(want, []), dtype=torch.float64),
        rtol=1e-5,
        atol=1e-5,
    )


def test_letter_accuracy_against_a_loop_over_the_options(tok):
    """The letter picked by one forward of each prompt is the argmax of log p(letter | prompt) over
    options, each option scored by its own forward of the chat prompt followed by that letter."""
    model = tiny_llama(len(tok), seed=5)
    hits = 0
    for q in QUESTIONS:
        scores = []
        for letter in "ABCDE"[: len(q["choices"])]:
            ex = encode(
                tok,
                {
                    "messages": [
                        {"role": "user", "content": letter_prompt(q)},
                        {"role": "assistant", "content": letter},
                    ],
                    "domain": "mc",
                },
            )
            start = ex.labels.index(next(t for t in ex.labels if t != -100))
            scores.append(
                _brute_force(model, ex.input_ids[:start], ex.input_ids[start : start + 1])
            )
        hits += max(range(len(scores)), key=scores.__getitem__) == q["gold"]
    got = mcs.multiple_choice(
        model, tok, QUESTIONS, MultipleChoice("letter", "chat"), progress=False
    )
    chance = sum(1 / len(q["choices"]) for q in QUESTIONS) / len(QUESTIONS)
    assert got == {
        "n": len(QUESTIONS),
        "chance": chance,
        "letter/chat": {"protocol": "letter", "template": "chat", "acc": hits / len(QUESTIONS)},
    }


def test_a_question_longer_than_max_length_is_scored_with_its_prompt_cut_from_the_left(
    tok, tmp_path, caplog
):
    """The ARC-E crash: a long question used to lose its answer to truncation and shift
    every later score."""
    model = tiny_llama(len(tok), seed=1)
    rows = [
        {
            "question": "one two three four five six seven " * 12,
            "choices": ["hello there", "the cat"],
            "answer": 1,
        },
        {"question": "the cat?", "choices": ["sat", "the mat on the mat", "hello"], "answer": 1},
    ]
    fmt = MultipleChoice("cloze", "chat")
    (prefix, conts), (short, short_conts) = requests(
        tok, read_records(write_jsonl(tmp_path / "mc.jsonl", rows)), fmt, max_length=10_000
    )
    assert len(prefix) > 40
    with caplog.at_level("WARNING"):
        got = ev.evaluate_file(model, tok, tmp_path / "mc.jsonl", max_length=40, fmt=fmt)[
            "multiple_choice"
        ]
    assert "1 of 2 multiple-choice prompts" in caplog.text
    longest = max(len(c) for c in conts)
    kept = prefix[-(40 - longest) :]  # the prompt's end, so that the longest choice fits whole
    long_scores = [_brute_force(model, kept, c) for c in conts]
    short_scores = [_brute_force(model, short, c) for c in short_conts]
    acc = [max(range(len(s)), key=s.__getitem__) == 1 for s in (long_scores, short_scores)]
    assert got["n"] == 2 and got["cloze/chat"]["acc"] == sum(acc) / 2


def test_a_choice_longer_than_max_length_is_an_error_naming_the_question(tok, tmp_path):
    rows = [
        {"question": "q", "choices": ["a", "b"], "answer": 0},
        {"question": "q", "choices": ["a", "one two three four five six seven " * 8], "answer": 0},
    ]
    path = write_jsonl(tmp_path / "mc.jsonl", rows)
    with pytest.raises(ValueError, match=r"mc.jsonl:2: a choice is \d+ tokens.*max_length=20"):
        ev.evaluate_file(
            tiny_llama(len(tok)), tok, path, max_length=20, fmt=MultipleChoice("cloze", "chat")
        )


# ----------------------------------------------------- which protocol, and when letter is at chance


def test_auto_scores_both_protocols_as_each_alone(tok):
    model = tiny_llama(len(tok), seed=2)
    got = mcs.multiple_choice(
        model, tok, QUESTIONS, MultipleChoice(), progress=False
    )  # the default: auto
    assert set(got) == {"n", "chance", "letter/chat", "cloze/chat"}
    for protocol in ("letter", "cloze"):
        alone = mcs.multiple_choice(
            model, tok, QUESTIONS, MultipleChoice(protocol, "chat"), progress=False
        )
        assert (
            got[f"{protocol}/chat"] == alone[f"{protocol}/chat"]
            and got[f"{protocol}/chat"]["protocol"] == protocol
        )


@pytest.mark.parametrize(
    "hits,n,p", [(0, 5, 0.25), (3, 5, 0.25), (5, 5, 0.5), (10, 40, 0.25), (17, 40, 0.3)]
)
def test_binomial_tail_against_exact_fractions(hits, n, p):
    from fractions import Fraction

    q = Fraction(p).limit_denominator(100)
    exact = sum(math.comb(n, k) * q**k * (1 - q) ** (n - k) for k in range(hits, n + 1))
    assert mcs.binomial_tail(hits, n, float(q)) == pytest.approx(float(exact), rel=1e-9)


def _scored(letter, cloze, n, chance=0.25):
    return {
        "n": n,
        "chance": chance,
        "letter/chat": {"protocol": "letter", "template": "chat", "acc": letter},
        "cloze/chat": {"protocol": "cloze", "template": "chat", "acc": cloze, "acc_norm": 0.0},
    }


def test_letter_at_chance_needs_letter_within_chance_and_cloze_clearly_above():
    assert (
        mcs.letter_at_chance(_scored(0.25, 0.6, 100))
        == "letter 0.250, cloze 0.600 (chance 0.250, n=100)"
    )
    assert mcs.letter_at_chance(_scored(0.10, 0.6, 100))  # below chance is no skill either
    assert (
        mcs.letter_at_chance(_scored(0.40, 0.6, 100)) is None
    )  # P(>= 40 of 100 | 1/4) < 0.05: letters work
    assert (
        mcs.letter_at_chance(_scored(0.25, 0.33, 100)) is None
    )  # P(>= 33 | 1/4) = 0.04: cloze not clearly above
    assert (
        mcs.letter_at_chance(_scored(0.25, 1.0, 4)) is None
    )  # 4 of 4: P = 0.004, too few questions to tell
    one = _scored(0.25, 0.6, 100)
    del one["cloze/chat"]
    assert mcs.letter_at_chance(one) is None  # one protocol scored: nothing to compare


def _questions_the_model_answers_by_cloze(model, tok, n=40, k=4):
    """n questions of k choices whose gold is the choice the model's cloze scores pick, rotated so
    that the gold stands at every position equally often (cloze scores do not depend on
    the choices' order)."""
    words = [
        "sat",
        "the mat",
        "hello there",
        "one two",
        "apple river",
        "stone",
        "the cat",
        "five six",
        "how are you",
    ]
    base = [
        {
            "question": f"{words[i % 9]} {words[(i * 5) % 9]} {i}?",
            "domain": "mc",
            "where": f"q{i}",
            "choices": [words[(i + j * 2) % 9] + f" {j}" for j in range(k)],
            "gold": 0,
        }
        for i in range(n)
    ]
    scores = lp.continuation_logprobs(
        model,
        requests(tok, base, MultipleChoice("cloze", "chat"), 512),
        tok.pad_token_id,
        progress=False,
    )
    out = []
    for i, (q, s) in enumerate(zip(base, scores, strict=True)):
        best = max(range(k), key=s.__getitem__)
        shift = (best - i % k) % k  # choices[best] moves to position i % k
        out.append({**q, "choices": q["choices"][shift:] + q["choices"][:shift], "gold": i % k})
    return out


def test_warning_fires_when_the_model_prefers_no_letter(tok, caplog, tmp_path):
    model = tiny_llama(len(tok), seed=4)
    letters = requests(tok, [QUESTIONS[3]], MultipleChoice("letter", "chat"), 512)[0][1]
    assert all(len(head) == 1 for head in letters)  # one token per letter
    with (
        torch.no_grad()
    ):  # every letter's logit exactly 0: no letter preferred, the first wins every tie
        model.lm_head.weight[[head[0] for head in letters]] = 0
    questions = _questions_the_model_answers_by_cloze(model, tok)
    path = write_jsonl(
        tmp_path / "mc.jsonl",
        [
            {"question": q["question"], "choices": q["choices"], "answer": q["gold"]}
            for q in questions
        ],
    )
    with caplog.at_level("WARNING"):
        got = ev.evaluate_file(model, tok, path)["multiple_choice"]
    assert got["letter/chat"]["acc"] == 0.25 and got["cloze/chat"]["acc"] == 1.0
    (line,) = [
        r.getMessage()
        for r in caplog.records
        if "letter protocol scores at chance" in r.getMessage()
    ]
    assert f"{path}: letter 0.250, cloze 1.000 (chance 0.250, n=40)" in line and "\n" not in line


def test_no_warning_where_letter_accuracy_is_above_chance(tok, caplog):
    model = tiny_llama(len(tok), seed=4)
    questions = _questions_the_model_answers_by_cloze(model, tok)
    scores = lp.continuation_logprobs(
        model,
        requests(tok, questions, MultipleChoice("letter", "chat"), 512),
        tok.pad_token_id,
        progress=False,
    )
    by_letter = [
        {**q, "gold": max(range(len(s)), key=s.__getitem__)}
        for q, s in zip(questions, scores, strict=True)
    ]
    with caplog.at_level("WARNING"):
        got = mcs.multiple_choice(model, tok, by_letter, progress=False)
        mcs.warn_letter_at_chance({"mc": got})
    assert got["letter/chat"]["acc"] == 1.0
    assert "letter protocol" not in caplog.text
