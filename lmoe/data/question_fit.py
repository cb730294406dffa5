"""Whether every multiple-choice question to be scored fits max_length, checked before a run trains
or an evaluation scores (scoring would find a too-long choice only when it reaches it)."""

from __future__ import annotations

from . import benchmarks
from .choices import MultipleChoice, fit, request
from .records import read_records


def check_questions_fit(
    tokenizer, sources: list[str], mc: MultipleChoice, max_length: int, group: str | None = None
) -> None:
    """Raise choices.fit's one-line error for the first question whose longest choice leaves no
    room for its prompt within max_length, under each protocol mc scores.

    Args:
        sources: benchmarks (bench:NAME: mc.test_items of their test side) and data files (their
            multiple-choice records; the others are not checked).
        group: the files' grouping key, as read for scoring.
    """
    question_sets = [
        benchmarks.scored_questions(task, mc.test_items) for task in benchmarks.task_names(sources)
    ]
    question_sets += [
        [r for r in read_records(path, group=group) if "choices" in r]
        for path in sources
        if not benchmarks.task_names([path])
    ]
    for questions in question_sets:
        for fmt in mc.scored():
            for record in questions:
                fit(*request(tokenizer, record, fmt), max_length, record["where"])
