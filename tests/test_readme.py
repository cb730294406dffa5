"""docs/integrations.md's "Use with PEFT / Trainer / TRL / lm-eval / vLLM" section runs as written,
block after block in one namespace, on a tiny local model (BASE) with lm-eval's example task; then
its results are checked. docs/modular.md's commands run one by one on a tiny model too."""

import json
import re
import shlex

import torch
from test_readme_blocks import INTEGRATIONS, MODULAR, ROOT, blocks_by_section, sections
from tiny import CORPUS, peft_lora_dir, tiny_model_dir, write_jsonl


def section_blocks() -> list[str]:
    return blocks_by_section()[INTEGRATIONS]


def test_the_section_has_a_block_for_each_tool():
    code = "\n".join(section_blocks())
    for call in (
        "get_peft_model",
        "PeftModel.from_pretrained",
        "disable_adapter",
        "merge_and_unload",
        "Trainer(",
        "SFTTrainer(",
        "simple_evaluate",
        "export_peft",
    ):
        assert call in code, call


def test_readme_section_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "examples").symlink_to(
        ROOT / "examples"
    )  # the lm-eval task's paths are relative to the repository
    namespace = {"BASE": str(tiny_model_dir(tmp_path / "base")), "texts": CORPUS}
    for block in section_blocks():
        if not torch.cuda.is_available():  # SFTConfig's bf16 and HFLM's device default to a GPU
            block = block.replace('SFTConfig("out", ', 'SFTConfig("out", bf16=False, ')
            block = block.replace("HFLM(pretrained=BASE, ", 'HFLM(pretrained=BASE, device="cpu", ')
        exec(compile(block, INTEGRATIONS[0], "exec"), namespace)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {
        p.name for p in (tmp_path / "adapter").iterdir()
    }
    assert json.loads((tmp_path / "lora/skill/adapter_config.json").read_text())["r"] == 8
    assert "--max-lora-rank 8" in capsys.readouterr().out
    assert 0 <= namespace["results"]["results"]["lmoe_example_mc"]["acc,none"] <= 1
    assert not list(__import__("lmoe").lmoe_layers(namespace["merged"]))
    trained = namespace["trainer"].state.log_history
    assert trained and all(
        torch.isfinite(torch.tensor(row["loss"])) for row in trained if "loss" in row
    )


def section_commands(section: tuple[str, str]) -> list[str]:
    """The shell commands of a section's
    ```bash blocks (section: (page, heading)), comments and blank lines dropped."""
    blocks = re.findall(r"```bash\n(.*?)```", sections()[section], flags=re.S)
    lines = [line.split("#")[0].strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line]


def test_modular_skills_commands_run(tmp_path, monkeypatch, capsys):
    """Every command of the section on a tiny base: its data files and PEFT adapters made up, lmoe
    train cut to 2 steps; then the mixtures they wrote are checked."""
    from safetensors.torch import load_file

    from lmoe.cli import main
    from lmoe.modular.edit import describe_mixture

    monkeypatch.chdir(tmp_path)
    base = str(tiny_model_dir(tmp_path / "base"))
    commands = section_commands(MODULAR)
    text = "\n".join(commands)
    for name in set(re.findall(r"[\w-]+\.jsonl", text)):
        write_jsonl(
            tmp_path / name, [{"prompt": f"{name} {i}?", "completion": f"{i}"} for i in range(8)]
        )
    for seed, name in enumerate(sorted(set(re.findall(r"lora/\w+", text)))):
        peft_lora_dir(base, tmp_path / name, seed)
    for line in commands:
        argv = shlex.split(line)
        assert argv[0] == "lmoe", line
        extra = {
            "train": [
                f"model={base}",
                "steps=2",
                "batch_size=4",
                "save_every=0",
                "compare_base=false",
            ],
            "compose": [f"model={base}"],
            "experts": [] if argv[2] == "list" else [f"model={base}"],
        }
        main(argv[1:] + extra[argv[1]])
    assert "3 experts of rank 4" in capsys.readouterr().out
    sizes = {
        d: describe_mixture(d)["num_experts"]
        for d in (
            "mix",
            "runs/mix/adapter",
            "mix_count",
            "mix_new",
            "runs/mix_new/adapter",
            "mix_without_sort",
            "mix_add_v2",
        )
    }
    assert sizes == {
        "mix": 3,
        "runs/mix/adapter": 3,
        "mix_count": 4,
        "mix_new": 4,
        "runs/mix_new/adapter": 4,
        "mix_without_sort": 2,
        "mix_add_v2": 3,
    }
    start = load_file("mix_new/adapter_model.safetensors")
    trained = load_file("runs/mix_new/adapter/adapter_model.safetensors")
    experts = [key for key in start if key.endswith(("lora_A", "lora_B"))]
    assert experts and all(torch.equal(trained[k][:3], start[k][:3]) for k in experts), (
        "a frozen expert moved"
    )
    assert all(not torch.equal(trained[k][3], start[k][3]) for k in experts if k.endswith("lora_B"))
