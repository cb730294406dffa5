"""Records as token ids with labels on the answer tokens only, and Examples as padded batches.

A record is {"messages": [{"role", "content"}, ...], "domain": str}, {"text": str, "domain": str},
or {"segments": [(text, is_answer), ...], "domain": str} (plain text with the loss on the answer
pieces). Records become Examples (token ids + labels, -100 where no loss) with the tokenizer's chat
template, and Examples become length-bucketed padded batches.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

log = logging.getLogger(__name__)

IGNORE = -100  # label of tokens without loss (prompt, padding)
# Used only when a tokenizer has no chat template of its own (e.g. a base GPT-2).
FALLBACK_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss
    domain: str = "data"


def chat(prompt: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def ensure_chat_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = FALLBACK_TEMPLATE


def render_prompt(tokenizer, messages: list[dict]) -> str:
    """The chat-template text of messages followed by the assistant header (what
    generation continues)."""
    ensure_chat_template(tokenizer)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def chat_segments(tokenizer, messages: list[dict]) -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, is_answer) pieces; an answer piece is an assistant
    turn with its end-of-turn marker, exactly the text the model must generate after the
    assistant header."""
    ensure_chat_template(tokenizer)
    segments, done = [], ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(
            messages[:i], tokenize=False, add_generation_prompt=True
        )
        full = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise ValueError(
                "The chat template does not render conversations prefix by prefix; "
                "answer-only labels need a template where each turn appends text."
            )
        segments += [(prompt[len(done) :], False), (full[len(prompt) :], True)]
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
        raise ValueError(
            f"{record['where']}: a multiple-choice question trains through "
            "lmoe.data.choices.training_record(record, MultipleChoice(...)), which picks its "
            "prompt protocol."
        )
    pieces = (
        record["segments"] if "segments" in record else chat_segments(tokenizer, record["messages"])
    )
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
    for record in records:
        total += 1
        ex = encode(tokenizer, record)
        long = len(ex.input_ids) > max_length
        if long:
            ex = Example(ex.input_ids[:max_length], ex.labels[:max_length], ex.domain)
        keep = any(label != IGNORE for label in ex.labels[1:])  # the first label is never predicted
        cut, dropped = cut + long, dropped + (long and not keep)
        if keep:
            examples.append(ex)
    if cut:
        log.warning(
            "lmoe: %d of %d examples were longer than max_length=%d tokens and were truncated (%d "
            "of them lost their whole answer and were left out); raise max_length to keep them "
            "whole.",
            cut,
            total,
            max_length,
            dropped,
        )
    return examples


# ---------------------------------------------------------------- batches


def collate(examples: list[Example], pad_id: int, left: bool = False) -> dict[str, Tensor]:
    """Right-padded (left=True: left-padded) input_ids (batch, T), labels (batch, T) with IGNORE
    on padding, attention_mask."""
    width = max(len(ex.input_ids) for ex in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, ex in enumerate(examples):
        n = len(ex.input_ids)
        place = slice(width - n, width) if left else slice(0, n)
        ids[row, place] = torch.tensor(ex.input_ids)
        labels[row, place] = torch.tensor(ex.labels)
        mask[row, place] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def bucketed_batches(
    examples: list[Example], batch_size: int, seed: int, pool: int = 32
) -> list[list[int]]:
    """One epoch of batches (lists of example indices): shuffle, sort by length within pools of
    pool*batch_size examples so a batch holds similar lengths (little padding), then
    shuffle the batches."""
    rng = random.Random(seed)
    order = list(range(len(examples)))
    rng.shuffle(order)
    batches = []
    for start in range(0, len(order), pool * batch_size):
        chunk = sorted(
            order[start : start + pool * batch_size], key=lambda i: len(examples[i].input_ids)
        )
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def batch_stream(
    examples: list[Example], batch_size: int, seed: int, start: int = 0
) -> Iterator[list[Example]]:
    """Endless batches, epoch after epoch (epoch e shuffled with seed + e), from batch number
    `start` on, so a resumed run sees exactly the batches the uninterrupted run would have."""
    if not examples:
        raise ValueError(
            "No training examples: the data is empty or every example lacks answer tokens."
        )
    per_epoch = len(bucketed_batches(examples, batch_size, seed))
    epoch, skip = divmod(start, per_epoch)
    while True:
        for batch in bucketed_batches(examples, batch_size, seed + epoch)[skip:]:
            yield [examples[i] for i in batch]
        epoch, skip = epoch + 1, 0
