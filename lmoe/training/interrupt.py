"""SIGINT (Ctrl-C) and SIGTERM during `lmoe train`: the steps done are kept, and no traceback.

While the steps run, a signal only sets a flag; the loop folds it into the all-reduce every step
already does, so all processes stop after the same step, save a checkpoint and the adapter
together, and train() raises TrainingInterrupted (the CLI prints its line and exits 128 + the
signal's number). Before the first step and after the last one (loading, the base and final
evaluations) nothing would be half-saved, so the signal raises TrainingInterrupted at once. A second
Ctrl-C exits at once.
"""

from __future__ import annotations

import shlex
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SIGNALS = (signal.SIGINT, signal.SIGTERM)
# A launcher (torchrun) forwards the Ctrl-C its process group got as well: the workers see one
# Ctrl-C twice within a moment. A second signal counts only after this many seconds.
REPEAT_AFTER_S = 1.0


class TrainingInterrupted(BaseException):  # as KeyboardInterrupt: `except Exception` lets it pass
    """SIGINT or SIGTERM stopped train(). step: the steps done, which a checkpoint and the adapter
    hold (step 0: stopped before the first step, nothing saved). exit_code: 128 + the signal."""

    def __init__(self, signum: int, step: int, steps: int, output_dir: str | Path) -> None:
        self.signum, self.step, self.steps, self.output_dir = signum, step, steps, Path(output_dir)
        super().__init__(self.line())

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def line(self) -> str:
        if self.step == 0:
            return "interrupted before the first step; nothing was saved"
        return (
            f"interrupted at step {self.step} of {self.steps}; resume with: "
            f"lmoe train output_dir={shlex.quote(str(self.output_dir))} --resume"
        )


class Interrupts:
    """Context manager: SIGINT/SIGTERM handlers for one training run (main thread only; the
    previous handlers are restored on exit). In `deferred()` blocks a signal sets `signum`;
    elsewhere it raises TrainingInterrupted at `step` of `steps` (train() keeps them up to date)."""

    def __init__(self, step: int, steps: int, output_dir: str | Path) -> None:
        self.step, self.steps, self.output_dir = step, steps, output_dir
        self.signum: int | None = None
        self.deferring = False
        self._first_at = 0.0
        self._previous: dict = {}

    def __enter__(self) -> "Interrupts":
        if threading.current_thread() is threading.main_thread():  # else Python cannot handle them
            self._previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum: int, frame) -> None:
        if self.signum is None:
            self.signum, self._first_at = signum, time.monotonic()
            if not self.deferring:
                self.raise_if_signalled()
        elif signum == signal.SIGINT and time.monotonic() - self._first_at > REPEAT_AFTER_S:
            self._restore()  # a second Ctrl-C: the previous handler's at once (KeyboardInterrupt)
            signal.raise_signal(signum)

    def raise_if_signalled(self) -> None:
        if self.signum is not None:
            raise TrainingInterrupted(self.signum, self.step, self.steps, self.output_dir)

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """A block in which a signal only sets the flag (the training steps and their saves)."""
        self.deferring = True
        try:
            yield
        finally:
            self.deferring = False
