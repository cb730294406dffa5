"""The adapter seal (lmoe/io.py, lmoe/integrations/peft_tuner.py): every writer records the SHA-256
of the weights file in adapter_config.json, every reader refuses weights that do not match it with
save_adapter's one line. Each writer x each reader, with one byte flipped in the middle of the
weights, the file cut in half, and the weights file of another adapter of the same shapes (also what
a crash between a writer's two files leaves); an adapter without a checksum loads with a
one-line warning."""

import json
import logging
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import reset_accelerate
from peft import AutoPeftModelForCausalLM, PeftModel, get_peft_model
from tiny import CORPUS, tiny_model_dir, tiny_tokenizer, write_jsonl
from transformers import (
    AutoModelForCausalLM,
    DataCollatorForLanguageModeling,
    Trainer,
    TrainingArguments,
)

import lmoe
from lmoe.cli import main
from lmoe.integrations.peft_tuner import LMoEPeftConfig
from lmoe.io import CONFIG_FILE, WEIGHTS_FILE, sha256_file

CFG = dict(num_experts=2, rank=2)
REFUSED = (
    r"Adapter weights .*adapter_model\.safetensors are corrupt or truncated: they do not match "
    r"the checksum in"
)


def random_experts(model, seed: int):
    torch.manual_seed(seed)
    for _, layer in lmoe.lmoe_layers(model):
        torch.nn.init.normal_(layer.lora_B, std=0.3)
    return model


def train_args(out: Path, **kwargs) -> TrainingArguments:
    return TrainingArguments(
        str(out), max_steps=1, save_steps=1, report_to="none", use_cpu=True, **kwargs
    )


def trainer_dataset() -> dict:
    tok = tiny_tokenizer()
    return {
        "train_dataset": [tok(t) for t in CORPUS],
        "data_collator": DataCollatorForLanguageModeling(tok, mlm=False),
    }


def write_save_adapter(base: Path, out: Path, seed: int = 0) -> list[Path]:
    model = random_experts(
        lmoe.inject(AutoModelForCausalLM.from_pretrained(base), lmoe.LMoEConfig(**CFG)), seed
    )
    return [lmoe.save_adapter(model, out)]


def write_save_pretrained(base: Path, out: Path) -> list[Path]:
    model = random_experts(
        get_peft_model(AutoModelForCausalLM.from_pretrained(base), lmoe.LMoEConfig(**CFG)), 1
    )
    model.save_pretrained(out)
    return [out]


def write_trainer(base: Path, out: Path) -> list[Path]:
    """transformers.Trainer on a PeftModel: checkpoint-1 and save_model's directory."""
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), lmoe.LMoEConfig(**CFG))
    trainer = Trainer(model=model, args=train_args(out), **trainer_dataset())
    trainer.train()
    trainer.save_model(str(out / "final"))
    return [out / "checkpoint-1", out / "final"]


def write_lmoe_trainer(base: Path, out: Path) -> list[Path]:
    model = lmoe.inject(AutoModelForCausalLM.from_pretrained(base), lmoe.LMoEConfig(**CFG))
    trainer = lmoe.LMoETrainer(model=model, args=train_args(out), **trainer_dataset())
    trainer.train()
    trainer.save_model(str(out / "final"))
    return [out / "checkpoint-1", out / "final"]


def write_trl(base: Path, out: Path) -> list[Path]:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(str(out), max_steps=1, save_steps=1, report_to="none", use_cpu=True)
    SFTTrainer(
        model=str(base),
        args=args,
        train_dataset=Dataset.from_dict({"text": CORPUS}),
        processing_class=tiny_tokenizer(),
        peft_config=lmoe.LMoEConfig(**CFG),
    ).train()
    reset_accelerate()
    return [out / "checkpoint-1"]


WRITERS = {
    "save_adapter": write_save_adapter,
    "PeftModel.save_pretrained": write_save_pretrained,
    "Trainer": write_trainer,
    "LMoETrainer": write_lmoe_trainer,
    "SFTTrainer": write_trl,
}
WRITTEN = [
    "save_adapter",
    "PeftModel.save_pretrained",
    "Trainer checkpoint",
    "Trainer.save_model",
    "LMoETrainer checkpoint",
    "LMoETrainer.save_model",
    "SFTTrainer checkpoint",
]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict:
    """Every writer's directories on one tiny base (named as in WRITTEN), and a donor
    of the same shapes."""
    root = tmp_path_factory.mktemp("checksums")
    base = tiny_model_dir(root / "base")
    dirs = [
        d for name, write in WRITERS.items() for d in write(base, root / name.replace(".", "_"))
    ]
    out = dict(zip(WRITTEN, dirs, strict=True))
    out["donor"] = write_save_adapter(base, root / "donor", seed=7)[0]
    write_jsonl(root / "data.jsonl", [{"prompt": "hello", "completion": "there"}])
    return {"base": base, "root": root, "dirs": out}


def corrupt(directory: Path, how: str, donor: Path) -> None:
    weights = directory / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    if how == "flipped byte":
        data[len(data) // 2] ^= 0xFF  # inside the tensors: the header is a few hundred bytes
    elif how == "truncated":
        data = data[: len(data) // 2]
    else:  # another adapter's weights: same names and shapes, other values
        data = bytearray((donor / WEIGHTS_FILE).read_bytes())
    weights.write_bytes(bytes(data))


def read_trainer(directory: Path, base: Path, tmp: Path) -> None:
    """What Trainer.train(resume_from_checkpoint=DIR) runs first for a PeftModel."""
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), lmoe.LMoEConfig(**CFG))
    Trainer(model=model, args=train_args(tmp / "out"))._load_from_checkpoint(str(directory))


