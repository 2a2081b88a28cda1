"""The synthetic skills of the demo pool: prompts, answers and multiple-choice distractors.

Every skill is a string-to-string function over a tiny alphabet, so a model of a
few hundred thousand parameters learns it in seconds on a CPU. The skills come in
confusable pairs on purpose (add/sub on the same numbers, rev/sort on the same
letters) and each one's distractors include its partner's answer: a run that
over-learns one skill of a pair starts answering the other one wrongly, which is
the trade-off between fine-tuning runs that a merge can resolve.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

LETTERS = "abcdefghij"
DIGITS = "0123456789"
# Every character a prompt or an answer can contain; the tokenizer's vocabulary.
ALPHABET = DIGITS + LETTERS + "+-=:RSC"
assert len(set(ALPHABET)) == len(ALPHABET), "duplicate characters in ALPHABET"


@dataclass(frozen=True)
class Example:
    """One question: the model reads `prompt` and should continue with `choices[gold]`."""

    prompt: str
    choices: tuple[str, ...]
    gold: int

    @property
    def answer(self) -> str:
        return self.choices[self.gold]


@dataclass(frozen=True)
class Skill:
    """A named skill: `make(rng)` draws one (prompt, answer, distractors) triple."""

    name: str
    description: str
    make: Callable[[random.Random], tuple[str, str, list[str]]]


def _digitwise(x: str, y: str, sign: int) -> str:
    return "".join(str((int(p) + sign * int(q)) % 10) for p, q in zip(x, y))


def _one_digit_off(text: str, rng: random.Random, n: int) -> list[str]:
    """`n` near misses of `text`, each with one different digit changed by +-1."""
    spots = rng.sample(range(len(text)), n)
    return [text[:i] + str((int(text[i]) + rng.choice((1, 9))) % 10) + text[i + 1 :] for i in spots]


def _digits(rng: random.Random) -> str:
    return "".join(rng.choice(DIGITS) for _ in range(3))


def _add(rng: random.Random) -> tuple[str, str, list[str]]:
    # Digit-wise, modulo 10: no carries, so every answer digit depends on two
    # prompt digits and a tiny model learns it in a few hundred steps.
    x, y = _digits(rng), _digits(rng)
    answer = _digitwise(x, y, 1)
    return f"{x}+{y}=", answer, [_digitwise(x, y, -1), *_one_digit_off(answer, rng, 2)]


def _sub(rng: random.Random) -> tuple[str, str, list[str]]:
    x, y = _digits(rng), _digits(rng)
    answer = _digitwise(x, y, -1)
    return f"{x}-{y}=", answer, [_digitwise(x, y, 1), *_one_digit_off(answer, rng, 2)]


def _letters(rng: random.Random) -> str:
    # Distinct letters, so reversed, sorted and original strings differ.
    return "".join(rng.sample(LETTERS, rng.randint(4, 6)))


def _swaps(text: str, rng: random.Random, n: int) -> list[str]:
    """`n` different near misses of `text`: one pair of adjacent characters swapped."""
    spots = rng.sample(range(len(text) - 1), n)
    return [text[:i] + text[i + 1] + text[i] + text[i + 2 :] for i in spots]


def _miscounted_sorted(word: str, rng: random.Random) -> str:
    # Sorted, made only of the prompt's letters, the right length, but one
    # letter's count is off: only a model that tracks every letter rejects it.
    i = rng.randrange(len(word))
    other = rng.choice([c for c in set(word) if c != word[i]])
    return "".join(sorted(word[:i] + other + word[i + 1 :]))


def _rev(rng: random.Random) -> tuple[str, str, list[str]]:
    word = _letters(rng)
    answer = word[::-1]
    return f"R:{word}=", answer, ["".join(sorted(word)), *_swaps(answer, rng, 2)]


def _sort(rng: random.Random) -> tuple[str, str, list[str]]:
    # Letters may repeat here: sorting a multiset needs counting.
    word = ""
    while len(set(word)) < 2:
        word = "".join(rng.choice(LETTERS[:6]) for _ in range(rng.randint(5, 7)))
    answer = "".join(sorted(word))
    return f"S:{word}=", answer, [word[::-1], _miscounted_sorted(word, rng), _miscounted_sorted(word, rng)]


def _shift(text: str, by: int) -> str:
    return "".join(LETTERS[(LETTERS.index(c) + by) % len(LETTERS)] for c in text)


def _caesar(rng: random.Random) -> tuple[str, str, list[str]]:
    word = "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 5)))
    answer = _shift(word, 1)
    # Near misses: one letter shifted by 0 or 2 instead of 1.
    spots = rng.sample(range(len(word)), 3)
    misses = [answer[:i] + _shift(word[i], rng.choice((0, 2))) + answer[i + 1 :] for i in spots]
    return f"C:{word}=", answer, misses


SKILLS: dict[str, Skill] = {
    s.name: s
    for s in (
        Skill("add", "digit-wise addition modulo 10 of two 3-digit strings", _add),
        Skill("sub", "digit-wise subtraction modulo 10 of two 3-digit strings", _sub),
        Skill("rev", "reverse a string of distinct letters", _rev),
        Skill("sort", "sort a string of distinct letters", _sort),
        Skill("caesar", "shift every letter by one (held out: no fine-tuning run emphasises it)", _caesar),
    )
}
HELD_OUT = "caesar"


def draw(skill: str, rng: random.Random) -> Example:
    """One multiple-choice example of `skill` with its four distinct choices shuffled by `rng`."""
    while True:
        prompt, answer, distractors = SKILLS[skill].make(rng)
        choices = [answer, *distractors]
        if len(set(choices)) == len(choices):
            break
    rng.shuffle(choices)
    return Example(prompt, tuple(choices), choices.index(answer))


def eval_sets(seed: int, n_per_split: int) -> dict[str, dict[str, list[Example]]]:
    """skill -> split ('dev', 'test') -> examples; prompts unique across both splits.

    Each skill draws from its own seeded stream, so adding a skill or changing
    one split's size never changes another skill's questions.
    """
    out: dict[str, dict[str, list[Example]]] = {}
    for index, name in enumerate(SKILLS):
        rng = random.Random(f"eval-{seed}-{index}-{name}")
        seen: set[str] = set()
        examples: list[Example] = []
        while len(examples) < 2 * n_per_split:
            ex = draw(name, rng)
            if ex.prompt not in seen:
                seen.add(ex.prompt)
                examples.append(ex)
        out[name] = {"dev": examples[:n_per_split], "test": examples[n_per_split:]}
    return out


class TrainStream:
    """An endless, seeded stream of (prompt, answer) training pairs from a skill mixture.

    Prompts that appear in any evaluation split are never drawn, so scores
    measure the skill rather than memorised questions.
    """

    def __init__(self, mixture: dict[str, float], held_out_prompts: set[str], seed: int | str) -> None:
        self._names = [n for n, w in mixture.items() if w > 0]
        self._weights = [mixture[n] for n in self._names]
        self._exclude = held_out_prompts
        self._rng = random.Random(seed)

    def take(self, n: int) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        while len(out) < n:
            name = self._rng.choices(self._names, self._weights)[0]
            prompt, answer, _ = SKILLS[name].make(self._rng)
            if prompt not in self._exclude:
                out.append((prompt, answer))
        return out
