"""lmoe.allocator: on glibc, freed memory is kept for reuse (a large tensor comes from the heap, not a fresh
mapping), and `lmoe train` asks for it on a CPU unless keep_freed_memory is false."""
import platform
import subprocess
import sys

import pytest

from lmoe.training.loop import train
from tiny import train_config, tiny_model_dir, write_jsonl

# mallinfo2's hblkhd (bytes in mmap-ed blocks) before and after allocating 64 MiB through torch; run in a fresh
# process, since mallopt changes the whole process
PROBE = """
import ctypes, sys, torch
from lmoe.allocator import keep_freed_memory
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
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
        out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True).stdout
        kept, grown = out.split()
        return kept, int(grown)
    assert mapped("default")[1] >= 64 * 2**20  # glibc's default: a fresh mapping, unmapped when freed
    assert mapped("kept") == ("True", 0)


ROWS = [{"prompt": f"What is {a} + {b}?", "completion": str(a + b)} for a in range(10, 13) for b in range(20, 22)]


@pytest.mark.parametrize("wanted", [True, False])
def test_train_keeps_freed_memory_on_a_cpu_unless_told_not_to(tmp_path, monkeypatch, wanted):
    calls = []
    monkeypatch.setattr("lmoe.training.loop.keep_freed_memory", lambda: calls.append(1) or True)
    setup = tiny_model_dir(tmp_path / "model"), write_jsonl(tmp_path / "sums.jsonl", ROWS)
    train(train_config(setup, tmp_path / "run", steps=1, keep_freed_memory=wanted))
    assert calls == ([1] if wanted else [])
