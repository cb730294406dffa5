"""Every command's settings (lmoe.settings, lmoe.cli_settings): --help lists each field of its
dataclass with its type, default and help; `lmoe config` writes a file that reads back as the
defaults; key=value words parse as their field's type; an unknown key is one line naming the
closest ones."""

import dataclasses
import json
import re
import shlex
import typing
from pathlib import Path

import pytest
import yaml

from lmoe.cli import COMMANDS, main, parser
from lmoe.cli_settings import AnalyzeConfig, EvalConfig, ExpertsRemoveConfig, GenerateConfig
from lmoe.settings import apply_overrides, check_known_keys, load_settings
from lmoe.training.config import TrainConfig

# a value of each type a required setting has, to fill it in
GIVEN = {"str": "somewhere", "int": 1, "list[str]": ["a", "b"], "list[int]": [0, 2]}


def setting_fields(cls, instance, prefix=""):
    """(dotted name, field, the default instance's value) of every setting of dataclass cls, a
    nested dataclass's fields under its name (an LMoEConfig's without PEFT's own)."""
    hidden = getattr(cls, "NOT_SETTINGS", ())
    for f in dataclasses.fields(cls):
        value = getattr(instance, f.name)
        if f.name in hidden:
            continue
        if dataclasses.is_dataclass(value):
            yield from setting_fields(type(value), value, f"{prefix}{f.name}.")
        else:
            yield prefix + f.name, f, value


