"""lmoe in PEFT without `import lmoe` (_lmoe_peft_hook.py, build_pth.py): the .pth line that
installing lmoe puts into site-packages, for `pip install .` and `pip install -e .`; what it costs a
program that never imports peft; PeftModel.from_pretrained, AutoPeftModelForCausalLM.from_pretrained
and lm-eval's command line on an lmoe adapter, each in a fresh interpreter that never imports lmoe;
`import peft` unbroken when lmoe cannot be imported."""

import json
import logging
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from test_lm_eval import DOCS, TASK, TASKS, choice_logliks
from tiny import tiny_model_dir, tiny_tokenizer
from transformers import AutoModelForCausalLM

import _lmoe_peft_hook
import lmoe

ROOT = Path(__file__).resolve().parents[2]
PTH, LINE = "_lmoe_peft_hook.pth", "import _lmoe_peft_hook; _lmoe_peft_hook.install()\n"
IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 8]])


def fresh_python(code: str, cwd: Path, timeout: int = 300) -> str:
    """stdout of `python -P -c code` (-P: the working directory is not on sys.path; lmoe comes
    from the install)."""
    done = subprocess.run(
        [sys.executable, "-P", "-c", code], capture_output=True, text=True, cwd=cwd, timeout=timeout
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny Llama directory, an lmoe adapter for it written by PeftModel.save_pretrained (B
    random, so it matters) and the adapted model's logits on IDS."""
    root = tmp_path_factory.mktemp("peft_hook")
    base = tiny_model_dir(root / "base")
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base), lmoe.LMoEConfig(num_experts=3, rank=2)
    )
    torch.manual_seed(0)
    for _, layer in lmoe.lmoe_layers(model):
        torch.nn.init.normal_(layer.lora_B, std=0.3)
    model.save_pretrained(root / "adapter")
    with torch.no_grad():
        torch.save(model.eval()(input_ids=IDS).logits, root / "logits.pt")
    return root


def test_the_pth_line_goes_into_both_wheels_and_is_installed(tmp_path):
    """Wheel and editable wheel built from a copy of the project (setuptools' backend, no download):
    the .pth at the wheel's root (pip puts it into site-packages), its module in the wheel or the
    editable finder's map."""
    pytest.importorskip(
        "setuptools", minversion="77"
    )  # pyproject.toml's build-system (pip's builds fetch it)
    project = tmp_path / "project"
    shutil.copytree(ROOT / "lmoe", project / "lmoe", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "build_pth.py", "_lmoe_peft_hook.py"):
        shutil.copy(ROOT / name, project / name)
    out = tmp_path / "dist"
    fresh_python(
        f"from setuptools import build_meta as b; b.build_wheel({str(out)!r}); "
        f"b.build_editable({str(out)!r})",
        project,
    )
    editable, wheel = sorted(out.glob("*.whl"), key=lambda p: "editable" not in p.name)
    with zipfile.ZipFile(wheel) as whl:
        assert whl.read(PTH).decode() == LINE
        assert whl.read("_lmoe_peft_hook.py") == (ROOT / "_lmoe_peft_hook.py").read_bytes()
    with zipfile.ZipFile(editable) as whl:
        assert whl.read(PTH).decode() == LINE
        finder = next(n for n in whl.namelist() if n.endswith("_finder.py"))
        assert "'_lmoe_peft_hook': " in whl.read(finder).decode()
    # this test run's environment was installed the same way (.ci/run: pip install -e): a
    # site directory holds it
    assert [(Path(d) / PTH).read_text() for d in sys.path if (Path(d) / PTH).is_file()] == [LINE]


def test_a_program_that_never_imports_peft_imports_nothing_of_lmoe(tmp_path):
    code = (
        "import sys; print(sorted(m for m in ('torch', 'lmoe', 'peft', 'transformers') if m in "
        "sys.modules), sum(type(f).__name__ == 'ImportLmoeAfterPeft' for f in sys.meta_path))"
    )
    assert fresh_python(code, tmp_path).split("\n")[0] == "[] 1"


