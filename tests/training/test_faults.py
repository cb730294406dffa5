"""Faults: a run killed with SIGKILL resumes to the same adapter; torn or interrupted checkpoint
writes never load; a full disk is reported and keeps the previous checkpoint; NaN/inf steps are
skipped, then stop the run."""

import errno
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_cli import STEPS, model_and_data, start_cli, steps_logged, train_argv

import lmoe
import lmoe.training.step
from lmoe.cli import main
from lmoe.io import atomic_write, load_state, save_state
from lmoe.training.metrics_log import read_metrics


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return model_and_data(tmp_path_factory.mktemp("faults"))


def test_sigkill_at_a_random_point_then_resume_gives_the_same_adapter(setup, tmp_path):
    main(train_argv(setup, tmp_path / "whole"))
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    kill_at = rng.randint(3, STEPS - 4)  # after the first checkpoint, well before the end
    out = tmp_path / "killed"
    proc = start_cli(train_argv(setup, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while steps_logged(out) < kill_at and proc.poll() is None:
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.05))  # land anywhere in a step, a checkpoint write included
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before the kill (seed {seed})"
    assert (out / "checkpoint.pt").is_file() and not (out / "adapter").exists()
    main(train_argv(setup, out) + ["--resume"])

    assert [r["step"] for r in read_metrics(out)] == list(range(1, STEPS + 1))
    whole = load_file(str(tmp_path / "whole" / "adapter" / "adapter_model.safetensors"))
    resumed = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert whole.keys() == resumed.keys()
    for key in whole:
        torch.testing.assert_close(
            resumed[key],
            whole[key],
            rtol=1e-5,
            atol=1e-6,
            msg=lambda m, key=key: f"{key} (seed {seed}, killed after step {kill_at}): {m}",
        )


def test_a_torn_checkpoint_never_loads_and_an_interrupted_write_keeps_the_old_one(tmp_path):
    path = tmp_path / "checkpoint.pt"
    blob = {"adapter": {"w": torch.randn(64, 64)}, "state": {"step": 3}}
    save_state(path, blob)
    good = path.read_bytes()
    for cut in (20, 80, len(good) // 2, len(good) - 1):  # a write torn at any point
        path.write_bytes(good[:cut])
        with pytest.raises(ValueError, match="fails its checksum|corrupt or truncated"):
            load_state(path)
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0x10
    path.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="fails its checksum"):
        load_state(path)

    path.write_bytes(good)

    def half_then_die(tmp):
        Path(tmp).write_bytes(good[: len(good) // 2])
        raise KeyboardInterrupt  # the process is stopped half-way through the write

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, half_then_die)
    assert load_state(path)["state"] == {"step": 3}
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temp file left behind


def test_a_temp_file_left_by_a_killed_writer_is_removed_by_the_next_write(tmp_path):
    path = tmp_path / "checkpoint.pt"
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a process id that no longer runs
    orphan = tmp_path / f".checkpoint.pt.{gone.pid}.abc123.tmp"
    live = tmp_path / f".checkpoint.pt.{os.getpid()}.def456.tmp"  # another write in progress
    orphan.write_bytes(b"half a checkpoint")
    live.write_bytes(b"being written")
    save_state(path, {"state": {"step": 1}})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["checkpoint.pt", live.name])
    assert load_state(path)["state"] == {"step": 1}


def error_line(capsys) -> str:
    """The CLI's message: the last stderr line, after the progress bar it may
    share the line with."""
    line = capsys.readouterr().err.splitlines()[-1]
    return line[line.index("lmoe train: error: ") :]


def test_disk_full_is_reported_and_keeps_the_previous_checkpoint(
    setup, tmp_path, capsys, monkeypatch
):
    real_fsync, calls = os.fsync, []

    def fsync(fd):
        if ".checkpoint.pt." in os.readlink(f"/proc/self/fd/{fd}"):  # a checkpoint's temp file
            calls.append(fd)
            if len(calls) == 2:  # the second checkpoint (step 2) hits a full disk
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_:
        main(train_argv(setup, out, "steps=4", "save_every=1"))
    line = error_line(capsys)
    assert exit_.value.code == 2
    assert line.startswith(
        f"lmoe train: error: Could not write {out / 'checkpoint.pt'} (No space left on device); "
        "the previous file is kept. Free disk space (or fix permissions) and run again."
    )
    assert load_state(out / "checkpoint.pt")["state"]["step"] == 1
    assert [p.name for p in out.glob(".*.tmp")] == []


def nan_aux_from(step: int, until: int, monkeypatch) -> None:
    """Make the aux loss NaN (through the graph, so the router gradients are NaN too) on
    steps [step, until)."""
    real, calls = lmoe.training.step.aux_loss, []

    def aux_loss(model):
        calls.append(1)
        value = real(model)
        return value * float("nan") if step <= len(calls) < until else value

    monkeypatch.setattr(lmoe.training.step, "aux_loss", aux_loss)


def test_a_nan_step_is_skipped_and_counted(setup, tmp_path, caplog, monkeypatch):
    nan_aux_from(3, 4, monkeypatch)
    out = tmp_path / "run"
    main(train_argv(setup, out, "steps=5", "save_every=1", "max_bad_steps=2"))
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert math.isnan(rows[2]["loss"]) and all(
        math.isfinite(r["loss"]) for i, r in enumerate(rows) if i != 2
    )
    assert (
        "step 3 skipped: the loss or gradient is NaN/inf (1 in a row, 1 in this run)" in caplog.text
    )
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert all(torch.isfinite(t).all() for t in adapter.values())


def test_consecutive_nan_steps_stop_the_run_and_keep_the_last_good_checkpoint(
    setup, tmp_path, capsys, monkeypatch
):
    nan_aux_from(3, STEPS, monkeypatch)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_:
        main(train_argv(setup, out, "steps=8", "save_every=1", "max_bad_steps=3"))
    line = error_line(capsys)
    assert exit_.value.code == 2
    assert line == (
        "lmoe train: error: Training stopped at step 5: the loss or gradient was NaN/inf for 3 "
        f"steps in a row (max_bad_steps=3); the last good checkpoint {out / 'checkpoint.pt'} is "
        "kept. Lower lr, check the data, or use precision=no, then train again (--resume "
        "continues from the checkpoint)."
    )
    checkpoint = load_state(out / "checkpoint.pt")
    assert checkpoint["state"]["step"] == 2
    assert all(torch.isfinite(t).all() for t in checkpoint["adapter"].values())
    assert not (out / "adapter").exists()
