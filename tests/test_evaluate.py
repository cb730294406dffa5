"""lmoe.evaluate against hand-computed references: a bigram model whose log-probabilities we know."""
import json
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import lmoe.evaluate as ev
from lmoe.data import Example, encode
from tiny import tiny_tokenizer, write_jsonl


class Bigram(nn.Module):
    """logits[t] = table[input_ids[t]]: next-token log-probs are a fixed table, easy to compute by hand."""

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
    result = ev.perplexity(model, examples, pad_id=0)
    assert result == pytest.approx({"a": 10.0, "b": 10.0})


def test_answer_logprobs_match_a_hand_sum():
    table = torch.randn(6, 6, generator=torch.Generator().manual_seed(0))
    logp = torch.log_softmax(table, -1)
    examples = [Example([1, 2, 3, 4], [-100, -100, 3, 4]), Example([5, 1], [-100, 1])]
    got = ev.answer_logprobs(Bigram(table), examples, pad_id=0, batch_size=2)
    want = [(float(logp[2, 3] + logp[3, 4]), 2), (float(logp[5, 1]), 1)]
    assert [n for _, n in got] == [n for _, n in want]
    assert [s for s, _ in got] == pytest.approx([s for s, _ in want], abs=1e-5)
    ppl = ev.perplexity(Bigram(table), [Example(e.input_ids, e.labels, "d") for e in examples], 0)["d"]
    assert ppl == pytest.approx(math.exp(-(want[0][0] + want[1][0]) / 3), rel=1e-5)


def _choice_score(tok, table, question, choice):
    ex = encode(tok, {"messages": [{"role": "user", "content": question},
                                   {"role": "assistant", "content": choice}], "domain": "mc"})
    logp = torch.log_softmax(table, -1)
    return sum(float(logp[ex.input_ids[t - 1], ex.input_ids[t]]) for t in range(1, len(ex.labels))
               if ex.labels[t] != -100)


def test_multiple_choice_raw_and_length_normalised(tok, tmp_path):
    table = torch.randn(len(tok), len(tok), generator=torch.Generator().manual_seed(1)) * 3
    rows = [{"question": "the cat?", "choices": ["sat", "the mat on the mat", "hello there"], "answer": 1},
            {"question": "What is 12 + 30?", "choices": ["42", "one two three"], "answer": "42"}]
    path = write_jsonl(tmp_path / "mc.jsonl", rows)
    got = ev.evaluate_file(Bigram(table), tok, path)["multiple_choice"]
    acc = acc_norm = 0
    for row in rows:
        gold = row["answer"] if isinstance(row["answer"], int) else row["choices"].index(row["answer"])
        scores = [_choice_score(tok, table, row["question"], c) for c in row["choices"]]
        acc += max(range(len(scores)), key=scores.__getitem__) == gold
        acc_norm += max(range(len(scores)), key=lambda i: scores[i] / len(row["choices"][i])) == gold
    assert got == {"acc": acc / 2, "acc_norm": acc_norm / 2, "n": 2}


def test_bad_multiple_choice_line_names_its_number(tmp_path, tok):
    path = tmp_path / "mc.jsonl"
    path.write_text(json.dumps({"question": "q", "choices": ["a"], "answer": 0}) + "\n"
                    + json.dumps({"question": "q", "choices": ["a", "b"], "answer": 5}) + "\n")
    with pytest.raises(ValueError, match=r"mc.jsonl:2:"):
        ev.read_choice_records(path)


def test_exact_match_per_domain_normalises_case_space_and_full_stop(tok, monkeypatch):
    records = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": a}],
                "answer": a, "domain": d} for a, d in [("42", "add"), ("Forty", "words"), ("b a", "rev"), ("7", "add")]]
    replies = iter([[" 42.", "forty", "a b", "8"]])
    monkeypatch.setattr(ev, "generate", lambda *args, **kwargs: next(replies))
    assert ev.exact_match(None, tok, records) == {"add": 0.5, "words": 1.0, "rev": 0.0}


def test_generate_greedy_matches_step_by_step_argmax(tok):
    from tiny import tiny_llama
    model = tiny_llama(len(tok))
    replies = ev.generate(model, tok, ["the cat", "What is 12 + 30? please"], max_new_tokens=5)
    for prompt, reply in zip(["the cat", "What is 12 + 30? please"], replies):
        ids = tok(ev.render_prompt(tok, [{"role": "user", "content": prompt}]), add_special_tokens=False,
                  return_tensors="pt")["input_ids"]
        new = []
        for _ in range(5):  # unpadded, uncached greedy decoding as the reference
            with torch.no_grad():
                nxt = int(model(torch.cat([ids, torch.tensor([new], dtype=torch.long)], 1)).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            new.append(nxt)
        assert reply == tok.decode(new, skip_special_tokens=True).strip()


def test_format_table_side_by_side():
    table = ev.format_table({"base": {"exact_match": {"add": 0.1}, "perplexity": {"german": 20.0}},
                             "trained": {"exact_match": {"add": 0.9}, "perplexity": {"german": 5.5}}})
    lines = table.splitlines()
    assert lines[0].split() == ["metric", "base", "trained"]
    assert lines[1].split() == ["exact_match", "add", "0.100", "0.900"]
    assert lines[2].split() == ["perplexity", "german", "20.000", "5.500"]
