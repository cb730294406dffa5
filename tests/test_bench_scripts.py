"""Every script in bench/ starts as its docstring says, `.venv/bin/python bench/NAME.py` from the
repository root (the directory on sys.path is then bench/, not the root that
`from bench.common import ...` needs)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(
    p.name
    for p in (ROOT / "bench").glob("*.py")  # the scripts; the rest are their building blocks
    if 'if __name__ == "__main__":' in p.read_text()
)


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_script_runs_as_a_file(script):
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}  # no PYTHONPATH: as a user runs it
    done = subprocess.run(
        [sys.executable, f"bench/{script}", "--help"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout
