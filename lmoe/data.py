"""Datasets as chat examples with labels on the answer tokens only: built-in tasks and user files.

A record is {"messages": [{"role", "content"}, ...], "domain": str}, {"text": str, "domain": str}, or
{"segments": [(text, is_answer), ...], "domain": str} (plain text with the loss on the answer pieces);
a multiple-choice row becomes a question record that lmoe.choices.training_record turns into one of
those. Records become Examples (token ids + labels, -100 where no loss) with the tokenizer's chat
template, and Examples become length-bucketed padded batches.
"""
from __future__ import annotations

import importlib.metadata
import json
import logging
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from torch import Tensor

from .skills import SKILLS, generate
from .splits import held_out

log = logging.getLogger(__name__)

IGNORE = -100  # label of tokens without loss (prompt, padding)
# Used only when a tokenizer has no chat template of its own (e.g. a base GPT-2).
FALLBACK_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                     "{% if add_generation_prompt %}assistant: {% endif %}")
CORPUS_PACKAGE = "chatterbot-corpus"


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss
    domain: str = "data"


# ---------------------------------------------------------------- records from user files

def read_records(path: str | Path, domain: str | None = None) -> list[dict]:
    """Records from JSONL (prompt/completion, messages or text), or CSV/JSON/Parquet through `datasets`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Data file {path} does not exist.")
    domain = domain or path.stem
    if path.suffix == ".jsonl":
        rows = _read_jsonl(path)
    elif path.suffix in (".csv", ".json", ".parquet"):
        rows = _read_with_datasets(path)
    else:
        raise ValueError(f"Data file {path}: expected .jsonl, .csv, .json or .parquet, got {path.suffix or 'no suffix'}.")
    records = [to_record(row, domain, f"{path}:{i}") for i, row in rows]
    if not records:
        raise ValueError(f"Data file {path} holds no records; add one per line, e.g. "
                         '{"prompt": "...", "completion": "..."}, {"messages": [...]} or {"text": "..."}.')
    return records


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not valid JSON ({err.msg} at column {err.colno}); "
                                 "each line must be one JSON object.") from err
            yield number, row


def _read_with_datasets(path: Path) -> Iterator[tuple[int, dict]]:
    from datasets import load_dataset  # imported here: slow to import, and only these formats need it
    kind = {".csv": "csv", ".json": "json", ".parquet": "parquet"}[path.suffix]
    table = load_dataset(kind, data_files=str(path), split="train")
    for number, row in enumerate(table, start=1):
        yield number, row


def to_record(row: object, domain: str, where: str) -> dict:
    """Normalise one row ({prompt, completion} | {messages} | {text} | {question, choices, answer}) to a
    record; say where a bad one is."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}.")
    if "choices" in row:
        from .choices import choice_record  # lmoe.choices builds on this module
        return choice_record(row, domain, where)
    domain = str(row.get("domain") or domain)
    if "messages" in row:
        messages = row["messages"]
        ok = isinstance(messages, list) and messages and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages)
        if not ok or not any(m["role"] == "assistant" for m in messages):
            raise ValueError(f"{where}: 'messages' must be a list of {{'role', 'content'}} strings "
                             "with at least one assistant turn.")
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in messages], "domain": domain}
    if isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str):
        return {"messages": chat(row["prompt"], row["completion"]), "domain": domain}
    if isinstance(row.get("text"), str):
        return {"text": row["text"], "domain": domain}
    raise ValueError(f"{where}: expected keys prompt+completion, messages, or text (strings), "
                     "or question+choices+answer; "
                     f"got {sorted(row)}.")


