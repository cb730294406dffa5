"""Bad input at the CLI: each is one line on stderr, `lmoe <command>: error: ...`, exit
code 2, no traceback."""

import json
import pickle
import re
import shutil

import pytest
import torch
from conftest import tiny_model
from tiny import tiny_model_dir, write_jsonl

from lmoe import LMoEConfig, inject, save_adapter
from lmoe.cli import main
from lmoe.models import BUILTIN_FILE, BUILTIN_PACKAGE
from lmoe.training.config import TrainConfig

ROWS = [{"prompt": f"the cat {i}?", "completion": f"sat {i}"} for i in range(8)]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny model, a good data file, and an adapter trained (2 steps) on that model."""
    root = tmp_path_factory.mktemp("errors")
    model, data = tiny_model_dir(root / "model"), write_jsonl(root / "chat.jsonl", ROWS)
    main(
        [
            "train",
            f"model={model}",
            f"data=[{data}]",
            f"output_dir={root / 'run'}",
            "steps=2",
            "batch_size=4",
            "save_every=1",
            "compare_base=false",
            "lmoe.num_experts=2",
            "lmoe.rank=2",
        ]
    )
    return {
        "root": root,
        "model": model,
        "data": data,
        "run": root / "run",
        "adapter": root / "run" / "adapter",
    }


def fails(argv: list[str], capsys) -> str:
    """Run the CLI, expect a user error, and return its one message line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    line = err.splitlines()[-1]
    assert line.startswith(f"lmoe {argv[0]}: error: ")
    return line


def train_args(files, tmp_path, *overrides) -> list[str]:
    return [
        "train",
        f"model={files['model']}",
        f"data=[{files['data']}]",
        f"output_dir={tmp_path / 'out'}",
        "steps=2",
        "batch_size=4",
        "compare_base=false",
        "lmoe.num_experts=2",
        "lmoe.rank=2",
        *overrides,
    ]


def test_unknown_model_path(files, tmp_path, capsys):
    line = fails(
        ["eval", f"model={tmp_path / 'no' / 'such-model'}", f"data={files['data']}"], capsys
    )
    assert re.search(
        r"Model path .*no/such-model does not exist; pass 'builtin', an existing model directory",
        line,
    )


def test_truncated_safetensors_model(files, tmp_path, capsys):
    model = shutil.copytree(files["model"], tmp_path / "model")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    line = fails(["eval", f"model={model}", f"data={files['data']}"], capsys)
    assert (
        "weights of model" in line
        and "are corrupt or truncated" in line
        and "download the model again" in line
    )


def test_corrupt_and_truncated_gguf(files, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LMOE_CACHE", str(tmp_path / "cache"))
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf file" * 10)
    line = fails(["eval", f"model={garbage}", f"data={files['data']}"], capsys)
    assert re.search(r"GGUF file .*garbage.gguf is corrupt, truncated .*download it again", line)
    importlib_metadata = pytest.importorskip("importlib.metadata")
    try:
        real = importlib_metadata.distribution(BUILTIN_PACKAGE).locate_file(BUILTIN_FILE)
    except importlib_metadata.PackageNotFoundError:
        pytest.skip(f"{BUILTIN_PACKAGE} is not installed")
    cut = tmp_path / "cut.gguf"
    with open(real, "rb") as f:
        cut.write_bytes(f.read(4 << 20))  # the header and metadata whole, the tensors cut short
    assert "cut.gguf is corrupt, truncated" in fails(
        ["eval", f"model={cut}", f"data={files['data']}"], capsys
    )


def test_adapter_for_another_base(files, tmp_path, capsys):
    gpt2 = tiny_model("gpt2")
    inject(gpt2, LMoEConfig(num_experts=2, rank=2, target_modules=["c_attn"]))
    save_adapter(gpt2, tmp_path / "gpt2-adapter")
    line = fails(
        [
            "eval",
            f"model={files['model']}",
            f"adapter={tmp_path / 'gpt2-adapter'}",
            f"data={files['data']}",
        ],
        capsys,
    )
    assert "was trained on a different base model (gpt2, this one is llama)" in line
    assert line.endswith("Load it onto the base model it was trained with.")


def test_adapter_from_a_newer_lmoe(files, tmp_path, capsys):
    adapter = shutil.copytree(files["adapter"], tmp_path / "adapter")
    meta = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(
        json.dumps({**meta, "lmoe_version": "9.0", "format_version": 99})
    )
    line = fails(
        ["eval", f"model={files['model']}", f"adapter={adapter}", f"data={files['data']}"], capsys
    )
    assert "written by lmoe 9.0 in adapter format 99" in line and "Upgrade lmoe to load it." in line


@pytest.mark.parametrize("damage", ["truncate", "flip", "nan"])
def test_damaged_adapter_weights(files, tmp_path, capsys, damage):
    adapter = shutil.copytree(files["adapter"], tmp_path / "adapter")
    weights = adapter / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":  # one bit of one weight: the file still parses, the checksum catches it
        data[-3] ^= 0x01
    else:  # NaN weights in a self-consistent file (checksum updated): a diverged run's adapter
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(weights))
        tensors[next(iter(tensors))].fill_(float("nan"))
        save_file(tensors, str(weights))
        meta = json.loads((adapter / "adapter_config.json").read_text())
        meta.pop("weights_sha256")
        (adapter / "adapter_config.json").write_text(json.dumps(meta))
        data = weights.read_bytes()
    weights.write_bytes(bytes(data))
    line = fails(
        ["eval", f"model={files['model']}", f"adapter={adapter}", f"data={files['data']}"], capsys
    )
    expected = "hold NaN/inf values" if damage == "nan" else "are corrupt or truncated"
    assert expected in line and (
        "Retrain" in line or "Save the adapter again" in line or "save the adapter" in line
    )


