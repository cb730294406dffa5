"""The layer of two commits in one process, same weights, timed in alternating rounds (median):
the check that moving the execution paths to lmoe/kernels/ changed neither outputs nor speed.
Decode: 1 token, no grad, eval mode; train: 1024 tokens forward + backward. Each commit's lmoe/ is
unpacked as a package of its own (an empty __init__; the layer's imports are relative).

    .venv/bin/python bench/kernels_before_after.py 325a174 b9ba6e9 15   # before, after, rounds
"""

import importlib
import statistics as st
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn


def unpack(rev: str, name: str, root: Path) -> None:
    subprocess.run(f"git archive {rev} lmoe | tar -x -C {root}", shell=True, check=True)
    (root / "lmoe").rename(root / name)
    (root / name / "__init__.py").write_text("")


if len(sys.argv) < 3 or "--help" in sys.argv:
    print(__doc__)
    sys.exit(0 if "--help" in sys.argv else 2)
tmp = Path(tempfile.mkdtemp())
unpack(sys.argv[1], "lmoe_before", tmp)
unpack(sys.argv[2], "lmoe_after", tmp)
sys.path.insert(0, str(tmp))
B, BC = (importlib.import_module(f"lmoe_before.{m}") for m in ("layer", "config"))
A, AC = (importlib.import_module(f"lmoe_after.{m}") for m in ("layer", "config"))

torch.set_num_threads(1)
ROUNDS, d = int(sys.argv[3]) if len(sys.argv) > 3 else 15, 576
out = []
for router, k in (("softmax", None), ("topk", 2), ("dynamic", None)):
    for comp in ("params", "outputs"):
        for E in (4, 64):
            torch.manual_seed(0)
            base = nn.Linear(d, d)
            kw = dict(
                num_experts=E,
                rank=8,
                alpha=16,
                router=router,
                composition=comp,
                target_modules="all-linear",
                **({"top_k": k} if k else {}),
            )
            b = B.MoLoRALinear(base, BC.LMoEConfig(**kw))
            a = A.MoLoRALinear(base, AC.LMoEConfig(**kw, router_param_scale=1))
            nn.init.normal_(b.lora_B, std=0.02)
            a.load_state_dict(b.state_dict())
            for mode, tokens in (("decode", 1), ("train", 1024)):
                x = torch.randn(1, tokens, d)
                for m in (a, b):
                    m.train(mode == "train")

                def call(m, mode=mode, x=x):
                    if mode == "decode":
                        with torch.no_grad():
                            return m(x)
                    xx = x.clone().requires_grad_(True)
                    y = m(xx)
                    y.square().mean().backward()
                    return y.detach()

                ya, yb = call(a), call(b)
                err = ((ya - yb).abs().max() / yb.abs().max()).item()
                calls = 200 if mode == "decode" else 3
                times = {"before": [], "after": []}
                for r in range(ROUNDS):
                    for name, m in (
                        (("before", b), ("after", a)) if r % 2 else (("after", a), ("before", b))
                    ):
                        t = time.perf_counter()
                        for _ in range(calls):
                            call(m)
                        times[name].append((time.perf_counter() - t) / calls)
                mb, ma = st.median(times["before"]), st.median(times["after"])
                row = dict(
                    router=router,
                    composition=comp,
                    E=E,
                    mode=mode,
                    before_us=mb * 1e6,
                    after_us=ma * 1e6,
                    after_over_before=ma / mb,
                    max_rel_diff=err,
                )
                out.append(row)
                print(
                    f"{router:8s} {comp:8s} E={E:3d} {mode:6s} before {mb * 1e6:9.1f} us"
                    f"  after {ma * 1e6:9.1f} us"
                    f"  after/before {ma / mb:5.3f}  max rel diff {err:.1e}",
                    flush=True,
                )
r = [o["after_over_before"] for o in out]
print("median after/before %.3f, range %.3f-%.3f, n=%d" % (st.median(r), min(r), max(r), len(r)))
