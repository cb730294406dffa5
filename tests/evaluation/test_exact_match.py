"""Exact match on the tiny model: batched greedy replies against one-by-one decoding, batched
perplexity against single sequences, exact match of a user's prompt/completion file computed by
hand, grouping by a key the user names, and the progress lines a run without a terminal prints."""

import json
import math

import pytest
import torch
from tiny import tiny_llama, tiny_model_dir, tiny_tokenizer, write_jsonl

import lmoe.evaluation.logprobs as lp
import lmoe.evaluation.scoring as ev
from lmoe.cli import main
from lmoe.data.encoding import encode, render_prompt
from lmoe.evaluation.generation import greedy_replies
from lmoe.training.config import TrainConfig
from lmoe.training.evaluation import evaluate_all

PROMPTS = [
    "the cat",
    "What is 12 + 30? please",
    "hello there, how are you? one two three",
    "sat",
    "Reverse the order of these words: apple river stone",
    "one two",
    "the mat on the mat",
    "five six",
]
LONGEST = 24  # max_answer_tokens of the own file's tests


def reference_reply(model, tok, prompt: str, budget: int) -> tuple[list[int], bool]:
    """Greedy decoding of one prompt, unpadded and uncached: (new token ids, ended by eos?)."""
    ids = tok(
        render_prompt(tok, [{"role": "user", "content": prompt}]),
        add_special_tokens=False,
        return_tensors="pt",
    )["input_ids"]
    new = []
    while len(new) < budget:
        with torch.no_grad():
            logits = model(torch.cat([ids, torch.tensor([new], dtype=torch.long)], 1)).logits
        token = int(logits[0, -1].argmax())
        if token == tok.eos_token_id:
            return new, True
        new.append(token)
    return new, False


@pytest.fixture(scope="module")
def stopping():
    """A tiny model whose greedy replies to some PROMPTS end with the end-of-turn token soon."""
    tok = tiny_tokenizer()
    return tiny_llama(len(tok), seed=2), tok


@pytest.mark.parametrize("batch_size,batch_tokens", [(1, 8192), (3, 8192), (64, 8192), (64, 60)])
def test_batched_greedy_replies_equal_one_by_one_decoding(stopping, batch_size, batch_tokens):
    model, tok = stopping
    budgets = [3, 9, 6, 12, 1, 7, 12, 5]
    prompts = [[{"role": "user", "content": p}] for p in PROMPTS]
    got = greedy_replies(
        model, tok, prompts, budgets, batch_size, show=False, batch_tokens=batch_tokens
    )  # 60 tokens: batches of 1 to 3 prompts
    want = [reference_reply(model, tok, p, b) for p, b in zip(PROMPTS, budgets, strict=True)]
    assert got == [tok.decode(ids, skip_special_tokens=True).strip() for ids, _ in want]
    ended = [by_eos for _, by_eos in want]
    assert any(ended) and not all(ended)  # both ways of stopping are taken
    assert len({len(ids) for ids, _ in want}) > 2  # rows leave the batch at different steps


def test_batched_perplexity_equals_each_sequence_alone():
    tok = tiny_tokenizer()
    model = tiny_llama(len(tok), seed=4)
    records = [
        {
            "messages": [{"role": "user", "content": p}, {"role": "assistant", "content": a}],
            "domain": d,
        }
        for p, a, d in zip(PROMPTS, reversed(PROMPTS), "abababab", strict=True)
    ]
    examples = [encode(tok, r) for r in records + [{"text": "the cat sat", "domain": "a"}]]
    batched = lp.answer_logprobs(model, examples, tok.pad_token_id, batch_size=4)
    alone = [lp.answer_logprobs(model, [ex], tok.pad_token_id)[0] for ex in examples]
    counts = [sum(t != -100 for t in ex.labels[1:]) for ex in examples]
    assert [n for _, n in batched] == [n for _, n in alone] == counts
    torch.testing.assert_close(
        torch.tensor([s for s, _ in batched]),
        torch.tensor([s for s, _ in alone]),
        rtol=1e-5,
        atol=1e-4,
    )
    # one sequence against a float64 forward of it
    for ex, (logprob, _) in zip(examples, alone, strict=True):
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ex.input_ids])).logits[0].double(), -1)
        want = sum(
            float(logp[t - 1, ex.input_ids[t]])
            for t in range(1, len(ex.labels))
            if ex.labels[t] != -100
        )
        assert logprob == pytest.approx(want, abs=1e-4)


