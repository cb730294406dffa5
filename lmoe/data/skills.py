"""Generated skills with exact answers, for greedy-generation exact match.

Each skill draws a random instance and returns (key, prompt, answer). A hash of the key decides the
split, so train and test never share an instance, whatever the seed or the sizes asked for.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from .splits import held_out

WORDS = (
    "apple river stone cloud tiger green paper music window garden bread horse silver candle "
    "forest summer winter yellow planet doctor orange bottle castle rocket pencil mirror dragon "
    "island butter rabbit jacket hammer violin spider carpet banana ladder pillow basket lemon "
    "anchor tomato camera wallet button pepper monkey kettle saddle magnet velvet"
).split()
ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen".split()
)
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
TEST_FRACTION = 0.2


def in_words(n: int) -> str:
    """0..999 in English words: 347 -> 'three hundred forty-seven'."""
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + ("" if n % 10 == 0 else "-" + ONES[n % 10])
    rest = n % 100
    return ONES[n // 100] + " hundred" + ("" if rest == 0 else " " + in_words(rest))


def add(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"{a}+{b}", f"What is {a} + {b}? Answer with the number only.", str(a + b)


def number_words(rng: random.Random) -> tuple[str, str, str]:
    n = rng.randint(0, 999)
    return str(n), f"Write the number {n} in English words.", in_words(n)


def sort(rng: random.Random) -> tuple[str, str, str]:
    numbers = rng.sample(range(1, 100), rng.randint(3, 5))
    listed = ", ".join(map(str, numbers))
    return (
        listed,
        f"Sort these numbers from smallest to largest: {listed}",
        ", ".join(map(str, sorted(numbers))),
    )


def reverse_words(rng: random.Random) -> tuple[str, str, str]:
    words = rng.sample(WORDS, rng.randint(3, 4))
    return (
        " ".join(words),
        f"Reverse the order of these words: {' '.join(words)}",
        " ".join(reversed(words)),
    )


def count_letters(rng: random.Random) -> tuple[str, str, str]:
    word = rng.choice(WORDS)
    letter = rng.choice(sorted(set(word)))
    return (
        f"{word}/{letter}",
        f"How many times does the letter '{letter}' appear in '{word}'?",
        str(word.count(letter)),
    )


SKILLS = {f.__name__: f for f in (add, number_words, sort, reverse_words, count_letters)}


def generate(skill: str, n: int, split: str, seed: int) -> list[tuple[str, str]]:
    """n distinct (prompt, answer) pairs of the skill on the given side ("train" or "test")."""
    drawn = split_draws(SKILLS[skill], n, split, f"{seed}/{skill}", skill)
    return [(prompt, answer) for _, prompt, answer in drawn]


def split_draws(
    draw: Callable[[random.Random], tuple], n: int, split: str, stream: str, space: str
) -> list[tuple]:
    """n draws with distinct keys (each draw's first element) on one side of the split.

    Args:
        draw: rng -> (key, ...): one random instance.
        n: how many.
        split: "train" or "test".
        stream: names the random stream (with the split); the same stream draws the same items.
        space: names the key space: the hash of f"{space}/{key}" picks the side, so generators
            that share a space put an input on the same side (train or test) in all of them.

    Returns:
        The draws, in the order first drawn.
    """
    rng = random.Random(f"{stream}/{split}")
    items: dict[str, tuple] = {}
    # the smallest skill space (count_letters) holds a few hundred keys
    for _ in range(200 * n + 1000):
        if len(items) == n:
            break
        item = draw(rng)
        if held_out(f"{space}/{item[0]}", TEST_FRACTION) == (split == "test"):
            items.setdefault(item[0], item)
    if len(items) < n:
        raise ValueError(
            f"Generator {space!r} has only {len(items)} distinct {split} items; "
            f"ask for fewer than {n}."
        )
    return list(items.values())