def test_peft_alone_loads_an_lmoe_adapter_in_a_fresh_interpreter(saved, tmp_path):
    """PeftModel.from_pretrained and AutoPeftModelForCausalLM.from_pretrained, lmoe never imported
    by the script (which probes for peft first, as transformers' is_peft_available does); both give
    the adapted model's logits."""
    code = f"""
import importlib.util, sys
assert importlib.util.find_spec("peft") is not None
assert "lmoe" not in sys.modules and "torch" not in sys.modules and "peft" not in sys.modules
import torch
from peft import AutoPeftModelForCausalLM, PeftConfig, PeftModel
from transformers import AutoModelForCausalLM
expected = torch.load({str(saved / "logits.pt")!r})
ids = torch.tensor({IDS.tolist()})
base = AutoModelForCausalLM.from_pretrained({str(saved / "base")!r})
model = PeftModel.from_pretrained(base, {str(saved / "adapter")!r})
auto = AutoPeftModelForCausalLM.from_pretrained({str(saved / "adapter")!r})
with torch.no_grad():
    for m in (model, auto):
        torch.testing.assert_close(m.eval()(input_ids=ids).logits, expected, rtol=1e-6, atol=1e-6)
print(type(model.base_model).__name__, type(auto.base_model).__name__)
"""
    assert fresh_python(code, tmp_path).split() == ["LMoETuner", "LMoETuner"]


def lm_eval_command(saved: Path, out: Path) -> list[str]:
    return [
        "--model",
        "hf",
        "--model_args",
        f"pretrained={saved / 'base'},peft={saved / 'adapter'}",
        "--device",
        "cpu",
        "--tasks",
        TASK,
        "--include_path",
        TASKS,
        "--log_samples",
        "--output_path",
        str(out),
    ]


def check_lm_eval_samples(saved: Path, out: Path) -> None:
    """Each choice's log-likelihood as the adapted model gives it (a base model
    would give others)."""
    (samples,) = out.rglob(f"samples_{TASK}_*.jsonl")
    rows = sorted(
        (json.loads(line) for line in samples.read_text().splitlines()), key=lambda r: r["doc_id"]
    )
    got = [[float(ll) for ll, _ in row["filtered_resps"]] for row in rows]
    model = lmoe.load_adapter(
        AutoModelForCausalLM.from_pretrained(saved / "base"), saved / "adapter"
    ).eval()
    expected = [choice_logliks(model, tiny_tokenizer(), doc) for doc in DOCS]
    torch.testing.assert_close(
        torch.tensor(got), torch.tensor(expected, dtype=torch.float32), rtol=1e-4, atol=1e-4
    )


def test_lm_evals_command_line_scores_an_lmoe_adapter(saved, tmp_path):
    """lm-eval's own entry point and arguments, `peft=DIR`, in a fresh interpreter; lm-eval's index
    of its hundreds of built-in tasks (20 s here) is skipped: the local task is all
    this run asks for."""
    code = f"""
import sys
from lm_eval.tasks import TaskManager
init = TaskManager.__init__
TaskManager.__init__ = lambda self, *a, **k: init(self, *a, **{{**k, "include_defaults": False}})
sys.argv = ["lm_eval", *{lm_eval_command(saved, tmp_path / "out")!r}]
from lm_eval.__main__ import cli_evaluate
cli_evaluate()
"""
    assert "lmoe_example_mc" in fresh_python(
        code, ROOT
    )  # the task's data_files are relative to the repository
    check_lm_eval_samples(saved, tmp_path / "out")


@pytest.mark.slow
def test_the_lm_eval_command_scores_an_lmoe_adapter(saved, tmp_path):
    """The README's command as typed (lm-eval indexes its built-in tasks: half a minute)."""
    command = [
        str(Path(sys.executable).parent / "lm_eval"),
        *lm_eval_command(saved, tmp_path / "out"),
    ]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    check_lm_eval_samples(saved, tmp_path / "out")


def test_import_peft_survives_lmoe_failing_to_import(monkeypatch, caplog):
    """A program that imports peft, not lmoe, with an lmoe that cannot be imported: one warning."""
    monkeypatch.delitem(sys.modules, "lmoe")
    monkeypatch.setitem(sys.modules, "lmoe.config", None)  # lmoe's __init__: `from .config` fails
    with caplog.at_level(logging.WARNING, logger="lmoe"):
        _lmoe_peft_hook.import_lmoe()
    (record,) = caplog.records
    assert record.getMessage().startswith(
        "lmoe could not register with PEFT (ModuleNotFoundError: import of lmoe.config halted"
    )
