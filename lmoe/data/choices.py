"""Multiple-choice questions: records, the two prompt protocols, and the token
requests that scoring needs.

A question record is {"question", "choices": [str, ...], "gold": index, "domain", "where"},
optionally "cloze": the prompt text lm-eval's cloze protocol shows instead of the question (e.g.
"Question: ...\nAnswer:"), and "cloze_choices": the texts it scores instead of the choices
(WinoGrande: each name with the sentence's rest).

- letter (LD-MoLE): the prompt lists the options ("Options:\nA. ...\nB. ...\nAnswer:"); the model's
  log-probabilities of the option letters at the answer position pick the choice; the training
  target is the letter.
- cloze (lm-eval): the summed log-likelihood of each choice's text after the prompt (acc), or that
  per character of the choice (acc_norm); the training target is the gold choice's text.

Either is rendered with the model's chat template (the prompt as the user turn, the answer as the
reply) or as plain text (prompt, then " " + answer: what lm-eval scores, for published
base-model figures).
- auto (the default): both are scored (the letter protocol costs one forward per question), and a
  question trains on the gold choice's text, cloze's target, which any model can learn from; letter
  targets (LD-MoLE's recipe) are one `mc.protocol=letter` away.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

from ..settings import setting
from .encoding import Example, chat, chat_segments, encode

log = logging.getLogger(__name__)

PROTOCOLS = ("letter", "cloze")  # the ways a question is put; "auto" (the default) scores both
AUTO = "auto"
TEMPLATES = ("chat", "plain")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
INSTRUCTION = "Below is a multiple-choice question. Choose the correct answer."


@dataclass
class MultipleChoice:
    """How multiple-choice data trains and is scored: protocol (letter, cloze, or auto: both scored,
    trained as cloze), template, and how many benchmark test questions per task to score (0: all;
    else a fixed, seed-independent subset)."""

    protocol: str = setting(
        AUTO,
        "letter (LD-MoLE's: the option letters' log-probabilities), cloze (lm-eval's: "
        "each choice's log-likelihood), or auto: both scored, trained as cloze",
    )
    template: str = setting(
        "chat", "chat: the model's chat template; plain: plain text, as lm-eval"
    )
    test_items: int = setting(
        0, "benchmark test questions scored per task, a fixed subset (0: all)"
    )

    def __post_init__(self) -> None:
        if self.protocol not in (AUTO, *PROTOCOLS):
            raise ValueError(
                f"mc.protocol={self.protocol!r} is invalid: expected one of "
                f"{', '.join((AUTO, *PROTOCOLS))}."
            )
        if self.template not in TEMPLATES:
            raise ValueError(
                f"mc.template={self.template!r} is invalid: expected one of {', '.join(TEMPLATES)}."
            )
        if (
            not isinstance(self.test_items, int)
            or isinstance(self.test_items, bool)
            or self.test_items < 0
        ):
            raise ValueError(
                f"mc.test_items={self.test_items!r} is invalid: expected an integer >= 0 (0 = all)."
            )

    def scored(self) -> list[MultipleChoice]:
        """The protocols a question is scored by, one each: auto gives letter and cloze."""
        return [replace(self, protocol=p) for p in PROTOCOLS] if self.protocol == AUTO else [self]

    def trained(self) -> MultipleChoice:
        """The protocol whose target a question trains on: auto trains on the gold
        choice's text (cloze's)."""
        return replace(self, protocol="cloze") if self.protocol == AUTO else self

    @property
    def key(self) -> str:
        """What results name this protocol by, e.g. "letter/chat" (protocol/template)."""
        return f"{self.protocol}/{self.template}"


def choice_record(row: dict, domain: str, where: str) -> dict:
    """A question record from a user row {"question", "choices", "answer": index or
    one of the choices}."""
    try:
        question, choices, answer = row["question"], row["choices"], row["answer"]
        if not isinstance(question, str) or not isinstance(choices, list) or len(choices) < 2:
            raise ValueError("a question string and at least two choices")
        choices = [str(c) for c in choices]
        gold = choices.index(answer) if isinstance(answer, str) else int(answer)
        if not 0 <= gold < len(choices):
            raise ValueError(f"answer index {gold} out of range")
    except (KeyError, ValueError, TypeError) as err:
        raise ValueError(
            f'{where}: expected {{"question": str, "choices": [str, ...], "answer": index or one '
            f"of the choices}} ({err})."
        ) from err
    if len(choices) > len(LETTERS):
        raise ValueError(
            f"{where}: {len(choices)} choices; the letter protocol names at most {len(LETTERS)}."
        )
    return {
        "question": question,
        "choices": choices,
        "gold": gold,
        "domain": str(row.get("domain") or domain),
        "where": where,
    }


def letter_prompt(record: dict) -> str:
    options = "".join(
        f"{letter}. {choice}\n" for letter, choice in zip(LETTERS, record["choices"], strict=False)
    )
    return f"{INSTRUCTION}\n{record['question']}\nOptions:\n{options}Answer:"


def prompt_text(record: dict, fmt: MultipleChoice) -> str:
    return (
        letter_prompt(record)
        if fmt.protocol == "letter"
        else record.get("cloze", record["question"])
    )


def answers(record: dict, fmt: MultipleChoice) -> list[str]:
    """What the model may answer, one per choice: the letters, or the choice texts."""
    if fmt.protocol == "letter":
        return list(LETTERS[: len(record["choices"])])
    return record.get("cloze_choices", record["choices"])


def segments(tokenizer, record: dict, fmt: MultipleChoice, answer: str) -> list[tuple[str, bool]]:
    """(text, is_answer) pieces of the prompt followed by one answer."""
    prompt = prompt_text(record, fmt)
    if fmt.template == "chat":
        return chat_segments(tokenizer, chat(prompt, answer))
    return [(prompt, False), (" " + answer, True)]


def training_record(record: dict, fmt: MultipleChoice) -> dict:
    """The record a question trains as: its prompt, and the gold letter or choice
    text as the answer."""
    fmt = fmt.trained()
    answer = answers(record, fmt)[record["gold"]]
    prompt = prompt_text(record, fmt)
    if fmt.template == "chat":
        return {"messages": chat(prompt, answer), "domain": record["domain"]}
    return {"segments": [(prompt, False), (" " + answer, True)], "domain": record["domain"]}


def encode_questions(
    tokenizer, records: list[dict], fmt: MultipleChoice, max_length: int
) -> list[Example]:
    """Training examples of question records; a long one loses the beginning of its prompt, never
    its answer (the answer ends the example). Warns once how many were cut."""
    examples, cut = [], 0
    for record in records:
        ex = encode(tokenizer, training_record(record, fmt))
        cut += len(ex.input_ids) > max_length
        examples.append(Example(ex.input_ids[-max_length:], ex.labels[-max_length:], ex.domain))
    if cut:
        log.warning(
            "lmoe: %d of %d multiple-choice training examples were longer than max_length=%d "
            "tokens; their prompt's beginning was cut (the answers are whole). Raise max_length "
            "to keep them.",
            cut,
            len(records),
            max_length,
        )
    return examples


def request(tokenizer, record: dict, fmt: MultipleChoice) -> tuple[list[int], list[list[int]]]:
    """(prompt token ids, token ids of each answer), each piece tokenised on its own as training
    does. Letter answers keep only the tokens that tell them apart (see distinct_heads)."""
    if fmt.protocol == AUTO:
        raise ValueError(
            "lmoe.data.choices.request scores one protocol at a time: pass each of fmt.scored()."
        )
    prefix, continuations = None, []
    for answer in answers(record, fmt):
        pieces = segments(tokenizer, record, fmt, answer)
        head = "".join(text for text, is_answer in pieces if not is_answer)
        tail = "".join(text for text, is_answer in pieces if is_answer)
        if prefix is not None and head != prefix:
            raise ValueError(
                f"{record['where']}: the chat template renders the prompt differently per answer; "
                "multiple-choice scoring needs one prompt shared by all choices."
            )
        prefix = head
        continuations.append(tokenizer(tail, add_special_tokens=False)["input_ids"])
    if fmt.protocol == "letter":
        continuations = distinct_heads(continuations, record["where"])
    return tokenizer(prefix, add_special_tokens=False)["input_ids"], continuations


def distinct_heads(continuations: list[list[int]], where: str) -> list[list[int]]:
    """The fewest leading tokens that tell the letter answers apart: the letter token itself with
    the usual tokenizers (then one forward of the prompt scores every option), more where a
    tokenizer splits it."""
    for k in range(1, max(len(c) for c in continuations) + 1):
        heads = [c[:k] for c in continuations]
        if len({tuple(h) for h in heads}) == len(heads):
            return heads
    raise ValueError(
        f"{where}: two option letters tokenise alike; use mc.protocol=cloze with this tokenizer."
    )


def fit(
    prefix: list[int], continuations: list[list[int]], max_length: int, where: str
) -> list[int]:
    """The prompt, cut from the left so that it and the longest answer fit max_length tokens;
    answers are never cut. An answer that leaves no room for a prompt token is an error
    naming the question."""
    longest = max(len(c) for c in continuations)
    if not prefix or not all(continuations):
        raise ValueError(
            f"{where}: the question or a choice renders to no tokens; give it some text."
        )
    if longest >= max_length:
        raise ValueError(
            f"{where}: a choice is {longest} tokens, which leaves no room for the question within "
            f"max_length={max_length}; raise max_length (or shorten the choice)."
        )
    room = max_length - longest
    return prefix[-room:] if len(prefix) > room else prefix


def requests(
    tokenizer, records: list[dict], fmt: MultipleChoice, max_length: int
) -> list[tuple[list[int], list[list[int]]]]:
    """Every question's request, fitted to max_length; warns once how many prompts
    lost their beginning."""
    out, cut = [], 0
    for record in records:
        prefix, continuations = request(tokenizer, record, fmt)
        fitted = fit(prefix, continuations, max_length, record["where"])
        cut += len(fitted) < len(prefix)
        out.append((fitted, continuations))
    if cut:
        log.warning(
            "lmoe: %d of %d multiple-choice prompts were longer than max_length=%d tokens with "
            "their answer; their beginning was cut (the answers are whole). Raise max_length to "
            "keep them.",
            cut,
            len(records),
            max_length,
        )
    return out
