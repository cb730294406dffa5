"""`lmoe compare` end to end on a tiny model: 2 methods x 2 seeds x 2 steps; its JSON, its resume
(a second invocation trains nothing), and one clear line for bad input."""

import json
import statistics
from pathlib import Path

import pytest
from tiny import tiny_model_dir, write_jsonl

import lmoe.compare.runs as runs
from lmoe.cli import main
from lmoe.compare import CompareConfig, compare
from lmoe.compare.items import metric_value, pairing_values
from lmoe.compare.stats import paired_difference
from lmoe.io import read_adapter_meta
from lmoe.training.metrics_log import read_metrics

ROWS = [
    {"prompt": f"What is {a} + {b}?", "completion": str(a + b)}
    for a in range(10, 16)
    for b in range(20, 23)
]


def settings(root, **more):
    given = {
        "model": str(root / "model"),
        "data": f"[{root / 'train.jsonl'}]",
        "eval_data": f"[{root / 'test.jsonl'}]",
        "steps": 2,
        "batch_size": 4,
        "seeds": "[0, 1]",
        "mixtures.soft.lmoe.num_experts": 2,
        "mixtures.soft.lmoe.rank": 2,
        "train.warmup_steps": 1,
        "output_dir": str(root / "out"),
    } | more
    return [f"{k}={v}" for k, v in given.items()]


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    tiny_model_dir(root / "model")
    write_jsonl(root / "train.jsonl", ROWS[:12])
    write_jsonl(root / "test.jsonl", ROWS[12:])
    report = compare(CompareConfig.from_file(None, settings(root)))
    return root, report


def test_end_to_end(done, capsys):
    root, report = done
    lora = report["methods"]["soft"]["lora"]
    assert list(report["summary"]) == ["soft", lora]
    out = root / "out" / "runs"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{m}-s{s}" for m in ("soft", lora) for s in (0, 1)
    )
    # the LoRA: one expert of the matched rank; the mixture: what was asked
    lora_cfg = read_adapter_meta(out / f"{lora}-s0" / "train" / "adapter")["config"]
    assert (lora_cfg["num_experts"], lora_cfg["rank"]) == (1, report["methods"][lora]["rank"])
    soft_cfg = read_adapter_meta(out / "soft-s0" / "train" / "adapter")["config"]
    assert (soft_cfg["num_experts"], soft_cfg["rank"]) == (2, 2)
    # the same data order, steps and learning rate: the same tokens and lr at every step
    for seed in (0, 1):
        mine, theirs = (read_metrics(out / f"{m}-s{seed}" / "train") for m in ("soft", lora))
        assert [(r["tokens"], r["lr"]) for r in mine] == [(r["tokens"], r["lr"]) for r in theirs]
        assert len(mine) == 2
    # the mixture's ESS from its training steps (no held-out routing on user data), 1 to E
    soft, plain = report["summary"]["soft"], report["summary"][lora]
    assert soft["effective_support_from"] == "training" and 1 <= soft["effective_support_size"] <= 2
    assert plain["effective_support_size"] is None
    table = (root / "out" / "compare.md").read_text()
    assert " (train)" in table
    assert f"soft - {lora}" in table and "exact_match:test" in table
    assert "log perplexity:test" in table
    # each difference with its items' SE and, over the 2 seeds, the SE of the seeds' gaps
    assert "[± standard error over seeds]" in table
    row = next(line for line in table.splitlines() if line.startswith(f"soft - {lora}"))
    for pair in report["differences"]:
        cell = f"{pair['difference']:+.3f} ± {pair['paired_se']:.3f} (n={pair['n']})"
        assert f"{cell} [± {pair['seed_se']:.3f}]" in row


def test_json_schema_and_recomputed_pairing(done):
    root, report = done
    stored = json.loads((root / "out" / "compare.json").read_text())
    assert stored == json.loads(json.dumps(report))
    assert set(stored) == {"settings", "methods", "summary", "differences", "from_base", "runs"}
    assert stored["from_base"] == []  # base=false: the base model not scored
    assert stored["settings"]["seeds"] == [0, 1]
    for method in stored["methods"].values():
        assert {"name", "kind", "trainable", "settings", "lora", "rank"} <= set(method)
    for summary in stored["summary"].values():
        assert {"seeds", "trainable", "metrics", "effective_support_size", "s_per_step"} <= set(
            summary
        )
        for metric in summary["metrics"].values():
            assert len(metric["values"]) == 2 and {"mean", "sd"} <= set(metric)
    assert len(stored["runs"]) == 4
    for run in stored["runs"]:
        assert {"method", "kind", "seed", "trainable", "s_per_step", "metrics"} <= set(run)
        assert set(run["metrics"]) == {"exact_match:test", "perplexity:test"}
        for metric in run["metrics"].values():
            assert len(metric["ids"]) == len(metric["values"]) == 6
    for diff in stored["differences"]:
        mine = [r for r in stored["runs"] if r["method"] == diff["mixture"]]
        theirs = {r["seed"]: r for r in stored["runs"] if r["method"] == diff["lora"]}
        again = paired_difference(
            [r["metrics"][diff["metric"]] for r in mine],
            [theirs[r["seed"]]["metrics"][diff["metric"]] for r in mine],
        )
        assert again["difference"] == pytest.approx(diff["difference"])
        assert again["paired_se"] == pytest.approx(diff["paired_se"])


