"""The README's "Use with PEFT / Trainer / TRL / lm-eval / vLLM" section runs as written, block after block in one
namespace, on a tiny local model (BASE) with lm-eval's example task; then its results are checked."""
import json
import re
from pathlib import Path

import pytest
import torch

from tiny import CORPUS, tiny_model_dir

ROOT = Path(__file__).parent.parent
SECTION = "## Use with PEFT / Trainer / TRL / lm-eval / vLLM"


def section_blocks() -> list[str]:
    text = ROOT.joinpath("README.md").read_text()
    start = text.index(SECTION)
    end = text.index("\n## ", start + len(SECTION))
    return re.findall(r"```python\n(.*?)```", text[start:end], flags=re.S)


def test_the_section_has_a_block_for_each_tool():
    code = "\n".join(section_blocks())
    for call in ("get_peft_model", "PeftModel.from_pretrained", "disable_adapter", "merge_and_unload",
                 "Trainer(", "SFTTrainer(", "simple_evaluate", "export_peft"):
        assert call in code, call


def test_readme_section_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "examples").symlink_to(ROOT / "examples")  # the lm-eval task's paths are relative to the repository
    namespace = {"BASE": str(tiny_model_dir(tmp_path / "base")), "texts": CORPUS}
    for block in section_blocks():
        if not torch.cuda.is_available():  # SFTConfig's bf16 and HFLM's device default to a GPU
            block = block.replace('SFTConfig("out", ', 'SFTConfig("out", bf16=False, ')
            block = block.replace('HFLM(pretrained=BASE, ', 'HFLM(pretrained=BASE, device="cpu", ')
        exec(compile(block, "README.md", "exec"), namespace)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (tmp_path / "adapter").iterdir()}
    assert json.loads((tmp_path / "lora/skill/adapter_config.json").read_text())["r"] == 8
    assert "--max-lora-rank 8" in capsys.readouterr().out
    assert 0 <= namespace["results"]["results"]["lmoe_example_mc"]["acc,none"] <= 1
    assert not list(__import__("lmoe").lmoe_layers(namespace["merged"]))
    trained = namespace["trainer"].state.log_history
    assert trained and all(torch.isfinite(torch.tensor(row["loss"])) for row in trained if "loss" in row)
