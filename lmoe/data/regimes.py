"""Generated data for the question "where does a mixture beat a LoRA of equal parameters?"
(bench/regimes.py runs the study): chat JSONL that `lmoe train data=[...]` and `lmoe eval --data`
read, one {"prompt", "completion", "domain", "input"} record a line.

- conflict: one kind of input (three words) mapped differently under each domain's opaque code,
  "[code K7Q] apple tiger window" -> "window tiger apple" in one domain, "atw" in another: the
  same inputs with different answers, the domain visible only through the code. Every input
  appears under every domain, on the same side of the split.
- tasks_N (N = 2, 4, 8, 16): N tasks with clashing output formats (JSON, brackets, pipes,
  numbered) over four operations on three words, behind opaque task codes, at a fixed total of
  training examples, so that each task gets total / N of them.
- retention: one narrow skill of lmoe.data.skills to fine-tune on for long, its test side, and
  the built-in conversations' test side (lmoe.data.builtin) for the base model's perplexity.

Every generator splits by a hash of the input (lmoe.data.skills.split_draws, one key space for
all of them): an input is on the same side, train or test, in every domain, task and regime, so
no test input is ever trained on. Short exact answers, for greedy exact match.

    python -m lmoe.data.regimes OUT_DIR [--seed 0]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .builtin import Mixture
from .skills import SKILLS, WORDS, generate, split_draws

WORD_SPACE = "words"  # the key space of every three-word input (the split's hash reads it)
WORDS_PER_INPUT = 3
CODE_LETTERS = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"  # no I, O, 0, 1: codes read unambiguously

# conflict: what each domain answers for the same three words (the first `domains` of them are used)
MAPPINGS: dict[str, Callable[[list[str]], str]] = {
    "reverse": lambda words: " ".join(reversed(words)),
    "initials": lambda words: "".join(w[0] for w in words),
    "sorted": lambda words: " ".join(sorted(words)),
    "last_twice": lambda words: f"{words[-1]} {words[-1]}",
    "rotate": lambda words: " ".join(words[1:] + words[:1]),
    "lengths": lambda words: " ".join(str(len(w)) for w in words),
    "first_last": lambda words: f"{words[0]} {words[-1]}",
    "last_letters": lambda words: "".join(w[-1] for w in words),
}

# tasks: an operation picks the items, a format writes them
OPERATIONS: dict[str, Callable[[list[str]], list[str]]] = {
    "copy": lambda words: list(words),
    "reverse": lambda words: list(reversed(words)),
    "sort": lambda words: sorted(words),
    "initials": lambda words: [w[0] for w in words],
}
FORMATS: dict[str, Callable[[list[str]], str]] = {
    "json": lambda items: json.dumps(items),
    "brackets": lambda items: " ".join(f"[{item}]" for item in items),
    "pipes": lambda items: " | ".join(items),
    "numbered": lambda items: " ".join(f"{i}) {item}" for i, item in enumerate(items, start=1)),
}


def task_list() -> list[tuple[str, str]]:
    """The 16 (operation, format) tasks in the order a study adds them: task i does operation
    i mod 4 in format (i mod 4 + i div 4) mod 4, so the first 2 and the first 4 differ in both,
    and every pair appears once in 16."""
    operations, formats = list(OPERATIONS), list(FORMATS)
    return [(operations[i % 4], formats[(i % 4 + i // 4) % 4]) for i in range(16)]


def opaque_code(name: str) -> str:
    """Three characters from a hash of the name: the same everywhere, saying nothing of the rule."""
    return "".join(
        CODE_LETTERS[b % len(CODE_LETTERS)] for b in hashlib.sha256(name.encode()).digest()[:3]
    )


def record(prompt: str, answer: str, domain: str, key: str) -> dict:
    return {"prompt": prompt, "completion": answer, "domain": domain, "input": key}


def draw_words(rng: random.Random) -> tuple[str, list[str]]:
    words = rng.sample(WORDS, WORDS_PER_INPUT)
    return " ".join(words), words


def conflict(n_inputs: int, split: str, seed: int, domains: int = 4) -> list[dict]:
    """n_inputs inputs of one side, each under each of the first `domains` MAPPINGS, as records.

    An input whose answers coincide in two domains (three words already in sorted order read
    the same sorted and as they are) is drawn again: every input conflicts in every domain.
    """
    if not 2 <= domains <= len(MAPPINGS):
        raise ValueError(f"conflict: domains={domains}; expected 2 to {len(MAPPINGS)}.")
    names = list(MAPPINGS)[:domains]

    def draw(rng: random.Random) -> tuple[str, list[str]]:
        while True:
            key, words = draw_words(rng)
            if len({MAPPINGS[name](words) for name in names}) == len(names):
                return key, words

    records = []
    for key, words in split_draws(draw, n_inputs, split, f"{seed}/conflict", WORD_SPACE):
        for name in names:
            code = opaque_code(f"conflict/{name}")
            records.append(record(f"[code {code}] {key}", MAPPINGS[name](words), name, key))
    return records


def tasks(n_tasks: int, total: int, split: str, seed: int) -> list[dict]:
    """The first n_tasks of task_list(), total // n_tasks records each (total must divide)."""
    if not 1 <= n_tasks <= 16 or total % n_tasks:
        raise ValueError(
            f"tasks: {n_tasks} tasks of {total} examples in all; expected 1 to 16 tasks "
            "that divide the total."
        )
    records = []
    for operation, fmt in task_list()[:n_tasks]:
        name = f"{operation}_{fmt}"
        code = opaque_code(f"tasks/{name}")
        stream = f"{seed}/tasks/{name}"
        for key, words in split_draws(draw_words, total // n_tasks, split, stream, WORD_SPACE):
            answer = FORMATS[fmt](OPERATIONS[operation](words))
            records.append(record(f"[task {code}] {key}", answer, name, key))
    return records


def narrow(skill: str, n: int, split: str, seed: int) -> list[dict]:
    """n items of one lmoe.data.skills skill (the retention regime's narrow task)."""
    if skill not in SKILLS:
        raise ValueError(f"retention: unknown skill {skill!r}; known: {', '.join(SKILLS)}.")
    return [
        record(prompt, answer, skill, prompt) for prompt, answer in generate(skill, n, split, seed)
    ]


@dataclass
class RegimeSizes:
    """How many records each regime's files hold (bench/regimes.py says why these)."""

    conflict_domains: int = 4
    conflict_train_inputs: int = 300  # x domains training records
    conflict_test_inputs: int = 50  # x domains test items
    task_counts: list[int] = field(default_factory=lambda: [2, 4, 8, 16])
    tasks_train_total: int = 480  # the same total at every task count
    tasks_test_total: int = 240
    retention_skill: str = "add"
    retention_train: int = 2400
    retention_test: int = 200


def regime_files(
    sizes: RegimeSizes, seed: int, conversations: bool = True
) -> dict[str, list[dict]]:
    """Every file of the study (relative path -> records), train files shuffled (by the seed);
    conversations=False leaves out retention/conversations_test.jsonl (seconds to parse)."""
    files = {
        "conflict/train.jsonl": conflict(
            sizes.conflict_train_inputs, "train", seed, sizes.conflict_domains
        ),
        "conflict/test.jsonl": conflict(
            sizes.conflict_test_inputs, "test", seed, sizes.conflict_domains
        ),
    }
    for n in sizes.task_counts:
        files[f"tasks_{n}/train.jsonl"] = tasks(n, sizes.tasks_train_total, "train", seed)
        files[f"tasks_{n}/test.jsonl"] = tasks(n, sizes.tasks_test_total, "test", seed)
    skill = sizes.retention_skill
    files["retention/train.jsonl"] = narrow(skill, sizes.retention_train, "train", seed)
    files["retention/test.jsonl"] = narrow(skill, sizes.retention_test, "test", seed)
    if conversations:
        built_in = Mixture(skills=[], seed=seed)
        files["retention/conversations_test.jsonl"] = built_in.conversations("test")
    for path, records in files.items():
        if path.endswith("/train.jsonl"):
            random.Random(f"{seed}/{path}").shuffle(records)
    return files


def write_regimes(
    out_dir: str | Path, seed: int = 0, sizes: RegimeSizes | None = None, conversations: bool = True
) -> dict:
    """Write every regime's files under out_dir (each atomically) and regimes.json, which says
    what they hold; the same seed and sizes write the same bytes.

    Args:
        out_dir: where; created if missing, files of the same names replaced.
        seed: the data seed (inputs drawn, train files' order); the split does not depend on it.
        sizes: records per file (RegimeSizes' defaults: the study's).
        conversations: False leaves out the built-in conversations' test file.

    Returns:
        regimes.json's content: the seed, the sizes and the records per file.
    """
    sizes = sizes or RegimeSizes()
    out_dir = Path(out_dir)
    files = regime_files(sizes, seed, conversations)
    for path, records in files.items():
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        _write_whole(out_dir / path, text)
    manifest = {
        "seed": seed,
        "sizes": asdict(sizes),
        "records": {path: len(records) for path, records in files.items()},
    }
    text = json.dumps(manifest, indent=2) + "\n"
    _write_whole(out_dir / "regimes.json", text)
    return manifest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m lmoe.data.regimes",
        description="Write the train/test JSONL files of the mixture-vs-LoRA regimes "
        "(conflict, tasks_N, retention) into OUT_DIR.",
    )
    parser.add_argument("out_dir", metavar="OUT_DIR")
    parser.add_argument("--seed", type=int, default=0, help="data seed (default 0)")
    parser.add_argument("--conflict-domains", type=int, default=RegimeSizes.conflict_domains)
    parser.add_argument("--retention-skill", default=RegimeSizes.retention_skill, choices=SKILLS)
    args = parser.parse_args(argv)
    sizes = RegimeSizes(
        conflict_domains=args.conflict_domains, retention_skill=args.retention_skill
    )
    try:
        manifest = write_regimes(args.out_dir, args.seed, sizes)
    except (ValueError, OSError) as err:
        parser.exit(2, f"{parser.prog}: {err}\n")
    for path, count in manifest["records"].items():
        print(f"{Path(args.out_dir) / path}: {count} records")


def _write_whole(path: Path, text: str) -> None:
    """text into path through a temporary file renamed over it: a stopped run leaves the old file
    or the new one, never half of one (lmoe.io.atomic_write is the mixture's, which data may not
    import)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, "utf-8")
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
