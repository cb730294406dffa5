"""lmoe.training.loop under torchrun (CPU, gloo, 2 processes): DDP and FSDP against one process on
the whole batch, and resume with a different number of processes. Run as a script, this file is
the torchrun worker."""

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import tiny_model_dir, worker_pythonpath, write_jsonl
from train_cli import steps_logged
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

from lmoe import inject, lmoe_layers, load_adapter
from lmoe.io import load_state
from lmoe.models import load_model
from lmoe.training.config import TrainConfig
from lmoe.training.loop import train
from lmoe.training.metrics_log import read_metrics

# answers of different lengths, so the processes' slices hold different numbers of loss tokens
ROWS = [
    {"prompt": f"Repeat {w} {n} times.", "completion": " ".join([w] * n)}
    for w in ("cat", "mat", "stone")
    for n in range(1, 6)
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    return tiny_model_dir(root / "model"), write_jsonl(root / "rows.jsonl", ROWS), root


def config(setup, out, lmoe: dict | None = None, **kw) -> TrainConfig:
    """The run's TrainConfig; `lmoe` overrides some LMoEConfig fields."""
    model, data, _ = setup
    fields = dict(
        model=str(model),
        data=[str(data)],
        output_dir=str(out),
        steps=4,
        batch_size=4,
        grad_accum=2,
        lr=1e-2,
        warmup_steps=1,
        save_every=2,
        compare_base=False,
        eval_every=2,
        eval_data=[str(data)],
        # the routers at the experts' rate: at lr 1e-2 x 30 the dynamic router's supports flip on
        # float32 rounding differences between 1 and 2 processes, and the runs part ways
        router_lr_scale=1.0,
        lmoe={
            "num_experts": 3,
            "rank": 2,
            "target_modules": "all-linear",
            "dropout": 0.0,
            "load_balance_coef": 0.0,
            "z_loss_coef": 0.0,
            **(lmoe or {}),
        },
    )
    fields.update(kw)
    return TrainConfig.from_dict(fields)


def torchrun(cfg: TrainConfig, resume: bool = False, stop_at: int = 0, wait: bool = True):
    """`lmoe train` in 2 processes (this file as the worker); returns the finished process
    (wait=False: the running one, its output piped)."""
    path = Path(cfg.output_dir + ".json")
    path.write_text(json.dumps(cfg.to_dict()))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": worker_pythonpath(__file__)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--monitor-interval",
        "0.1",
        __file__,
        str(path),
        str(int(resume)),
        str(stop_at),
    ]
    if not wait:
        return subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def reference(setup):
    """One process, batch 4, uninterrupted."""
    return train(config(setup, setup[2] / "one"))


def assert_same_adapter(a: Path, b: Path, atol: float) -> None:
    wa, wb = (
        load_file(str(a / "adapter_model.safetensors")),
        load_file(str(b / "adapter_model.safetensors")),
    )
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-4, atol=atol, msg=key)


def assert_same_metrics(a: Path, b: Path) -> None:
    for ra, rb in zip(read_metrics(a), read_metrics(b), strict=True):
        for key in (
            "step",
            "lm_loss",
            "aux_loss",
            "load_balance",
            "z_loss",
            "sparsity",
            "active_experts",
            "effective_support_size",
            "top_expert_share",
            "eval_loss",
            "lr",
            "grad_norm",
            "tokens",
        ):
            expected = (
                rb[key] if rb[key] == "" else pytest.approx(rb[key], rel=1e-4)
            )  # '': a term not used
            assert ra[key] == expected, (ra["step"], key)


def test_ddp_equals_one_process_on_the_whole_batch(setup, reference):
    cfg = config(setup, setup[2] / "ddp", batch_size=2)
    run = torchrun(cfg)
    assert run.returncode == 0, run.stderr[-3000:]
    assert_same_adapter(reference.adapter_dir, Path(cfg.output_dir) / "adapter", atol=1e-5)
    assert_same_metrics(setup[2] / "one", Path(cfg.output_dir))


# router losses on, examples of different lengths: each process pads its slice to its own length
AUX = {
    "topk": {"router": "topk", "top_k": 2, "load_balance_coef": 0.5, "z_loss_coef": 0.1},
    "dynamic": {
        "router": "dynamic",
        "lambda_hidden": 8,
        "load_balance_coef": 0.5,
        "sparsity_coef": 1.0,
        "sparsity_target": 1,
    },
}


