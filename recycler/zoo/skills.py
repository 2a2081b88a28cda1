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
ALPHABET = DIGITS + LETTERS + "=:IDRTS"
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
    """A named skill: `make(rng)` draws one (prompt, answer, distractors) triple.

    The first distractor is always the confusable partner skill's answer to
    the same prompt (inc/dec, rev/rot; for sort, the reversed word).
    """

    name: str
    description: str
    make: Callable[[random.Random], tuple[str, str, list[str]]]


def _near_misses(answer: str, alphabet: str, rng: random.Random, n: int) -> list[str]:
    """`n` near misses of `answer`, each with one different character moved one step in `alphabet`."""
    spots = rng.sample(range(len(answer)), n)
    k = len(alphabet)
    return [
        answer[:i]
        + alphabet[(alphabet.index(answer[i]) + rng.choice((1, k - 1))) % k]
        + answer[i + 1 :]
        for i in spots
    ]


def _shift(text: str, alphabet: str, by: int) -> str:
    k = len(alphabet)
    return "".join(alphabet[(alphabet.index(c) + by) % k] for c in text)


def _number(rng: random.Random) -> str:
    return "".join(rng.choice(DIGITS) for _ in range(rng.randint(4, 6)))


def _inc(rng: random.Random) -> tuple[str, str, list[str]]:
    x = _number(rng)
    answer = _shift(x, DIGITS, 1)
    return f"I:{x}=", answer, [_shift(x, DIGITS, -1), *_near_misses(answer, DIGITS, rng, 2)]


def _dec(rng: random.Random) -> tuple[str, str, list[str]]:
    x = _number(rng)
    answer = _shift(x, DIGITS, -1)
    return f"D:{x}=", answer, [_shift(x, DIGITS, 1), *_near_misses(answer, DIGITS, rng, 2)]


def _word(rng: random.Random) -> str:
    # Distinct letters, so the reversed, rotated and original strings differ.
    return "".join(rng.sample(LETTERS, rng.randint(4, 6)))


def _swaps(text: str, rng: random.Random, n: int) -> list[str]:
    """`n` different near misses of `text`: one pair of adjacent characters swapped."""
    spots = rng.sample(range(len(text) - 1), n)
    return [text[:i] + text[i + 1] + text[i] + text[i + 2 :] for i in spots]


def _rev(rng: random.Random) -> tuple[str, str, list[str]]:
    w = _word(rng)
    answer = w[::-1]
    return f"R:{w}=", answer, [w[1:] + w[0], *_swaps(answer, rng, 2)]


def _rot(rng: random.Random) -> tuple[str, str, list[str]]:
    w = _word(rng)
    answer = w[1:] + w[0]
    return f"T:{w}=", answer, [w[::-1], *_swaps(answer, rng, 2)]


def _miscounted_sorted(word: str, rng: random.Random) -> str:
    # Sorted, made only of the prompt's letters, the right length, but one
    # letter's count is off: only a model that tracks every letter rejects it.
    i = rng.randrange(len(word))
    other = rng.choice(
        [c for c in sorted(set(word)) if c != word[i]]
    )  # sorted: set order varies by process
    return "".join(sorted(word[:i] + other + word[i + 1 :]))


def _sort(rng: random.Random) -> tuple[str, str, list[str]]:
    # Letters may repeat: sorting a multiset needs counting.
    w = ""
    while len(set(w)) < 2:
        w = "".join(rng.choice(LETTERS[:6]) for _ in range(rng.randint(5, 7)))
    answer = "".join(sorted(w))
    return f"S:{w}=", answer, [w[::-1], _miscounted_sorted(w, rng), _miscounted_sorted(w, rng)]


SKILLS: dict[str, Skill] = {
    s.name: s
    for s in (
        Skill("inc", "add 1 to every digit (mod 10)", _inc),
        Skill("dec", "subtract 1 from every digit (mod 10)", _dec),
        Skill("rev", "reverse a string of distinct letters", _rev),
        Skill("rot", "rotate a string of distinct letters left by one", _rot),
        Skill(
            "sort", "sort a multiset of letters (held out: no fine-tuning run emphasises it)", _sort
        ),
    )
}
HELD_OUT = "sort"


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
    measure the skill rather than memorised questions. `noise[skill]` is the
    share of that skill's examples whose answer is its confusable partner's
    (the first distractor): a corpus where "R:" sometimes means rotate, as
    web text is ambiguous. A model pretrained on it knows both skills but not
    which one the marker asks for, and that is what fine-tuning settles.
    """

    def __init__(
        self,
        mixture: dict[str, float],
        held_out_prompts: set[str],
        seed: int | str,
        noise: dict[str, float] | None = None,
    ) -> None:
        self._names = [n for n, w in mixture.items() if w > 0]
        self._weights = [mixture[n] for n in self._names]
        self._exclude = held_out_prompts
        self._noise = noise or {}
        self._rng = random.Random(seed)

    def take(self, n: int) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        while len(out) < n:
            name = self._rng.choices(self._names, self._weights)[0]
            prompt, answer, distractors = SKILLS[name].make(self._rng)
            if self._rng.random() < self._noise.get(name, 0.0):
                answer = distractors[0]
            if prompt not in self._exclude:
                out.append((prompt, answer))
        return out