def test_resume_trains_nothing_again(done, monkeypatch):
    root, report = done
    results = sorted((root / "out" / "runs").glob("*/result.json"))
    before = {p: p.stat().st_mtime_ns for p in results}

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(runs, "train", no_training)
    again = compare(CompareConfig.from_file(None, settings(root)))
    assert {p: p.stat().st_mtime_ns for p in results} == before
    assert again["differences"] == report["differences"]
    with pytest.raises(ValueError, match=r"finished run with other settings \(steps\)"):
        compare(CompareConfig.from_file(None, settings(root, steps=3)))


def test_an_interrupted_run_continues_from_its_checkpoint(done, monkeypatch):
    root, report = done
    result = root / "out" / "runs" / "soft-s1" / "result.json"
    result.unlink()  # as if stopped after its checkpoint, before it was scored
    with pytest.raises(ValueError, match=r"unfinished run with other settings \(steps\)"):
        compare(CompareConfig.from_file(None, settings(root, steps=3, seeds="[1]")))
    calls, real = [], runs.train

    def counted(cfg, resume=False, **kwargs):
        calls.append((cfg.output_dir, resume))
        return real(cfg, resume=resume, **kwargs)

    monkeypatch.setattr(runs, "train", counted)
    again = compare(CompareConfig.from_file(None, settings(root)))
    assert calls == [(str(root / "out" / "runs" / "soft-s1" / "train"), True)]
    assert result.is_file()
    for mine, before in zip(again["differences"], report["differences"], strict=True):
        assert mine["difference"] == pytest.approx(before["difference"], abs=1e-6)


@pytest.mark.parametrize(
    "bad, says",
    [
        (["data=[x.jsonl]"], "no held-out side"),
        (["mixtures.soft.lr=1"], "mixtures.soft sets lr"),
        (["train.steps=3"], "CompareConfig.train sets steps"),
        (["seeds=[0, 0]"], "CompareConfig.seeds"),
        (["mixtures.lora_x={}"], "not starting with 'lora_'"),
        (["mixtures.soft.lmoe.router=nope"], "LMoEConfig.router"),
        (["stepz=3"], "Did you mean 'steps'"),
        (["eval_data=[nope.jsonl]", "output_dir=OUT"], "nope.jsonl does not exist"),
    ],
)
def test_bad_input_is_one_line(bad, says, capsys, tmp_path):
    with pytest.raises(SystemExit) as stop:
        main(["compare", *(a.replace("OUT", str(tmp_path / "out")) for a in bad)])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lmoe compare: error: ") and says in err[0], err


def test_docs_commands_and_config_parse(tmp_path, monkeypatch):
    """docs/compare.md's commands and its YAML config are valid CompareConfigs (none is run)."""
    import re
    import shlex
    from pathlib import Path

    page = (Path(__file__).resolve().parents[2] / "docs" / "compare.md").read_text()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "compare.yaml").write_text(re.findall(r"```yaml\n(.*?)```", page, re.S)[0])
    commands = [
        line.split("#")[0].strip()
        for block in re.findall(r"```bash\n(.*?)```", page, re.S)
        for line in block.splitlines()
    ]
    assert len(commands) == 5
    for line in commands:
        argv = shlex.split(line)
        assert argv[:2] == ["lmoe", "compare"], line
        config = argv[argv.index("--config") + 1] if "--config" in argv else None
        overrides = [a for a in argv[2:] if "=" in a]
        cfg = CompareConfig.from_file(config, overrides)
        assert cfg.mixtures and cfg.seeds
    cfg = CompareConfig.from_file("compare.yaml", [])
    assert cfg.mixtures == {
        "softmax": {},
        "top2": {"lmoe.router": "topk", "lmoe.top_k": 2},
        "dynamic": {"lmoe.router": "dynamic"},
    }


def test_the_base_model_is_scored_once_and_paired_with_every_run(
    done, monkeypatch, capsys, tmp_path
):
    root, report = done
    monkeypatch.chdir(tmp_path)

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(runs, "train", no_training)
    with_base = compare(CompareConfig.from_file(None, settings(root, base="true")))
    base = [r for r in with_base["runs"] if r["kind"] == "base"]
    assert len(base) == 1 and with_base["summary"]["base"]["trainable"] == 0
    assert "method - base" in capsys.readouterr().out
    # the base model alone, scored by lmoe eval (evaluate_all: another code path)
    main(["eval", f"model={root / 'model'}", f"data=[{root / 'test.jsonl'}]", "json=base.json"])
    ref = json.loads(Path("base.json").read_text())
    assert set(base[0]["metrics"]) == {"exact_match:test", "perplexity:test"}
    for metric, scores in base[0]["metrics"].items():
        (value,) = ref[metric].values()  # one group: the file's rows have no domain
        assert metric_value(scores) == pytest.approx(value, rel=1e-5), metric
    # each method's difference from the base, by hand from the stored per-item scores
    assert {d["method"] for d in with_base["from_base"]} == set(report["summary"])
    for diff in with_base["from_base"]:
        mine = [r for r in with_base["runs"] if r["method"] == diff["method"]]
        values = [
            statistics.mean(pairing_values(r["metrics"][diff["metric"]]))
            - statistics.mean(pairing_values(base[0]["metrics"][diff["metric"]]))
            for r in mine
        ]
        assert diff["difference"] == pytest.approx(statistics.mean(values))
        assert diff["seeds"] == len(mine) == 2
    stored = root / "out" / "runs" / "base" / "result.json"
    before = stored.stat().st_mtime_ns
    again = compare(CompareConfig.from_file(None, settings(root, base="true")))
    assert stored.stat().st_mtime_ns == before  # kept, not scored again
    assert again["from_base"] == with_base["from_base"]
    with pytest.raises(SystemExit):
        main(["compare", "mixtures.base={}", *settings(root)])
    assert "nor 'base'" in capsys.readouterr().err