def help_of(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("name", list(COMMANDS))
def test_help_names_every_field_with_its_type_default_and_help(name, capsys):
    cls = COMMANDS[name][1]
    text = help_of(name.split(), capsys)
    listed = re.findall(r"^  (\S+): (.+?)(?: = (.*)| \(required\))$", text, flags=re.M)
    shown = {key: (kind, default) for key, kind, default in listed}
    expected = list(setting_fields(cls, cls()))
    assert [key for key, _, _ in listed] == [key for key, _, _ in expected]
    for key, f, value in expected:
        kind, default = shown[key]
        assert f.type.startswith(kind), key  # a required setting's type is shown without None
        assert f.metadata["help"], f"{key} has no help"
        block = re.search(rf"^  {re.escape(key)}: .*\n((?:      .*\n)*)", text, flags=re.M)[1]
        assert " ".join(block.split()) == " ".join(f.metadata["help"].split()), key
        if f.metadata.get("required"):
            assert default == "", key
        elif "." not in key:
            assert yaml.safe_load(default) == value, key
        else:  # a nested section's: what its dataclass makes of the value shown is the default
            section, field = key.rsplit(".", 1)
            owner = type(getattr(cls(), section.split(".")[0]))
            assert getattr(owner(**{field: yaml.safe_load(default)}), field) == value, key


@pytest.mark.parametrize("name", list(COMMANDS))
def test_the_written_config_reads_back_as_the_defaults(name, tmp_path, capsys):
    cls = COMMANDS[name][1]
    out = tmp_path / "settings.yaml"
    main(["config", *name.split(), f"out={out}"])
    assert f"lmoe {name} --config {out}" in capsys.readouterr().out
    text = out.read_text()
    for key, f, _ in setting_fields(cls, cls()):
        comment = " ".join(line.strip(" #") for line in text.splitlines() if "#" in line)
        assert " ".join(f.metadata["help"].split()) in comment, key
    given = {  # a required setting is null in the file: given on the command line
        f.name: GIVEN[f.type.removesuffix(" | None")]
        for f in dataclasses.fields(cls)
        if f.metadata.get("required")
    }
    words = [f"{key}={json.dumps(value)}" for key, value in given.items()]
    assert load_settings(cls, out, words) == cls(**given)
    main(["config", *name.split()])  # no out=: printed
    assert capsys.readouterr().out == text


def test_an_unknown_key_is_one_line_naming_the_closest(capsys):
    for argv, line in [
        (
            ["eval", "modle=x"],
            "lmoe eval: error: EvalConfig has no field 'modle'. Did you mean 'model'?",
        ),
        (
            ["train", "lmoe.rnak=2"],
            "lmoe train: error: LMoEConfig has no field 'rnak'. Did you mean 'rank'?",
        ),
        (["eval", "mc.protocl=letter"], "Did you mean 'mc.protocol'?"),
        (["experts", "list", "mixtur=m"], "Did you mean 'mixture'?"),
        (["analyze", "nothing_like_it=1"], "Known keys: adapter, model, data, group, tokens"),
        (["config", "evl"], "no command 'evl'; give one of: train, eval,"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and line in err, (argv, err)


def test_values_parse_as_their_fields_type():
    parsed = apply_overrides(
        {},
        [
            "data=[a.jsonl, b.jsonl]",
            "prompts=What is 2 + 2? Say: four",  # text with ": " is text, and a list of one
            "model=123",  # a text setting keeps digits as text
            "adapter=None",
            "sample=true",
            "max_length=64",
            "temperature=1e-1",
            "json=null",
        ],
        GenerateConfig,
    )
    assert parsed == {
        "data": ["a.jsonl", "b.jsonl"],
        "prompts": ["What is 2 + 2? Say: four"],
        "model": "123",
        "adapter": None,
        "sample": True,
        "max_length": 64,
        "temperature": 0.1,
        "json": None,
    }
    nested = apply_overrides(
        {"lmoe": {"rank": 2}}, ["lmoe.num_experts=8", "frozen_experts=1"], TrainConfig
    )
    assert nested == {"lmoe": {"rank": 2, "num_experts": 8}, "frozen_experts": [1]}
    with pytest.raises(ValueError, match="must look like key=value"):
        apply_overrides({}, ["max_length"], EvalConfig)
    with pytest.raises(ValueError, match=r"EvalConfig.max_length='many' is invalid: expected int"):
        load_settings(EvalConfig, None, ["max_length=many"])
    with pytest.raises(ValueError, match=r"ExpertsRemoveConfig needs mixture=\.\.\."):
        load_settings(ExpertsRemoveConfig, None, ["experts=[1]"])


def test_the_command_line_wins_over_the_file(tmp_path):
    path = tmp_path / "analyze.yaml"
    path.write_text("adapter: runs/x/adapter\nmax_length: 100\ndata: one.jsonl\n")
    cfg = load_settings(AnalyzeConfig, path, ["max_length=200", "group=skill"])
    assert cfg == AnalyzeConfig(
        adapter="runs/x/adapter", max_length=200, data=["one.jsonl"], group="skill"
    )
    eval_file = tmp_path / "eval.yaml"
    eval_file.write_text("mc:\n  protocol: cloze\n")
    assert load_settings(EvalConfig, eval_file, ["mc.template=plain"]).mc.key == "cloze/plain"


def documented_commands() -> list[str]:
    """Every `lmoe ...` command line of README.md, docs/*.md and bench/*.md (code blocks and
    indented lines alike), from `lmoe` on, comments dropped."""
    root = Path(__file__).resolve().parent.parent
    pages = [root / "README.md", *sorted(root.glob("docs/*.md")), *sorted(root.glob("bench/*.md"))]
    found = []
    for page in pages:
        text = page.read_text().replace("\\\n", " ")  # continued lines as one
        for line in text.splitlines():
            match = re.search(r"(?:^\s*|bin/|-m |&& )(lmoe(?:\.cli)? .*)", line)
            command = r"lmoe(\.cli)? (train|eval|generate|analyze|compose|experts|config)(\s|$)"
            if match and re.match(command, match[1]) and "--help" not in match[1]:
                found.append(match[1].split("`")[0])
    return found


def test_every_documented_command_names_only_settings_its_command_has():
    commands = documented_commands()
    assert len(commands) > 20  # the pages' commands were found
    for line in commands:
        argv = [word for word in shlex.split(line, comments=True)[1:] if word != "..."]
        args = parser().parse_args(argv)  # an unknown flag exits
        if args.name == "config":
            continue
        cls = COMMANDS[args.name][1]
        data = apply_overrides({}, args.settings, cls)
        for key, value in data.items():  # known keys, a nested section's too
            section = dataclasses.fields(cls)
            assert key in [f.name for f in section], line
            if isinstance(value, dict):
                check_known_keys(typing.get_type_hints(cls)[key], value)
