"""lmoe.allocator: on glibc, freed memory is kept for reuse (a large tensor comes from the heap, not
a fresh mapping); `lmoe train` asks for it where LMOE_KEEP_FREED_MEMORY=1, the
library never by itself."""

import platform
import subprocess
import sys

import pytest
from tiny import tiny_model_dir, train_config, write_jsonl

from lmoe.cli import KEEP_FREED_MEMORY, main
from lmoe.training.loop import train

# mallinfo2's hblkhd (bytes in mmap-ed blocks) before and after allocating 64 MiB through torch; run
# in a fresh process, since mallopt changes the whole process
PROBE = """
import ctypes, sys, torch
from lmoe.allocator import keep_freed_memory
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                 "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
kept = keep_freed_memory() if sys.argv[1] == "kept" else None
before = libc.mallinfo2().hblkhd
t = torch.empty(16 * 2**20)  # 64 MiB
t.fill_(1.0)
print(kept, libc.mallinfo2().hblkhd - before)
"""

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_kept_memory_serves_a_large_tensor_from_the_heap():
    def mapped(mode: str) -> tuple[str, int]:
        out = subprocess.run(
            [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True
        ).stdout
        kept, grown = out.split()
        return kept, int(grown)

    assert (
        mapped("default")[1] >= 64 * 2**20
    )  # glibc's default: a fresh mapping, unmapped when freed
    assert mapped("kept") == ("True", 0)


ROWS = [
    {"prompt": f"What is {a} + {b}?", "completion": str(a + b)}
    for a in range(10, 13)
    for b in range(20, 22)
]


def test_the_library_never_changes_the_allocator(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr("lmoe.allocator.keep_freed_memory", lambda: calls.append(1) or True)
    monkeypatch.setenv(KEEP_FREED_MEMORY, "1")  # read by the command line only
    setup = tiny_model_dir(tmp_path / "model"), write_jsonl(tmp_path / "sums.jsonl", ROWS)
    train(train_config(setup, tmp_path / "run", steps=1))
    assert calls == []


@pytest.mark.parametrize("value", ["1", "0", None])
def test_lmoe_train_keeps_freed_memory_only_when_asked(tmp_path, monkeypatch, value):
    calls = []
    monkeypatch.setattr("lmoe.allocator.keep_freed_memory", lambda: calls.append(1) or True)
    monkeypatch.setattr(
        "lmoe.training.loop.train", lambda cfg, resume=False: None
    )  # the call is before
    if value is None:
        monkeypatch.delenv(KEEP_FREED_MEMORY, raising=False)
    else:
        monkeypatch.setenv(KEEP_FREED_MEMORY, value)
    main(["train", f"output_dir={tmp_path / 'run'}"])
    assert calls == ([1] if value == "1" else [])
