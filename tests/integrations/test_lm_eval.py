"""lm-eval-harness on an lmoe model (no download): the example task
examples/lm_eval/lmoe_example_mc.yaml (dataset_path: json on a local file) through
HFLM(pretrained=model), HFLM(pretrained=DIR, peft=ADAPTER) and `lmoe eval lm_eval=[...]`; each
choice's log-likelihood against a forward of the whole text, one at a time."""

import json
from pathlib import Path

import pytest
import torch
from tiny import tiny_llama, tiny_tokenizer

import lmoe

ROOT = Path(__file__).resolve().parents[2]
TASK, TASKS = "lmoe_example_mc", str(ROOT / "examples" / "lm_eval")
DOCS = [
    json.loads(line)
    for line in (ROOT / "examples" / "lm_eval" / "example_mc.jsonl").read_text().splitlines()
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny Llama with experts (B random, so they matter), its directory and its
    adapter directory."""
    root = tmp_path_factory.mktemp("lm_eval")
    tok = tiny_tokenizer()
    base = tiny_llama(len(tok))
    base.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    model = lmoe.inject(
        base, lmoe.LMoEConfig(num_experts=3, rank=2, router="topk", target_modules="all-linear")
    )
    torch.manual_seed(0)
    for _, layer in lmoe.lmoe_layers(model):
        torch.nn.init.normal_(layer.lora_B, std=0.3)
    lmoe.save_adapter(model, root / "adapter")
    return model.eval(), tok, root


def choice_logliks(model, tok, doc: dict) -> list[float]:
    """log p(" " + choice | "Question: ...\\nAnswer:") summed over the choice's tokens, from
    unpadded forwards."""
    context = f"Question: {doc['question']}\nAnswer:"
    n = len(tok(context, add_special_tokens=False).input_ids)
    out = []
    for choice in doc["choices"]:
        whole = tok(context + " " + choice, add_special_tokens=False).input_ids
        with torch.no_grad():
            logp = model(torch.tensor([whole])).logits[0].double().log_softmax(-1)
        out.append(float(sum(logp[i - 1, whole[i]] for i in range(n, len(whole)))))
    return out


def evaluated_logliks(results: dict) -> list[list[float]]:
    samples = sorted(results["samples"][TASK], key=lambda s: s["doc_id"])
    return [[float(ll) for ll, _ in s["filtered_resps"]] for s in samples]


def simple_evaluate(lm) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(
        include_path=TASKS, include_defaults=False
    )  # indexing lm-eval's own tasks takes 10 s
    return lm_eval.simple_evaluate(model=lm, tasks=[TASK], task_manager=manager)


@pytest.fixture(scope="module")
def in_memory(trained, monkeypatch_module):
    from lm_eval.models.huggingface import HFLM

    model, tok, _ = trained
    return simple_evaluate(HFLM(pretrained=model, tokenizer=tok, device="cpu", batch_size=4))


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)  # the task's data_files are relative to the repository root
        yield mp


def test_hflm_on_the_model_in_memory_scores_each_choice_exactly(trained, in_memory):
    model, tok, _ = trained
    expected = [choice_logliks(model, tok, doc) for doc in DOCS]
    got = evaluated_logliks(in_memory)
    torch.testing.assert_close(
        torch.tensor(got), torch.tensor(expected, dtype=torch.float32), rtol=1e-4, atol=1e-4
    )
    acc = sum(
        max(range(len(ll)), key=ll.__getitem__) == doc["answer"]
        for ll, doc in zip(expected, DOCS, strict=True)
    ) / len(DOCS)
    assert in_memory["results"][TASK]["acc,none"] == pytest.approx(acc)


def test_hflm_with_peft_directory_scores_as_the_model_in_memory(trained, in_memory):
    from lm_eval.models.huggingface import HFLM

    _, _, root = trained
    lm = HFLM(pretrained=str(root / "base"), peft=str(root / "adapter"), device="cpu", batch_size=4)
    torch.testing.assert_close(
        torch.tensor(evaluated_logliks(simple_evaluate(lm))),
        torch.tensor(evaluated_logliks(in_memory)),
        rtol=1e-5,
        atol=1e-5,
    )


def test_lmoe_eval_lm_eval_prints_and_writes_lm_evals_results(trained, in_memory, tmp_path, capsys):
    from lmoe.cli import main

    _, _, root = trained
    main(
        [
            "eval",
            f"model={root / 'base'}",
            f"adapter={root / 'adapter'}",
            f"lm_eval=[{TASK}]",
            f"include_path={TASKS}",
            f"json={tmp_path / 'results.json'}",
        ]
    )
    written = json.loads((tmp_path / "results.json").read_text())
    assert written[TASK]["acc,none"] == pytest.approx(in_memory["results"][TASK]["acc,none"])
    assert TASK in capsys.readouterr().out
