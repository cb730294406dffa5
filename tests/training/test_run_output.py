"""What a finished `lmoe train` run prints and leaves: one trainable-params line, the adapter's
directory last, no empty eval files; a warning for a run that is all warm-up."""

import json
import logging

import pytest
from train_cli import model_and_data, train_argv
from transformers import AutoModelForCausalLM

from lmoe import load_adapter
from lmoe.cli import main


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return model_and_data(tmp_path_factory.mktemp("output"))


def test_a_run_without_eval_data_names_its_adapter_and_writes_no_empty_results(
    setup, tmp_path, capsys, caplog
):
    caplog.set_level(logging.INFO)
    out = tmp_path / "run"
    # compare_base, but nothing to evaluate: no eval_data, no benchmark, not the built-in mixture
    main(train_argv(setup, out, "steps=2", "warmup_steps=1", "compare_base=true"))
    printed = capsys.readouterr()
    assert (printed.out + printed.err + caplog.text).count("trainable params") == 1
    assert "lmoe: 18 training examples; 14 layers, trainable params" in printed.out
    assert printed.out.splitlines()[-1] == f"lmoe: adapter saved to {out / 'adapter'}"
    written = sorted(p.name for p in out.iterdir())
    assert written == ["adapter", "checkpoint.pt", "metrics.csv", "train_config.yaml"]
    assert "warmup_steps" not in caplog.text

    caplog.clear()  # what generate, analyze and eval do: no trainable-params line of inject's
    load_adapter(AutoModelForCausalLM.from_pretrained(setup[0]), out / "adapter")
    assert "trainable params" not in caplog.text


def test_a_run_that_is_all_warm_up_is_warned_about(setup, tmp_path, caplog):
    main(train_argv(setup, tmp_path / "run", "steps=2", "warmup_steps=2", "save_every=0"))
    (warning,) = [r for r in caplog.records if "warmup_steps" in r.getMessage()]
    assert warning.levelno == logging.WARNING
    assert warning.getMessage() == (
        "lmoe: warmup_steps=2 >= steps=2: the learning rate rises for the whole run and never "
        "decays; set warmup_steps below steps (e.g. warmup_steps=0)."
    )


def test_a_question_too_long_to_score_stops_the_run_before_it_trains(setup, tmp_path, capsys):
    questions = tmp_path / "mc.jsonl"
    long_choice = " ".join(["word"] * 80)
    rows = [{"question": "Pick one", "choices": ["cat", long_choice], "answer": 0}]
    questions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    argv = train_argv(setup, out, f"eval_data=[{questions}]", "max_length=48")
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the model's loading bar
    assert err.startswith("lmoe train: error: ") and "mc.jsonl" in err
    assert "leaves no room for the question within max_length=48" in err
    assert not out.exists()  # stopped before the first step: nothing trained, nothing written
    main([*argv[:-1], "max_length=256", "steps=1", "warmup_steps=0"])  # it fits: the run trains
    assert (out / "adapter").is_dir()
    # lmoe eval: checked before the first file is scored (the sums come first in data)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["eval", f"model={setup[0]}", f"data=[{setup[1]}, {questions}]", "max_length=48"])
    printed = capsys.readouterr()
    assert "leaves no room for the question within max_length=48" in printed.err
    assert "exact match" not in printed.out + printed.err  # nothing was scored