def read_lmoe_trainer(directory: Path, base: Path, tmp: Path) -> None:
    model = lmoe.inject(AutoModelForCausalLM.from_pretrained(base), lmoe.LMoEConfig(**CFG))
    lmoe.LMoETrainer(model=model, args=train_args(tmp / "out"))._load_from_checkpoint(
        str(directory)
    )


def cli(*argv) -> None:
    main([str(a) for a in argv])


READERS = {
    "load_adapter": lambda d, base, tmp: lmoe.load_adapter(
        AutoModelForCausalLM.from_pretrained(base), d
    ),
    "PeftModel.from_pretrained": lambda d, base, tmp: PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base), d
    ),
    "AutoPeftModelForCausalLM.from_pretrained": lambda d, base, tmp: (
        AutoPeftModelForCausalLM.from_pretrained(d)
    ),
    "lmoe eval adapter=": lambda d, base, tmp: cli(
        "eval", f"model={base}", f"adapter={d}", f"data={base.parent / 'data.jsonl'}"
    ),
    "lmoe generate adapter=": lambda d, base, tmp: cli(
        "generate", f"model={base}", f"adapter={d}", "prompts=hello"
    ),
    "lmoe analyze": lambda d, base, tmp: cli(
        "analyze", f"adapter={d}", f"model={base}", f"data={base.parent / 'data.jsonl'}"
    ),
    "init_adapter=": lambda d, base, tmp: cli(
        "train", f"model={base}", f"init_adapter={d}", "steps=1", f"output_dir={tmp / 'run'}"
    ),
    "Trainer resume_from_checkpoint": read_trainer,
    "LMoETrainer resume_from_checkpoint": read_lmoe_trainer,
}


@pytest.mark.parametrize("reader", list(READERS))
@pytest.mark.parametrize("writer", WRITTEN)
def test_every_reader_refuses_every_writers_corrupted_adapter(
    adapters, writer, reader, tmp_path, capsys
):
    source = adapters["dirs"][writer]
    assert json.loads((source / CONFIG_FILE).read_text())["weights_sha256"] == sha256_file(
        source / WEIGHTS_FILE
    )
    for how in ("flipped byte", "truncated", "swapped"):
        directory = tmp_path / how.replace(" ", "_")
        shutil.copytree(source, directory)
        corrupt(directory, how, adapters["dirs"]["donor"])
        try:
            READERS[reader](directory, adapters["base"], tmp_path)
        except SystemExit as stop:  # the command line: rc 2 and the message on stderr, one line
            assert stop.code == 2, how
            (line,) = capsys.readouterr().err.strip().splitlines()[-1:]
            assert re.search(REFUSED, line), (how, line)
        except ValueError as err:
            assert re.search(REFUSED, str(err)) and "\n" not in str(err), (how, err)
        else:
            pytest.fail(f"{reader} loaded {writer}'s adapter with a {how} weights file")


WARNING_READERS = [
    "load_adapter",
    "PeftModel.from_pretrained",
    "AutoPeftModelForCausalLM.from_pretrained",
    "Trainer resume_from_checkpoint",
    "LMoETrainer resume_from_checkpoint",
]


@pytest.mark.parametrize("reader", WARNING_READERS)
def test_an_adapter_without_a_checksum_loads_with_a_one_line_warning(
    adapters, reader, tmp_path, caplog
):
    directory = tmp_path / "old"
    shutil.copytree(adapters["dirs"]["PeftModel.save_pretrained"], directory)
    meta = json.loads((directory / CONFIG_FILE).read_text())
    (directory / CONFIG_FILE).write_text(
        json.dumps({**meta, "weights_sha256": None})
    )  # as lmoe wrote it before
    with caplog.at_level(logging.WARNING, logger="lmoe"):
        READERS[reader](directory, adapters["base"], tmp_path)
    (record,) = [r for r in caplog.records if "checksum" in r.getMessage()]
    assert "cannot be verified" in record.getMessage() and "\n" not in record.getMessage()


def test_a_crash_between_save_adapters_two_files_leaves_a_pair_that_is_refused(
    adapters, tmp_path, monkeypatch
):
    directory = write_save_adapter(adapters["base"], tmp_path / "adapter", seed=1)[0]
    from lmoe import io

    write = io.atomic_write

    def crash_at_the_config(path, fn):
        if Path(path).name == CONFIG_FILE:
            raise KeyboardInterrupt  # the process dies after the weights were replaced
        write(path, fn)

    monkeypatch.setattr(io, "atomic_write", crash_at_the_config)
    with pytest.raises(KeyboardInterrupt):
        write_save_adapter(adapters["base"], directory, seed=2)
    with pytest.raises(ValueError, match=REFUSED):
        lmoe.load_adapter(AutoModelForCausalLM.from_pretrained(adapters["base"]), directory)


def test_a_crash_between_save_pretraineds_two_files_leaves_a_pair_that_is_refused(
    adapters, tmp_path, monkeypatch
):
    directory = write_save_pretrained(adapters["base"], tmp_path / "adapter")[0]
    model = random_experts(
        get_peft_model(
            AutoModelForCausalLM.from_pretrained(adapters["base"]), lmoe.LMoEConfig(**CFG)
        ),
        5,
    )

    def crash(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(LMoEPeftConfig, "save_pretrained", crash)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(directory)
    with pytest.raises(ValueError, match=REFUSED):
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(adapters["base"]), directory)
