"""SIGINT and SIGTERM during `lmoe train`: the steps done are saved (checkpoint + adapter), one line
says how to resume, the exit code is 128 + the signal, no traceback; before the first step nothing
is left behind."""

import os
import re
import signal
import subprocess
import time

import pytest
from tiny import train_config
from train_cli import model_and_data, start_cli, steps_logged, train_argv

import lmoe.training.interrupt
import lmoe.training.loop
from lmoe.cli import main
from lmoe.io import load_state
from lmoe.training.interrupt import Interrupts, TrainingInterrupted
from lmoe.training.loop import train
from lmoe.training.metrics_log import read_metrics

LONG = 100_000  # steps: the run cannot finish before the signal lands


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return model_and_data(tmp_path_factory.mktemp("interrupt"))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_mid_run_saves_the_steps_done_and_resume_finishes(setup, tmp_path, sig):
    out = tmp_path / "run"
    proc = start_cli(
        train_argv(setup, out, f"steps={LONG}", "save_every=1000"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        while steps_logged(out) < 2 and proc.poll() is None:
            time.sleep(0.005)
        os.kill(proc.pid, sig)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + sig, stderr[-2000:]
    assert "Traceback" not in stderr
    line = stderr.splitlines()[-1]
    found = re.fullmatch(
        rf"lmoe train: interrupted at step (\d+) of {LONG}; resume with: "
        rf"lmoe train output_dir={re.escape(str(out))} --resume",
        line,
    )
    assert found, line
    step = int(found[1])
    assert step >= 2 and load_state(out / "checkpoint.pt")["state"]["step"] == step
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert stdout.splitlines()[-1] == f"lmoe: adapter saved to {out / 'adapter'}"
    assert [r["step"] for r in read_metrics(out)] == list(range(1, step + 1))
    assert not list(out.glob(".*.tmp"))

    main(["train", f"output_dir={out}", f"steps={step + 2}", "--resume"])
    assert [r["step"] for r in read_metrics(out)] == list(range(1, step + 3))
    assert load_state(out / "checkpoint.pt")["state"]["step"] == step + 2


def test_a_signal_in_the_base_evaluation_stops_at_once_and_leaves_nothing(
    setup, tmp_path, monkeypatch
):
    real = lmoe.training.loop.evaluate_all

    def evaluate_then_signal(*args):
        os.kill(os.getpid(), signal.SIGTERM)  # a real signal, while the base model is scored
        return real(*args)

    monkeypatch.setattr(lmoe.training.loop, "evaluate_all", evaluate_then_signal)
    previous = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "new" / "run"
    with pytest.raises(TrainingInterrupted) as stop:
        train(train_config(setup, out, compare_base=True, eval_data=[str(setup[1])]))
    assert (stop.value.step, stop.value.exit_code) == (0, 143)
    assert str(stop.value) == "interrupted before the first step; nothing was saved"
    assert not (tmp_path / "new").exists()  # nor the parent it created
    assert signal.getsignal(signal.SIGTERM) is previous  # the handlers are restored


def test_the_cli_prints_the_line_for_a_signal_before_the_first_step(
    setup, tmp_path, capsys, monkeypatch
):
    def signal_while_loading(*args, **kw):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)  # the handler runs here
        raise AssertionError("the signal did not stop the run")

    monkeypatch.setattr(lmoe.training.loop, "load_model", signal_while_loading)
    with pytest.raises(SystemExit) as exit_:
        main(train_argv(setup, tmp_path / "run"))
    assert exit_.value.code == 130
    err = capsys.readouterr().err
    line = "lmoe train: interrupted before the first step; nothing was saved"
    assert err.splitlines()[-1] == line
    assert "Traceback" not in err and not (tmp_path / "run").exists()


def test_a_failure_before_the_first_step_keeps_what_the_directory_held(setup, tmp_path, capsys):
    out = tmp_path / "old"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    broken = tmp_path / "broken.jsonl"  # fails in the base model's evaluation, after the start
    broken.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": \n')
    with pytest.raises(SystemExit):
        main(train_argv(setup, out, "compare_base=true", f"eval_data=[{broken}]"))
    assert "broken.jsonl:2: not valid JSON" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "mine"
    for bad in (f"data=[{tmp_path / 'missing.jsonl'}]", f"model={tmp_path / 'no-model'}"):
        with pytest.raises(SystemExit):
            main(train_argv(setup, tmp_path / "fresh", bad))
        assert not (tmp_path / "fresh").exists(), bad


def test_a_second_ctrl_c_goes_to_the_previous_handler_at_once(monkeypatch):
    """The first signal is kept for the end of the step; a second Ctrl-C (not the same one that a
    launcher forwards a moment later) is the previous handler's: for the CLI, KeyboardInterrupt."""
    seen = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: seen.append(signum))
    try:
        with Interrupts(3, 10, "runs/x") as stop, stop.deferred():
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)  # at once: a launcher forwarding the same Ctrl-C
            assert (stop.signum, seen) == (signal.SIGINT, [])
            monkeypatch.setattr(lmoe.training.interrupt, "REPEAT_AFTER_S", 0.0)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
            assert seen == [signal.SIGINT]
            with pytest.raises(
                TrainingInterrupted,
                match="interrupted at step 3 of 10; resume "
                "with: lmoe train output_dir=runs/x "
                "--resume",
            ):
                stop.raise_if_signalled()
    finally:
        signal.signal(signal.SIGINT, previous)