def own_file(tmp_path, model, tok):
    """Rows whose completion is the model's greedy reply (right) or not (wrong), keyed by "skill";
    one answer too long for max_answer_tokens=LONGEST. Returns the path and the exact match by
    skill, by hand."""
    replies = {}
    for prompt in PROMPTS[1], PROMPTS[2], PROMPTS[5]:
        ids, by_eos = reference_reply(model, tok, prompt, 20)
        replies[prompt] = tok.decode(ids, skip_special_tokens=True).strip()
        budget = len(tok(replies[prompt], add_special_tokens=False)["input_ids"]) + ev.EM_SLACK
        assert by_eos and replies[prompt] and len(ids) < budget  # ends within the budget
    rows = [
        {"prompt": PROMPTS[1], "completion": replies[PROMPTS[1]], "skill": "x", "domain": "d"},
        {
            "prompt": PROMPTS[5],
            "completion": replies[PROMPTS[5]] + " and more",
            "skill": "x",
            "domain": "d",
        },
        {
            "prompt": PROMPTS[2],
            "completion": replies[PROMPTS[2]].upper() + ".",
            "skill": "y",
            "domain": "d",
        },
        {
            "prompt": PROMPTS[3],
            "completion": "one two three four five six seven " * 5,
            "skill": "y",
        },
    ]
    lengths = [len(tok(r["completion"], add_special_tokens=False)["input_ids"]) for r in rows]
    assert max(lengths[:3]) <= LONGEST < lengths[3]
    return write_jsonl(tmp_path / "own.jsonl", rows), {"x": 1 / 2, "y": 1 / 1}


def test_own_file_gets_exact_match_by_a_key_the_user_names(stopping, tmp_path, caplog):
    model, tok = stopping
    path, by_hand = own_file(tmp_path, model, tok)
    with caplog.at_level("WARNING"):
        got = ev.evaluate_file(model, tok, path, group="skill", max_answer_tokens=LONGEST)
    assert got["exact_match"] == pytest.approx(by_hand)
    assert set(got["perplexity"]) == {"x", "y"}
    (line,) = [r.getMessage() for r in caplog.records if "perplexity only" in r.getMessage()]
    assert f"1 of 4 answers are longer than {LONGEST} tokens" in line
    by_domain = ev.evaluate_file(model, tok, path, max_answer_tokens=LONGEST)  # the default
    assert set(by_domain["exact_match"]) == {"d"}
    assert set(by_domain["perplexity"]) == {"d", "own"}  # "domain", else the file name
    assert "exact_match" not in ev.evaluate_file(model, tok, path, max_answer_tokens=0)
    cfg = TrainConfig(
        data=[str(path)], eval_data=[str(path)], eval_group="skill", eval_max_answer_tokens=LONGEST
    )
    assert evaluate_all(model, tok, cfg)["exact_match:own"] == pytest.approx(by_hand)  # train's


def test_a_row_without_the_group_key_is_one_error_naming_it(tmp_path):
    tok = tiny_tokenizer()
    path = write_jsonl(
        tmp_path / "own.jsonl",
        [{"prompt": "a", "completion": "b", "skill": "x"}, {"prompt": "a", "completion": "b"}],
    )
    with pytest.raises(ValueError, match=r"own.jsonl:2: no 'skill' key to group by"):
        ev.evaluate_file(tiny_llama(len(tok)), tok, path, group="skill")


def test_cli_eval_groups_by_key_and_shows_progress_without_a_terminal(tmp_path, capsys):
    model = tiny_model_dir(tmp_path / "model")
    path = write_jsonl(
        tmp_path / "own.jsonl",
        [
            {"prompt": p, "completion": "sat", "skill": s}
            for p, s in zip(PROMPTS, "xyxyxyxy", strict=True)
        ],
    )
    main(["eval", f"model={model}", f"data=[{path}]", "group=skill", f"json={tmp_path / 'r.json'}"])
    results = json.loads((tmp_path / "r.json").read_text())
    assert set(results["exact_match:own"]) == set(results["perplexity:own"]) == {"x", "y"}
    assert all(math.isfinite(v) for v in results["perplexity:own"].values())
    out, err = capsys.readouterr()
    assert "exact_match:own x" in out and "perplexity:own y" in out
    assert "lmoe: exact match: 8 prompts ..." in err and "lmoe: perplexity: 8 examples in" in err
    with pytest.raises(SystemExit):
        main(["eval", f"model={model}", "group=skill"])
    assert "group=skill groups the rows of data files" in capsys.readouterr().err


def test_version(capsys):
    from lmoe.version import __version__

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"lmoe {__version__}"
