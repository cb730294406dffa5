"""Progress of the long evaluation phases, on stderr: a tqdm bar with counts where stderr is a
terminal; elsewhere (a run piped to a file) a line when a phase starts, one a minute while it runs
and one when it ends, so that a long evaluation never looks hung."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from tqdm.auto import tqdm

LINE_EVERY_S = 60.0  # without a terminal: at most one progress line this often


@contextmanager
def phase(
    desc: str, total: int, unit: str, enabled: bool = True
) -> Iterator[Callable[[int], None]]:
    """Yields update(n): n more of `total` done.

    Args:
        desc: names the phase (e.g. "exact match").
        unit: what is counted (e.g. "prompt").
        enabled: False shows nothing.
    """
    if not enabled:
        yield lambda n: None
        return
    if sys.stderr.isatty():
        with tqdm(total=total, desc=desc, unit=unit, leave=False, file=sys.stderr) as bar:
            yield bar.update
        return
    start = last = time.monotonic()
    done = 0
    units = unit + ("es" if unit.endswith(("ch", "sh", "s", "x")) else "s")
    _line(f"{desc}: {total} {units} ...")

    def update(n: int) -> None:
        nonlocal done, last
        done += n
        if time.monotonic() - last >= LINE_EVERY_S:
            last = time.monotonic()
            _line(f"{desc}: {done}/{total} {units}, {last - start:.0f} s")

    yield update
    _line(f"{desc}: {total} {units} in {time.monotonic() - start:.0f} s")


def announce(text: str) -> None:
    """One line on stderr (where the progress goes), e.g. which model is being evaluated."""
    _line(text)


def _line(text: str) -> None:
    print(f"lmoe: {text}", file=sys.stderr, flush=True)
