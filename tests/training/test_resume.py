"""`lmoe train output_dir=DIR --resume` continues the run saved in DIR: its own config, whatever the
defaults; only resume.RESUMABLE's keys may change, anything else is refused before a file is
touched."""

import re

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny import write_jsonl
from train_cli import STEPS, model_and_data, train_argv

import lmoe.training.loop
from lmoe.cli import main
from lmoe.io import load_state
from lmoe.training.config import TrainConfig
from lmoe.training.loop import train, warmup_cosine
from lmoe.training.metrics_log import MetricsLog, read_metrics
from lmoe.training.resume import RESUMABLE

COMPARED = (
    "loss",
    "lm_loss",
    "aux_loss",
    "load_balance",
    "active_experts",
    "lr",
    "grad_norm",
    "tokens",
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return model_and_data(tmp_path_factory.mktemp("resume"))


@pytest.fixture(scope="module")
def finished(setup, tmp_path_factory):
    """A finished 4-step run (checkpoints at 2 and 4)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    main(train_argv(setup, out, "steps=4"))
    return out


def snapshot(directory) -> dict:
    """Every file under directory: its bytes and modification time."""
    return {
        p.relative_to(directory): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def refused(argv, capsys) -> str:
    """Run the CLI, expect a user error (exit 2, no traceback) and return its one line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    return err.splitlines()[-1]


def test_resume_with_only_the_output_dir_continues_the_saved_run(setup, tmp_path, monkeypatch):
    """The reported case: a run on its own data, stopped, then `--resume` with nothing but
    output_dir. It continues on that data for that many steps, and ends as the uninterrupted run."""
    main(train_argv(setup, tmp_path / "whole"))
    straight = read_metrics(tmp_path / "whole")

    class Crash(Exception):
        pass

    real_write = MetricsLog.write

    def crash_after_5(log, row):
        real_write(log, row)
        if row["step"] == 5:
            raise Crash  # the process dies after step 5; the last checkpoint is step 4

    monkeypatch.setattr(MetricsLog, "write", crash_after_5)
    split = tmp_path / "split"
    with pytest.raises(Crash):
        main(train_argv(setup, split))
    monkeypatch.setattr(MetricsLog, "write", real_write)
    saved = (split / "train_config.yaml").read_text()
    main(["train", f"output_dir={split}", "--resume"])

    resumed = read_metrics(split)
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))  # each step once
    for a, b in zip(straight, resumed, strict=True):
        for key in COMPARED:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-9), (a["step"], key)
    assert (split / "train_config.yaml").read_text() == saved  # nothing changed: written as it was
    whole = load_file(str(tmp_path / "whole" / "adapter" / "adapter_model.safetensors"))
    final = load_file(str(split / "adapter" / "adapter_model.safetensors"))
    for key in whole:
        torch.testing.assert_close(final[key], whole[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize(
    "change,named",
    [
        ("data", "data=['{data}'] there, ['{other}'] here"),
        ("lr=0.02", "lr=0.01 there, 0.02 here"),
        ("lmoe.rank=4", "lmoe.rank=2 there, 4 here"),
        ("seed=1", "seed=0 there, 1 here"),
    ],
)
def test_resume_with_another_setting_is_refused_and_touches_nothing(
    setup, finished, tmp_path, capsys, change, named
):
    rows = [{"prompt": "hello there", "completion": "the cat"}] * 8
    other = write_jsonl(tmp_path / "other.jsonl", rows)
    change = f"data=[{other}]" if change == "data" else change
    before = snapshot(finished)
    line = refused(["train", f"output_dir={finished}", change, "--resume"], capsys)
    named = named.format(data=setup[1], other=other)
    assert line.startswith(
        f"lmoe train: error: --resume: {named}: the run in {finished} "
        "(train_config.yaml) cannot continue with another value."
    )
    assert line.endswith("or train into a new output_dir.")
    assert snapshot(finished) == before  # every file as it was, contents and times


def test_resume_from_python_refuses_another_lr_before_loading_anything(finished, monkeypatch):
    def no_loading(*args, **kw):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(lmoe.training.loop, "load_model", no_loading)
    cfg = TrainConfig.from_file(finished / "train_config.yaml", ["lr=0.05", "steps=6"])
    with pytest.raises(ValueError, match=re.escape("lr=0.01 there, 0.05 here")):
        train(cfg, resume=True)


def test_resume_with_more_steps_continues_and_saves_only_those_changes(setup, tmp_path, capsys):
    out = tmp_path / "run"
    main(train_argv(setup, out, "steps=4"))
    before = yaml.safe_load((out / "train_config.yaml").read_text())
    main(
        [
            "train",
            f"output_dir={out}",
            "steps=6",
            "eval_every=2",
            f"eval_data=[{setup[1]}]",
            "--resume",
        ]
    )
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    # the held-out loss from the resumed steps on, every 2nd
    assert [r["eval_loss"] != "" for r in rows] == [False, False, False, False, False, True]
    # the learning rate follows the 6-step schedule from the checkpoint on (4 steps: ends at 0)
    assert rows[3]["lr"] == pytest.approx(0.01 * warmup_cosine(2, 4)(3))
    for row in rows[4:]:
        expected = 0.01 * warmup_cosine(2, 6)(row["step"] - 1)
        assert row["lr"] > 0 and row["lr"] == pytest.approx(expected)
    after = yaml.safe_load((out / "train_config.yaml").read_text())
    assert {k: (before[k], after[k]) for k in before if before[k] != after[k]} == {
        "steps": (4, 6),
        "eval_every": (0, 2),
        "eval_data": ([], [str(setup[1])]),
    }
    assert load_state(out / "checkpoint.pt")["state"]["step"] == 6  # the last step saves one
    assert not list(out.glob(".*.tmp"))
    assert capsys.readouterr().out.splitlines()[-1] == f"lmoe: adapter saved to {out / 'adapter'}"


def test_resume_with_fewer_steps_than_done_is_refused(finished, capsys):
    line = refused(["train", f"output_dir={finished}", "steps=3", "--resume"], capsys)
    assert line.startswith(
        f"lmoe train: error: --resume: steps=3 is below the checkpoint's step 4 "
        f"in {finished}; give steps=4 or more"
    )


def test_resume_without_a_run_says_so_in_one_line_and_creates_nothing(setup, tmp_path, capsys):
    line = refused(["train", f"output_dir={tmp_path / 'none'}", "--resume"], capsys)
    assert line == (
        f"lmoe train: error: --resume: no run to continue in {tmp_path / 'none'} "
        "(train_config.yaml is missing); give the output_dir of the run to continue, "
        "or train without --resume first."
    )
    assert not (tmp_path / "none").exists()
    started = tmp_path / "started"  # stopped before its first checkpoint
    started.mkdir()
    TrainConfig.from_dict({"model": str(setup[0]), "output_dir": str(started)}).save()
    line = refused(["train", f"output_dir={started}", "--resume"], capsys)
    assert line.startswith(
        f"lmoe train: error: --resume: no checkpoint at "
        f"{started / 'checkpoint.pt'}; train without --resume first"
    )
    assert [p.name for p in started.iterdir()] == ["train_config.yaml"]


def test_resume_reads_output_dir_from_the_config_file(finished, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(f"output_dir: {finished}\nlr: 0.5\n")
    line = refused(["train", "--config", str(config), "--resume"], capsys)
    assert "lr=0.01 there, 0.5 here" in line


def test_every_resumable_key_is_a_field():
    fields = TrainConfig().to_dict()
    for key in RESUMABLE:
        section, _, name = key.rpartition(".")
        assert name in (fields[section] if section else fields), key