def test_malformed_jsonl_names_the_line(files, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": "a", "completion": \n')
    line = fails(train_args(files, tmp_path, f"data=[{bad}]"), capsys)
    assert re.search(r"bad.jsonl:3: not valid JSON .*each line must be one JSON object", line)
    wrong = write_jsonl(tmp_path / "wrong.jsonl", [{"question": "no answer"}])
    assert "wrong.jsonl:1: expected keys prompt+completion, messages, or text" in fails(
        train_args(files, tmp_path, f"data=[{wrong}]"), capsys
    )


def test_empty_dataset(files, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    line = fails(train_args(files, tmp_path, f"data=[{empty}]"), capsys)
    assert "empty.jsonl holds no records; add one per line" in line
    assert "does not exist" in fails(
        train_args(files, tmp_path, f"data=[{tmp_path / 'missing.jsonl'}]"), capsys
    )


def test_sequence_longer_than_the_context(files, tmp_path, capsys):
    line = fails(train_args(files, tmp_path, "max_length=1000"), capsys)
    assert line.endswith(
        "max_length=1000 is longer than the model's context of 256 tokens; "
        "set max_length to at most 256."
    )


def test_target_modules_matching_nothing(files, tmp_path, capsys):
    line = fails(train_args(files, tmp_path, "lmoe.target_modules=[qkv_proj]"), capsys)
    assert (
        "target_modules=['qkv_proj'] matches no linear layer in LlamaForCausalLM" in line
        and "q_proj" in line
    )
    assert "a valid regular expression" in fails(
        train_args(files, tmp_path, "lmoe.target_modules='(['"), capsys
    )


@pytest.mark.parametrize(
    "override,message",
    [
        ("stepz=3", "TrainConfig has no field 'stepz'. Did you mean 'steps'?"),
        ("lmoe.num_expert=3", "LMoEConfig has no field 'num_expert'. Did you mean 'num_experts'?"),
        (
            "mixture.skils=[add]",
            "Mixture has no field 'mixture.skils'. Did you mean 'mixture.skills'?",
        ),
        ("lmoe.rank=0", "LMoEConfig.rank=0 is invalid: expected an integer >= 1."),
        (
            "lmoe.router=switch",
            "LMoEConfig.router='switch' is invalid: expected one of softmax, topk, dynamic, remix.",
        ),
        ("lr=-1", "TrainConfig.lr=-1 is invalid: expected a finite number > 0."),
        ("lr=.inf", "TrainConfig.lr=inf is invalid: expected a finite number > 0."),
        ("lmoe.alpha=.nan", "LMoEConfig.alpha=nan is invalid: expected a finite number > 0."),
        (
            "max_grad_norm=.inf",
            "TrainConfig.max_grad_norm=inf is invalid: expected a finite number >= 0.",
        ),
        ("max_bad_steps=0", "TrainConfig.max_bad_steps=0 is invalid: expected an integer >= 1."),
        ("steps", "Setting 'steps' must look like key=value"),
    ],
)
def test_invalid_config_values_and_keys(files, tmp_path, capsys, override, message):
    assert message in fails(train_args(files, tmp_path, override), capsys)


def test_bad_config_files(files, tmp_path, capsys):
    assert "Config file" in fails(["train", "--config", tmp_path / "missing.yaml"], capsys)
    broken = tmp_path / "broken.yaml"
    broken.write_text("steps: [1, 2\nlr: 3\n")
    assert re.search(
        r"Config .*broken.yaml is not valid YAML .*fix the file",
        fails(["train", "--config", broken], capsys),
    )
    listed = tmp_path / "list.yaml"
    listed.write_text("- steps\n")
    assert "must be a mapping of fields, got list" in fails(["train", "--config", listed], capsys)


class Bomb:
    def __reduce__(self):  # unpickling this would run os.system
        import os

        return os.system, ("touch pwned",)


def test_resume_refuses_a_pickle_bomb_and_a_damaged_checkpoint(
    files, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    shutil.copytree(files["run"], out)
    good = (out / "checkpoint.pt").read_bytes()
    torch.save({"adapter": {}, "state": Bomb()}, out / "checkpoint.pt")
    line = fails(train_args(files, tmp_path, "steps=3") + ["--resume"], capsys)
    assert "holds objects other than tensors and plain data; refusing to unpickle it" in line
    assert not (tmp_path / "pwned").exists()
    (out / "checkpoint.pt").write_bytes(
        pickle.dumps(Bomb())
    )  # a bare pickle, not even a torch file
    assert "refusing to unpickle" in fails(
        train_args(files, tmp_path, "steps=3") + ["--resume"], capsys
    )
    assert not (tmp_path / "pwned").exists()
    (out / "checkpoint.pt").write_bytes(
        good[:-100]
    )  # cut short after the checksum line was written
    assert "fails its checksum" in fails(
        train_args(files, tmp_path, "steps=3") + ["--resume"], capsys
    )


def test_exponent_floats_are_numbers_not_strings(tmp_path):
    """PyYAML reads `lr: 1e-4` as the string '1e-4' (YAML 1.1), which then failed
    validation; it is a number."""
    config = tmp_path / "run.yaml"
    config.write_text("lr: 1e-4\nlmoe:\n  alpha: 2E1\n  z_loss_coef: 1.0e-3\n")
    cfg = TrainConfig.from_file(config, ["weight_decay=1e-2", "seed=7"])
    assert (cfg.lr, cfg.lmoe.alpha, cfg.lmoe.z_loss_coef, cfg.weight_decay, cfg.seed) == (
        1e-4,
        20.0,
        1e-3,
        1e-2,
        7,
    )
    assert TrainConfig.from_file(None, ["output_dir='1e5'"]).output_dir == "1e5"