@pytest.mark.parametrize(
    "router,strategy", [("topk", "ddp"), ("dynamic", "ddp"), ("dynamic", "fsdp")]
)
def test_router_losses_in_two_processes_equal_one_process_on_the_whole_batch(
    setup, router, strategy
):
    one = setup[2] / f"one-{router}"
    if not (one / "adapter").is_dir():
        train(config(setup, one, AUX[router], save_every=0))
    # activations recomputed in the 2-process run only: that must change nothing either
    cfg = config(
        setup,
        setup[2] / f"{strategy}-{router}",
        AUX[router],
        batch_size=2,
        save_every=0,
        gradient_checkpointing=True,
        distributed=strategy,
    )
    run = torchrun(cfg)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = read_metrics(one)
    assert all(
        row["load_balance"] > 0 and row["sparsity" if router == "dynamic" else "z_loss"] > 0
        for row in rows
    )
    assert_same_metrics(one, Path(cfg.output_dir))
    assert_same_adapter(one / "adapter", Path(cfg.output_dir) / "adapter", atol=1e-5)


def test_remix_trains_under_ddp(setup):
    """ReMix's router in two processes (each draws its slice's routings: no bitwise reference):
    the run finishes, every step's loss is finite, each token uses k experts, the routers learn."""
    cfg = config(
        setup,
        setup[2] / "ddp-remix",
        {"router": "remix", "top_k": 2, "remix_samples": 2},
        batch_size=2,
        save_every=0,
    )
    run = torchrun(cfg)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = read_metrics(Path(cfg.output_dir))
    assert all(math.isfinite(r["lm_loss"]) and r["active_experts"] == 2 for r in rows)
    weights = load_file(str(Path(cfg.output_dir) / "adapter" / "adapter_model.safetensors"))
    fresh = load_model(str(setup[0]))[0]
    torch.manual_seed(cfg.seed)  # the init train drew
    inject(fresh, cfg.lmoe)
    for name, layer in lmoe_layers(fresh):
        assert not torch.equal(weights[f"{name}.router.weight"], layer.router.weight), name


def test_gpt2_conv1d_under_fsdp_equals_one_process(setup):
    """GPT-2's Conv1D projections (weights stored transposed), sharded per
    GPT2Block, LD-MoLE routing."""
    root = setup[2] / "gpt2"
    tok = AutoTokenizer.from_pretrained(setup[0])
    GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(tok),
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=256,
            resid_pdrop=0,
            embd_pdrop=0,
            attn_pdrop=0,
        )
    ).save_pretrained(root / "model")  # no dropout of its own
    tok.save_pretrained(root / "model")
    gpt2 = (root / "model", setup[1], root)
    aux = {**AUX["dynamic"], "target_modules": ["c_attn", "c_fc"]}
    one = train(config(gpt2, root / "one", aux, save_every=0))
    cfg = config(
        gpt2,
        root / "fsdp",
        aux,
        batch_size=2,
        save_every=0,
        distributed="fsdp",
        gradient_checkpointing=True,
    )
    run = torchrun(cfg)
    assert run.returncode == 0, run.stderr[-3000:]
    assert_same_metrics(root / "one", Path(cfg.output_dir))
    assert_same_adapter(one.adapter_dir, Path(cfg.output_dir) / "adapter", atol=1e-5)


def test_routers_only_from_a_saved_adapter_under_fsdp_equals_one_process(setup):
    """init_adapter + train_experts=false: the frozen experts come from the adapter,
    not from the shards."""
    first = setup[2] / "one-dynamic"
    if not (first / "adapter").is_dir():
        train(config(setup, first, AUX["dynamic"], save_every=0))

    def routers_only(out, **kw):
        fields = config(setup, out, save_every=0, **kw).to_dict()
        del fields["lmoe"]  # the adapter's own mixture applies
        return TrainConfig.from_dict(
            {**fields, "init_adapter": str(first / "adapter"), "train_experts": False}
        )

    one = train(routers_only(setup[2] / "routers-one"))
    cfg = routers_only(setup[2] / "routers-fsdp", batch_size=2, distributed="fsdp")
    run = torchrun(cfg)
    assert run.returncode == 0, run.stderr[-3000:]
    assert_same_metrics(setup[2] / "routers-one", Path(cfg.output_dir))
    assert_same_adapter(one.adapter_dir, Path(cfg.output_dir) / "adapter", atol=1e-5)