def chat(prompt: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


# ---------------------------------------------------------------- records -> token ids with labels

def ensure_chat_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = FALLBACK_TEMPLATE


def render_prompt(tokenizer, messages: list[dict]) -> str:
    """The chat-template text of messages followed by the assistant header (what generation continues)."""
    ensure_chat_template(tokenizer)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def chat_segments(tokenizer, messages: list[dict]) -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, is_answer) pieces; an answer piece is an assistant turn
    with its end-of-turn marker, exactly the text the model must generate after the assistant header."""
    ensure_chat_template(tokenizer)
    segments, done = [], ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages[:i + 1], tokenize=False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise ValueError("The chat template does not render conversations prefix by prefix; "
                             "answer-only labels need a template where each turn appends text.")
        segments += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    return [(text, is_answer) for text, is_answer in segments if text]


def encode(tokenizer, record: dict) -> Example:
    """Token ids and labels of one record: loss on answer tokens (chat) or on every token (text).

    Each segment is tokenised on its own, so the answer tokens are the ones greedy generation emits.
    """
    if "text" in record:
        ids = tokenizer(record["text"], add_special_tokens=True)["input_ids"]
        if tokenizer.eos_token_id is not None:
            ids = ids + [tokenizer.eos_token_id]
        return Example(ids, list(ids), record["domain"])
    if "choices" in record:
        raise ValueError(f"{record['where']}: a multiple-choice question trains through "
                         "lmoe.choices.training_record(record, MultipleChoice(...)), which picks its prompt protocol.")
    pieces = record["segments"] if "segments" in record else chat_segments(tokenizer, record["messages"])
    input_ids, labels = [], []
    for text, is_answer in pieces:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        input_ids += ids
        labels += ids if is_answer else [IGNORE] * len(ids)
    return Example(input_ids, labels, record["domain"])


def encode_all(tokenizer, records: Iterable[dict], max_length: int) -> list[Example]:
    """Encode and truncate to max_length tokens, warning once with how many were cut and how many of
    those lost every answer token (they are left out: nothing to learn or score)."""
    examples, cut, dropped, total = [], 0, 0, 0
    for total, record in enumerate(records, start=1):
        ex = encode(tokenizer, record)
        long = len(ex.input_ids) > max_length
        if long:
            ex = Example(ex.input_ids[:max_length], ex.labels[:max_length], ex.domain)
        keep = any(label != IGNORE for label in ex.labels[1:])  # the first label is never predicted
        cut, dropped = cut + long, dropped + (long and not keep)
        if keep:
            examples.append(ex)
    if cut:
        log.warning("lmoe: %d of %d examples were longer than max_length=%d tokens and were truncated (%d of them "
                    "lost their whole answer and were left out); raise max_length to keep them whole.",
                    cut, total, max_length, dropped)
    return examples


# ---------------------------------------------------------------- batches

def collate(examples: list[Example], pad_id: int) -> dict[str, Tensor]:
    """Right-padded input_ids (batch, T), labels (batch, T) with IGNORE on padding, attention_mask."""
    width = max(len(ex.input_ids) for ex in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, ex in enumerate(examples):
        n = len(ex.input_ids)
        ids[row, :n] = torch.tensor(ex.input_ids)
        labels[row, :n] = torch.tensor(ex.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def bucketed_batches(examples: list[Example], batch_size: int, seed: int, pool: int = 32) -> list[list[int]]:
    """One epoch of batches (lists of example indices): shuffle, sort by length within pools of
    pool*batch_size examples so a batch holds similar lengths (little padding), then shuffle the batches."""
    rng = random.Random(seed)
    order = list(range(len(examples)))
    rng.shuffle(order)
    batches = []
    for start in range(0, len(order), pool * batch_size):
        chunk = sorted(order[start:start + pool * batch_size], key=lambda i: len(examples[i].input_ids))
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def batch_stream(examples: list[Example], batch_size: int, seed: int, start: int = 0) -> Iterator[list[Example]]:
    """Endless batches, epoch after epoch (epoch e shuffled with seed + e), from batch number `start` on,
    so a resumed run sees exactly the batches the uninterrupted run would have."""
    if not examples:
        raise ValueError("No training examples: the data is empty or every example lacks answer tokens.")
    per_epoch = len(bucketed_batches(examples, batch_size, seed))
    epoch, skip = divmod(start, per_epoch)
    while True:
        for batch in bucketed_batches(examples, batch_size, seed + epoch)[skip:]:
            yield [examples[i] for i in batch]
        epoch, skip = epoch + 1, 0


# ---------------------------------------------------------------- built-in data

def corpus_root() -> Path:
    try:
        root = Path(importlib.metadata.distribution(CORPUS_PACKAGE).locate_file("chatterbot_corpus/data"))
    except importlib.metadata.PackageNotFoundError:
        root = None
    if root is None or not root.is_dir():
        raise FileNotFoundError(f"The built-in conversations need {CORPUS_PACKAGE}: "
                                f"pip install --no-deps {CORPUS_PACKAGE}==1.3.3")
    return root


def conversation_pairs(domain: str) -> list[tuple[str, str]]:
    """(statement, reply) pairs of a corpus domain "language" or "language/cat1+cat2" (consecutive turns)."""
    language, _, categories = domain.partition("/")
    folder = corpus_root() / language
    files = sorted(folder.glob("*.yml")) if not categories else [folder / f"{c}.yml" for c in categories.split("+")]
    if not files or not all(f.is_file() for f in files):
        raise ValueError(f"Unknown conversation domain {domain!r}: languages are folders of {corpus_root()}, "
                         "categories their .yml files.")
    pairs = []
    for file in files:
        for turns in yaml.safe_load(file.read_text(encoding="utf-8")).get("conversations") or []:
            turns = [str(t).strip() for t in turns if t is not None]
            pairs += [(a, b) for a, b in zip(turns, turns[1:]) if a and b]
    return pairs


@dataclass
class Mixture:
    """The built-in task mixture: corpus conversation domains plus generated skills with exact answers."""

    domains: list[str] = field(default_factory=lambda: [
        "english/tech_support", "english/emotion+psychology", "spanish", "italian", "german", "portuguese"])
    skills: list[str] = field(default_factory=lambda: ["add", "number_words", "sort", "reverse_words", "count_letters"])
    per_domain: int = 120  # training pairs per conversation domain (at most)
    per_skill: int = 120  # training items per skill
    test_per_domain: int = 30
    test_per_skill: int = 30
    held_out_fraction: float = 0.15
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = [s for s in self.skills if s not in SKILLS]
        if unknown:
            raise ValueError(f"Mixture.skills: unknown {unknown}; known skills are {', '.join(SKILLS)}.")
        for name in ("per_domain", "per_skill", "test_per_domain", "test_per_skill"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"Mixture.{name}={getattr(self, name)!r} is invalid: expected an integer >= 0.")
        if not 0 < self.held_out_fraction < 1:
            raise ValueError(f"Mixture.held_out_fraction={self.held_out_fraction!r}: expected a number in (0, 1).")

    def conversations(self, split: str) -> list[dict]:
        """Records of every domain's train or test side (split by a hash of the statement)."""
        records = []
        for domain in self.domains:
            pairs = [p for p in conversation_pairs(domain)
                     if held_out(domain + p[0], self.held_out_fraction) == (split == "test")]
            random.Random(f"{self.seed}/{domain}").shuffle(pairs)
            limit = self.test_per_domain if split == "test" else self.per_domain
            records += [{"messages": chat(q, a), "domain": domain} for q, a in pairs[:limit]]
        return records

    def skill_items(self, split: str) -> list[dict]:
        """Records with an exact "answer" for every skill; train and test items never share a question."""
        n = self.test_per_skill if split == "test" else self.per_skill
        records = []
        for skill in self.skills:
            for prompt, answer in generate(skill, n, split, self.seed):
                records.append({"messages": chat(prompt, answer), "domain": skill, "answer": answer})
        return records

    def train_records(self) -> list[dict]:
        return self.conversations("train") + self.skill_items("train")
