"""Every Python block of the README and of docs/*.md runs: the integrations page's "Use with PEFT /
..." section's in tests/test_readme.py, every other section's here, on tiny models and data that
stand for the names its blocks use (NAMES), heavy calls cut down. A section is keyed by (page,
heading): its "#" or "##" line."""

import re
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, tiny_model
from tiny import CORPUS, tiny_llama, tiny_model_dir, tiny_tokenizer

ROOT = Path(__file__).resolve().parent.parent
PAGES = [
    "README.md",
    *sorted(p.relative_to(ROOT).as_posix() for p in ROOT.joinpath("docs").glob("*.md")),
]
INTEGRATIONS = ("docs/integrations.md", "## Use with PEFT / Trainer / TRL / lm-eval / vLLM")
MODULAR = ("docs/modular.md", "# Modular skills: compose LoRA adapters")
RUN_ELSEWHERE = {INTEGRATIONS}  # tests/test_readme.py


def sections() -> dict[tuple[str, str], str]:
    """(page, heading) -> the text from that "#" or "##" line to the next one, for README.md and
    docs/*.md; a line inside a code fence is code, never a heading."""
    found = {}
    for page in PAGES:
        key, fenced = (page, ""), False
        for line in ROOT.joinpath(page).read_text().splitlines(keepends=True):
            fenced ^= line.startswith("```")
            if not fenced and line.startswith(("# ", "## ")):
                key = (page, line.rstrip())
                assert key not in found, (
                    f"{page} has two sections headed {key[1]!r}: the tests cannot tell them apart"
                )
            found[key] = found.get(key, "") + line
    return found


def blocks_by_section() -> dict[tuple[str, str], list[str]]:
    """(page, heading) -> the Python blocks under it, in order, for every section that has one."""
    found = {
        key: re.findall(r"```python\n(.*?)```", text, flags=re.S)
        for key, text in sections().items()
    }
    return {key: blocks for key, blocks in found.items() if blocks}


def library_names(tmp_path: Path) -> dict:
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    return {
        "model": tiny_model("llama"),
        "base_model": tiny_model("llama"),
        "input_ids": ids,
        "labels": ids,
    }


def trainer_names(tmp_path: Path) -> dict:
    from transformers import DataCollatorForLanguageModeling

    from lmoe import LMoEConfig, inject

    tok = tiny_tokenizer()
    return {
        "model": tiny_llama(len(tok)),
        "dataset": [tok(t) for t in CORPUS],
        "inject": inject,
        "collator": DataCollatorForLanguageModeling(tok, mlm=False),
        "LMoEConfig": LMoEConfig,
    }


def train_names(tmp_path: Path) -> dict:
    """The built-in mixture cut to a few items, 2 steps, on a tiny model; the block's call as
    written otherwise."""
    base = tiny_model_dir(tmp_path / "base")
    small = (
        f'"steps=2", "model={base}", "compare_base=false", "batch_size=2", "mixture.per_domain=4", '
        '"mixture.per_skill=4", "mixture.test_per_domain=2", "mixture.test_per_skill=2"'
    )
    return {"__replace__": ('"steps=100"', small)}


def modular_names(tmp_path: Path) -> dict:
    """A PEFT LoRA directory (B random) for each adapter the blocks name, on the tiny Llama they
    compose them for."""
    from peft import LoraConfig, get_peft_model

    text = "\n".join(blocks_by_section()[MODULAR])
    for seed, name in enumerate(sorted(set(re.findall(r'"(lora/\w+)"', text)) - {"lora/skill"})):
        lora = get_peft_model(
            tiny_model("llama"), LoraConfig(r=2, target_modules=["q_proj", "v_proj"])
        )
        torch.manual_seed(seed)
        for key, tensor in lora.named_parameters():
            if "lora_B" in key:
                torch.nn.init.normal_(tensor, std=0.1)
        lora.save_pretrained(tmp_path / name)
    return {"base_model": tiny_model("llama"), "skill_batch": torch.randint(0, VOCAB, (2, 9))}


NAMES = {
    ("README.md", "## Quickstart"): library_names,
    ("docs/integrations.md", "## Training with the Hugging Face Trainer"): trainer_names,
    ("docs/training.md", "## From Python"): train_names,
    MODULAR: modular_names,
}


def test_every_section_with_python_blocks_is_run():
    found = set(blocks_by_section())
    missing = sorted(found - RUN_ELSEWHERE - set(NAMES))
    assert not missing, (
        f"sections (page, heading) whose Python blocks no test runs: {missing}; add each to NAMES "
        "in tests/test_readme_blocks.py with stand-ins for the names its blocks use"
    )
    gone = sorted((set(NAMES) | RUN_ELSEWHERE) - found)
    assert not gone, (
        f"the tests name sections that hold no Python block (moved or renamed?): {gone}"
    )


@pytest.mark.parametrize("section", sorted(NAMES), ids=" ".join)
def test_readme_block_runs(section, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    names = NAMES[section](tmp_path)
    old, new = names.pop("__replace__", ("", ""))
    for block in blocks_by_section()[section]:
        assert old in block, (
            f"{section}: the block no longer holds {old}; update this test's stand-in"
        )
        exec(compile(block.replace(old, new), section[0], "exec"), names)