def test_fsdp_resume_with_shared_lambda_heads_equals_one_process(setup):
    """LD-MoLE's lambda heads sit under every layer's path: the checkpoint must load back
    into FSDP shards."""
    one = setup[2] / "one-dynamic"
    if not (one / "adapter").is_dir():
        train(config(setup, one, AUX["dynamic"], save_every=0))
    cfg = config(setup, setup[2] / "fsdp-resume", AUX["dynamic"], batch_size=2, distributed="fsdp")
    run = torchrun(cfg, stop_at=3)  # dies after step 3; checkpoint at step 2
    assert run.returncode != 0 and "Interrupt" in run.stderr
    run = torchrun(cfg, resume=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert_same_metrics(one, Path(cfg.output_dir))
    assert_same_adapter(one / "adapter", Path(cfg.output_dir) / "adapter", atol=1e-5)


def test_fsdp_trains_and_saves_an_adapter_that_loads_in_one_process(setup, reference):
    cfg = config(
        setup, setup[2] / "fsdp", batch_size=2, distributed="fsdp", gradient_checkpointing=True
    )
    run = torchrun(cfg)
    assert run.returncode == 0, run.stderr[-3000:]
    adapter = Path(cfg.output_dir) / "adapter"
    assert_same_adapter(reference.adapter_dir, adapter, atol=1e-5)
    base, tokenizer = load_model(cfg.model)
    loaded = load_adapter(base, adapter).eval()
    ids = tokenizer("Repeat cat 3 times.", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(ids).logits, reference.model.eval()(ids).logits, rtol=1e-4, atol=1e-5
        )


def test_resume_with_fewer_processes_equals_uninterrupted(setup, reference):
    out = setup[2] / "split"
    run = torchrun(
        config(setup, out, batch_size=2), stop_at=3
    )  # dies after step 3; checkpoint at step 2
    assert run.returncode != 0 and "Interrupt" in run.stderr
    with pytest.raises(
        ValueError, match="set batch_size=4"
    ):  # 1 process must keep the global batch
        train(config(setup, out, batch_size=2), resume=True)
    train(config(setup, out), resume=True)
    assert_same_metrics(setup[2] / "one", out)
    assert_same_adapter(reference.adapter_dir, out / "adapter", atol=1e-5)


def test_a_signal_to_one_process_stops_both_after_the_same_step_and_saves(setup):
    """SIGTERM to one of the two workers: the flag travels in the step's all-reduce, so both stop
    after the same step and save it together (else one would wait in a collective for ever)."""
    out = setup[2] / "signalled"
    cfg = config(setup, out, steps=100_000, save_every=1000, eval_every=0, batch_size=2)
    run = torchrun(cfg, wait=False)
    try:
        while steps_logged(out) < 2 and run.poll() is None:
            time.sleep(0.01)
        workers = child_processes(run.pid)
        assert len(workers) == 2, run.communicate(timeout=5)
        os.kill(max(workers), signal.SIGTERM)
        _, stderr = run.communicate(timeout=120)
    finally:
        run.kill()
    assert run.returncode != 0, stderr[-3000:]
    assert "TrainingInterrupted: interrupted at step" in stderr, stderr[-3000:]
    step = load_state(out / "checkpoint.pt")["state"]["step"]
    assert [r["step"] for r in read_metrics(out)] == list(range(1, step + 1)) and step >= 2
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    # one process, batch 4: the same global batch
    train(config(setup, out, steps=step + 1, save_every=1000, eval_every=0), resume=True)
    assert [r["step"] for r in read_metrics(out)] == list(range(1, step + 2))


def child_processes(pid: int) -> list[int]:
    """The processes whose parent is pid (Linux /proc)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):  # gone meanwhile
            continue
        if parent == pid:
            children.append(int(stat.parent.name))
    return children


@pytest.mark.skipif(
    torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is not None,
    reason="bitsandbytes and CUDA are here: the error path cannot be reached",
)
@pytest.mark.parametrize("load_in", ["8bit", "4bit"])
def test_quantised_base_without_cuda_or_bitsandbytes_says_so(setup, tmp_path, load_in):
    with pytest.raises(
        RuntimeError, match=f"load_in={load_in} is unavailable here: it needs .*(CUDA|bitsandbytes)"
    ):
        train(config(setup, tmp_path, load_in=load_in))
    with pytest.raises(ValueError, match="TrainConfig.load_in='2bit' is invalid"):
        config(setup, tmp_path, load_in="2bit")
    with pytest.raises(
        ValueError, match="TrainConfig.distributed='zero3' is invalid: expected one of ddp, fsdp"
    ):
        config(setup, tmp_path, distributed="zero3")


class Interrupt(Exception):
    pass


def worker(config_path: str, resume: str, stop_at: str) -> None:
    def stop(row):
        if row["step"] == int(stop_at):
            raise Interrupt

    cfg = TrainConfig.from_dict(json.loads(Path(config_path).read_text()))
    train(cfg, resume=resume == "1", on_step=stop if int(stop_at) else None)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    worker(*sys.argv[1:])
