"""Every Python block of the README runs: the "Use with PEFT / ..." section's in tests/test_readme.py, every other
section's here, on tiny models and data that stand for the names its blocks use (NAMES), heavy calls cut down."""
import re
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, tiny_model
from tiny import CORPUS, tiny_llama, tiny_model_dir, tiny_tokenizer

ROOT = Path(__file__).parent.parent
RUN_ELSEWHERE = {"## Use with PEFT / Trainer / TRL / lm-eval / vLLM"}  # tests/test_readme.py


def blocks_by_section() -> dict[str, list[str]]:
    """"## heading" -> the Python blocks under it, in order, for every section of README.md that has one."""
    found = {}
    for part in re.split(r"\n(?=## )", ROOT.joinpath("README.md").read_text()):
        blocks = re.findall(r"```python\n(.*?)```", part, flags=re.S)
        if blocks:
            found[part.split("\n", 1)[0]] = blocks
    return found


def library_names(tmp_path: Path) -> dict:
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    return {"model": tiny_model("llama"), "base_model": tiny_model("llama"), "input_ids": ids, "labels": ids}


def trainer_names(tmp_path: Path) -> dict:
    from transformers import DataCollatorForLanguageModeling

    from lmoe import LMoEConfig, inject
    tok = tiny_tokenizer()
    return {"model": tiny_llama(len(tok)), "dataset": [tok(t) for t in CORPUS], "inject": inject,
            "collator": DataCollatorForLanguageModeling(tok, mlm=False), "LMoEConfig": LMoEConfig}


def train_names(tmp_path: Path) -> dict:
    """The built-in mixture cut to a few items, 2 steps, on a tiny model; the block's call as written otherwise."""
    base = tiny_model_dir(tmp_path / "base")
    small = (f'"steps=2", "model={base}", "compare_base=false", "batch_size=2", "mixture.per_domain=4", '
             '"mixture.per_skill=4", "mixture.test_per_domain=2", "mixture.test_per_skill=2"')
    return {"__replace__": ('"steps=100"', small)}


def modular_names(tmp_path: Path) -> dict:
    """A PEFT LoRA directory (B random) for each adapter the blocks name, on the tiny Llama they compose them for."""
    from peft import LoraConfig, get_peft_model
    text = "\n".join(blocks_by_section()[MODULAR])
    for seed, name in enumerate(sorted(set(re.findall(r'"(lora/\w+)"', text)) - {"lora/skill"})):
        lora = get_peft_model(tiny_model("llama"), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
        torch.manual_seed(seed)
        for key, tensor in lora.named_parameters():
            if "lora_B" in key:
                torch.nn.init.normal_(tensor, std=0.1)
        lora.save_pretrained(tmp_path / name)
    return {"base_model": tiny_model("llama"), "skill_batch": torch.randint(0, VOCAB, (2, 9))}


MODULAR = "## Modular skills: compose LoRA adapters"
NAMES = {"## Library": library_names, "## Training with the Hugging Face Trainer": trainer_names,
         "## Train, evaluate, generate": train_names, MODULAR: modular_names}


def test_every_section_with_python_blocks_is_run():
    missing = set(blocks_by_section()) - RUN_ELSEWHERE - set(NAMES)
    assert not missing, f"README sections whose Python blocks no test runs: {sorted(missing)}; add them to NAMES"


@pytest.mark.parametrize("section", sorted(NAMES))
def test_readme_block_runs(section, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    names = NAMES[section](tmp_path)
    old, new = names.pop("__replace__", ("", ""))
    for block in blocks_by_section()[section]:
        assert old in block, f"{section}: the block no longer holds {old}; update this test's stand-in"
        exec(compile(block.replace(old, new), "README.md", "exec"), names)
