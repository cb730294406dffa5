"""What a training run reads: its training examples and the held-out ones that eval_every scores."""

from __future__ import annotations

from ..data.benchmarks import is_choice_file, read_data
from ..data.choices import encode_questions
from ..data.encoding import Example, encode_all
from ..data.records import read_records
from .config import TrainConfig


def training_examples(cfg: TrainConfig, tokenizer) -> list[Example]:
    records = (
        cfg.mixture.train_records()
        if not cfg.data
        else [r for path in cfg.data for r in read_data(path)]
    )
    questions = [r for r in records if "choices" in r]  # multiple choice: trained as cfg.mc says
    return encode_all(
        tokenizer, [r for r in records if "choices" not in r], cfg.max_length
    ) + encode_questions(tokenizer, questions, cfg.mc, cfg.max_length)


def validation_examples(cfg: TrainConfig, tokenizer) -> list[Example]:
    """What eval_every scores: the built-in mixture's held-out conversations and skill items, or the
    answer-perplexity files of eval_data (multiple-choice files are scored at the end only)."""
    if not cfg.eval_every:
        return []
    if not cfg.data:
        records = cfg.mixture.conversations("test") + cfg.mixture.skill_items("test")
    else:
        records = [
            r for path in cfg.eval_data if not is_choice_file(path) for r in read_records(path)
        ]
    if not records:
        raise ValueError(
            f"TrainConfig.eval_every={cfg.eval_every} needs held-out data: with your own data, "
            "give eval_data=[held_out.jsonl] (prompt/completion or chat records), or set "
            "eval_every=0."
        )
    return encode_all(tokenizer, records, cfg.max_length)
