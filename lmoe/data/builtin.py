"""The built-in data: conversation domains of chatterbot-corpus (installed with --no-deps) and the
generated skills, split into train and test sides by a hash."""

from __future__ import annotations

import importlib.metadata
import random
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import yaml

from ..settings import setting
from .encoding import chat
from .skills import SKILLS, generate
from .splits import held_out

CORPUS_PACKAGE = "chatterbot-corpus"


def corpus_root() -> Path:
    try:
        root = Path(
            importlib.metadata.distribution(CORPUS_PACKAGE).locate_file("chatterbot_corpus/data")
        )
    except importlib.metadata.PackageNotFoundError:
        root = None
    if root is None or not root.is_dir():
        raise FileNotFoundError(
            f"The built-in conversations need {CORPUS_PACKAGE}: "
            f"pip install --no-deps {CORPUS_PACKAGE}==1.3.3"
        )
    return root


def conversation_pairs(domain: str) -> list[tuple[str, str]]:
    """(statement, reply) pairs of a corpus domain "language" or "language/cat1+cat2"
    (consecutive turns)."""
    language, _, categories = domain.partition("/")
    folder = corpus_root() / language
    files = (
        sorted(folder.glob("*.yml"))
        if not categories
        else [folder / f"{c}.yml" for c in categories.split("+")]
    )
    if not files or not all(f.is_file() for f in files):
        raise ValueError(
            f"Unknown conversation domain {domain!r}: languages are folders of {corpus_root()}, "
            "categories their .yml files."
        )
    pairs = []
    for file in files:
        for turns in yaml.safe_load(file.read_text(encoding="utf-8")).get("conversations") or []:
            turns = [str(t).strip() for t in turns if t is not None]
            pairs += [(a, b) for a, b in pairwise(turns) if a and b]
    return pairs


@dataclass
class Mixture:
    """The built-in task mixture: corpus conversation domains plus generated skills
    with exact answers."""

    domains: list[str] = setting(
        factory=lambda: [
            "english/tech_support",
            "english/emotion+psychology",
            "spanish",
            "italian",
            "german",
            "portuguese",
        ],
        help="chatterbot-corpus domains: a language, or language/category+category",
    )
    skills: list[str] = setting(
        factory=lambda: ["add", "number_words", "sort", "reverse_words", "count_letters"],
        help="generated skills with exact answers (lmoe.data.skills.SKILLS)",
    )
    per_domain: int = setting(120, "training pairs per conversation domain (at most)")
    per_skill: int = setting(120, "training items per skill")
    test_per_domain: int = setting(30, "held-out pairs per domain")
    test_per_skill: int = setting(30, "held-out items per skill")
    held_out_fraction: float = setting(0.15, "share of each domain's pairs held out (by a hash)")
    seed: int = setting(0, "seed of the data order and the generated skill items")

    def __post_init__(self) -> None:
        unknown = [s for s in self.skills if s not in SKILLS]
        if unknown:
            raise ValueError(
                f"Mixture.skills: unknown {unknown}; known skills are {', '.join(SKILLS)}."
            )
        for name in ("per_domain", "per_skill", "test_per_domain", "test_per_skill"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(
                    f"Mixture.{name}={getattr(self, name)!r} is invalid: expected an integer >= 0."
                )
        if not 0 < self.held_out_fraction < 1:
            raise ValueError(
                f"Mixture.held_out_fraction={self.held_out_fraction!r}: expected a number in (0, "
                "1)."
            )

    def conversations(self, split: str) -> list[dict]:
        """Records of every domain's train or test side (split by a hash of the statement)."""
        records = []
        for domain in self.domains:
            pairs = [
                p
                for p in conversation_pairs(domain)
                if held_out(domain + p[0], self.held_out_fraction) == (split == "test")
            ]
            random.Random(f"{self.seed}/{domain}").shuffle(pairs)
            limit = self.test_per_domain if split == "test" else self.per_domain
            records += [{"messages": chat(q, a), "domain": domain} for q, a in pairs[:limit]]
        return records

    def skill_items(self, split: str) -> list[dict]:
        """Records with an exact "answer" for every skill; train and test items never
        share a question."""
        n = self.test_per_skill if split == "test" else self.per_skill
        records = []
        for skill in self.skills:
            for prompt, answer in generate(skill, n, split, self.seed):
                records.append(
                    {"messages": chat(prompt, answer), "domain": skill, "answer": answer}
                )
        return records

    def train_records(self) -> list[dict]:
        return self.conversations("train") + self.skill_items("train")
