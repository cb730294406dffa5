"""End to end through the CLI on a tiny random model: train (YAML + overrides), eval,
generate, resume."""

import json
import re

import pytest
from tiny import tiny_model_dir, write_jsonl

from lmoe.cli import main
from lmoe.training.metrics_log import read_metrics


def test_train_eval_generate(tmp_path, capsys):
    model = tiny_model_dir(tmp_path / "model")
    data = write_jsonl(
        tmp_path / "chat.jsonl",
        [{"prompt": f"the cat {i}?", "completion": f"sat {i}"} for i in range(12)],
    )
    mc = write_jsonl(
        tmp_path / "mc.jsonl", [{"question": "the cat?", "choices": ["sat", "hello"], "answer": 0}]
    )
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model: {model}\ndata: [{data}]\neval_data: [{mc}]\nsteps: 3\nbatch_size: 4\n"
        "save_every: 2\ncompare_base: false\nlmoe:\n  num_experts: 2\n  rank: 2\n"
    )
    out = tmp_path / "run"
    main(
        [
            "train",
            "--config",
            str(config),
            f"output_dir={out}",
            "lmoe.target_modules=[q_proj, up_proj]",
        ]
    )
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]
    saved = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert (
        saved["config"]["target_modules"] == ["q_proj", "up_proj"]
        and saved["config"]["num_experts"] == 2
    )
    scored = json.loads((out / "eval.json").read_text())["trained"][
        "multiple_choice:mc"
    ]  # default: both protocols
    assert (
        scored["letter/chat"]["protocol"] == "letter"
        and scored["cloze/chat"]["protocol"] == "cloze"
    )
    assert scored["letter/chat"]["template"] == scored["cloze/chat"]["template"] == "chat"
    table = capsys.readouterr().out  # the trained run's table: a row per protocol
    assert (
        "multiple_choice:mc letter/chat acc" in table
        and "multiple_choice:mc cloze/chat acc_norm" in table
    )

    main(
        [
            "train",
            "--config",
            str(config),
            f"output_dir={out}",
            "lmoe.target_modules=[q_proj, up_proj]",
            "steps=4",
            "--resume",
        ]
    )
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4]

    routers = (
        tmp_path / "routers"
    )  # the same file's lmoe section repeats the adapter's mixture: accepted
    main(
        [
            "train",
            "--config",
            str(config),
            f"output_dir={routers}",
            f"init_adapter={out / 'adapter'}",
            "train_experts=false",
            "steps=2",
        ]
    )
    assert [r["step"] for r in read_metrics(routers)] == [1, 2] and (routers / "adapter").is_dir()

    capsys.readouterr()
    main(
        [
            "eval",
            "--model",
            str(model),
            "--adapter",
            str(out / "adapter"),
            "--data",
            str(data),
            str(mc),
            "--json",
            str(tmp_path / "eval.json"),
        ]
    )
    results = json.loads((tmp_path / "eval.json").read_text())
    assert results["perplexity:chat"]["chat"] > 1 and results["multiple_choice:mc"]["n"] == 1
    cloze = results["multiple_choice:mc"]["cloze/chat"]
    assert set(cloze) == {"protocol", "template", "acc", "acc_norm"} and (
        cloze["protocol"],
        cloze["template"],
    ) == ("cloze", "chat")
    printed = capsys.readouterr().out
    assert "perplexity:chat chat" in printed
    assert (
        "multiple_choice:mc letter/chat acc" in printed
        and "multiple_choice:mc cloze/chat acc" in printed
    )
    main(
        [
            "eval",
            "--model",
            str(model),
            "--data",
            str(mc),
            "--protocol",
            "letter",
            "--template",
            "plain",
            "--json",
            str(tmp_path / "letter.json"),
        ]
    )
    letter = json.loads((tmp_path / "letter.json").read_text())["multiple_choice:mc"]
    assert set(letter) == {"n", "chance", "letter/plain"}  # the protocol asked for, alone
    assert "multiple_choice:mc letter/plain acc" in capsys.readouterr().out

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello there\n\nthe cat?\n")
    main(
        [
            "generate",
            "--model",
            str(model),
            "--adapter",
            str(out / "adapter"),
            "one two",
            "--file",
            str(prompts),
            "--max-new-tokens",
            "3",
            "--sample",
            "--temperature",
            "0.7",
        ]
    )
    lines = [
        json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")
    ]
    assert [line["prompt"] for line in lines] == ["one two", "hello there", "the cat?"]


def test_errors_are_one_line_messages(tmp_path, capsys):  # more in tests/test_errors.py
    for argv, message in [
        (["train", "stepz=3"], "lmoe train: error: .*Did you mean 'steps'"),
        (
            [
                "eval",
                "--model",
                str(tiny_model_dir(tmp_path / "m")),
                "--adapter",
                str(tmp_path / "none"),
            ],
            "lmoe eval: error: No adapter at",
        ),
        (
            ["train", f"init_adapter={tmp_path / 'none'}"],
            "lmoe train: error: .*init_adapter=.*no adapter",
        ),
    ]:
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
        assert re.match(message, capsys.readouterr().err.splitlines()[-1])
