"""Generated, verifiable task families for the testbed (no downloads).

Every family generates (question, answer) pairs deterministically from a seed, produces a plausibly wrong
answer for preference pairs, and checks a model's free-form output (``check_answer``), so SFT targets, DPO
pairs, rewards and held-out accuracy all come from checking answers.

Roles in the default testbed (``ROLES``):

- ``domain_a``  ``arithmetic``   addition / subtraction of numbers 2-50: SFT, then DPO (stages 1-2)
- ``domain_b``  ``sorting``      sort 3-4 numbers: the second narrow SFT (stage 3)
- ``probe``     ``word_codes`` (recall arbitrary two-word codes: memorization, scored on the items trained on),
  ``reverse_words`` (reverse a list of words) and ``number_words`` (write a number in words; both scored on
  held-out items): the plasticity probe's tasks (``PROBE_FAMILIES``), of three kinds
- ``ood``       ``knowledge``    capitals, opposites, plurals, next weekday/month: out-of-domain accuracy

Held-out evaluation sets are the first ``n`` items of a fixed stream (``split="eval"``, seed 0), so a smaller
set is a prefix of a larger one and is the same for every training seed; training sets never contain a
question of the first ``EVAL_POOL`` evaluation items.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from ..measure.probe import CODE_WORDS, code_question, word_code

SYSTEM_PROMPT = "Answer with the answer only."
EVAL_POOL = 256


@dataclass(frozen=True)
class Example:
    family: str
    question: str
    answer: str
    accept: tuple[str, ...] = field(default=())  # further answers that count as correct

    @property
    def answers(self) -> tuple[str, ...]:
        return (self.answer, *self.accept)


def _ints(text: str) -> list[int]:
    return [int(x) for x in re.findall(r"-?\d+", text)]


class TaskFamily:
    """A generated task family. Subclasses implement ``sample``, ``wrong_answer`` and ``check_answer``."""

    name: str = ""
    description: str = ""
    max_new_tokens: int = 8  # generation budget when checking free-form outputs
    finite: bool = False  # True when the family has a small fixed pool of questions
    memorize: bool = False  # True when answers are arbitrary: a probe trains and scores on the same items

    def sample(self, rng: random.Random) -> Example:
        raise NotImplementedError

    def wrong_answer(self, ex: Example, rng: random.Random) -> str:
        """A plausibly wrong answer: ``check_answer(ex, wrong)`` is False."""
        raise NotImplementedError

    def check_answer(self, ex: Example, output: str) -> bool:
        raise NotImplementedError

    def solve(self, question: str) -> Example:
        """The item of a generated ``question`` with its reference answer (for reward functions)."""
        raise NotImplementedError

    # -- sets -------------------------------------------------------------------------------------------
    def _rng(self, split: str, seed: int) -> random.Random:
        return random.Random(f"supple:{self.name}:{split}:{seed}")

    def eval_examples(self, n: int) -> list[Example]:
        """The first ``n`` held-out items (distinct questions; fewer if the family's pool is smaller)."""
        rng = self._rng("eval", 0)
        out: list[Example] = []
        seen: set[str] = set()
        attempts = 0
        while len(out) < n and attempts < 200 * max(n, 1):
            attempts += 1
            ex = self.sample(rng)
            if ex.question not in seen:
                seen.add(ex.question)
                out.append(ex)
        return out

    def train_examples(self, n: int, seed: int, split: str = "train") -> list[Example]:
        """``n`` training items for ``seed`` (repeats allowed), never a question of the held-out pool."""
        if self.finite:
            raise ValueError(f"task family {self.name!r} is evaluation-only (a small fixed pool of questions)")
        held_out = {ex.question for ex in self.eval_examples(EVAL_POOL)}
        rng = self._rng(split, seed)
        out: list[Example] = []
        attempts = 0
        while len(out) < n:
            attempts += 1
            if attempts > 100 * n + 1000:
                raise RuntimeError(f"could not draw {n} training items of {self.name!r} outside the eval pool")
            ex = self.sample(rng)
            if ex.question not in held_out:
                out.append(ex)
        return out


class Arithmetic(TaskFamily):
    name = "arithmetic"
    description = "addition and subtraction of numbers 2-50 (non-negative results)"
    max_new_tokens = 8

    def __init__(self, low: int = 2, high: int = 50):
        self.low, self.high = low, high

    def sample(self, rng: random.Random) -> Example:
        a, b = rng.randint(self.low, self.high), rng.randint(self.low, self.high)
        if rng.random() < 0.5:
            return Example(self.name, f"What is {a} + {b}?", str(a + b))
        a, b = max(a, b), min(a, b)
        return Example(self.name, f"What is {a} - {b}?", str(a - b))

    def wrong_answer(self, ex: Example, rng: random.Random) -> str:
        a, op, b = re.match(r"What is (\d+) ([+-]) (\d+)\?", ex.question).groups()
        a, b, right = int(a), int(b), int(ex.answer)
        cands = {right + 1, right - 1, right + 10, right - 10, right + 2}
        # the classic slip: digit by digit without carrying / borrowing
        da, db = str(a).zfill(3), str(b).zfill(3)
        if op == "+":
            cands.add(int("".join(str((int(x) + int(y)) % 10) for x, y in zip(da, db))))
        else:
            cands.add(int("".join(str(abs(int(x) - int(y))) for x, y in zip(da, db))))
        cands = sorted(c for c in cands if c >= 0 and c != right)
        return str(rng.choice(cands))

    def check_answer(self, ex: Example, output: str) -> bool:
        nums = _ints(output)
        return bool(nums) and nums[-1] == int(ex.answer)

    def solve(self, question: str) -> Example:
        a, op, b = re.match(r"What is (\d+) ([+-]) (\d+)\?", question).groups()
        return Example(self.name, question, str(int(a) + int(b) if op == "+" else int(a) - int(b)))


class Sorting(TaskFamily):
    name = "sorting"
    description = "sort 3-4 distinct numbers (1-99) in ascending order"
    max_new_tokens = 16

    def sample(self, rng: random.Random) -> Example:
        k = rng.randint(3, 4)
        xs = rng.sample(range(1, 100), k)
        return Example(
            self.name,
            f"Sort in ascending order: {', '.join(map(str, xs))}",
            ", ".join(map(str, sorted(xs))),
        )

    def wrong_answer(self, ex: Example, rng: random.Random) -> str:
        xs = _ints(ex.answer)
        kind = rng.choice(("swap", "descending", "unsorted"))
        if kind == "descending":
            ys = sorted(xs, reverse=True)
        elif kind == "unsorted":
            ys = _ints(ex.question)
            if ys == xs:
                ys = xs[::-1]
        else:
            i = rng.randrange(len(xs) - 1)
            ys = list(xs)
            ys[i], ys[i + 1] = ys[i + 1], ys[i]
        return ", ".join(map(str, ys))

    def check_answer(self, ex: Example, output: str) -> bool:
        return _ints(output) == _ints(ex.answer)

    def solve(self, question: str) -> Example:
        return Example(self.name, question, ", ".join(map(str, sorted(_ints(question)))))


_ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen"
).split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_NUMBER_WORDS = set(_ONES) | set(_TENS[2:]) | {"hundred"}


def number_to_words(n: int) -> str:
    """0..999 in English words, hyphenated tens ("forty-seven", "three hundred twelve")."""
    if not 0 <= n <= 999:
        raise ValueError(n)
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + (f"-{_ONES[n % 10]}" if n % 10 else "")
    rest = n % 100
    return f"{_ONES[n // 100]} hundred" + (f" {number_to_words(rest)}" if rest else "")


def _word_runs(text: str) -> list[list[str]]:
    """Maximal runs of number words in ``text`` ("and" and hyphens are ignored)."""
    words = re.findall(r"[a-z]+", text.lower().replace("-", " "))
    runs, cur = [], []
    for w in words:
        if w in _NUMBER_WORDS:
            cur.append(w)
        elif w != "and":
            if cur:
                runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return runs


class NumberWords(TaskFamily):
    name = "number_words"
    description = "write a number (1-999) in English words"
    max_new_tokens = 10

    def sample(self, rng: random.Random) -> Example:
        n = rng.randint(1, 999)
        return Example(self.name, f"Write {n} in words.", number_to_words(n))

    def wrong_answer(self, ex: Example, rng: random.Random) -> str:
        n = _ints(ex.question)[0]
        cands = [m for m in (n + 1, n - 1, n + 10, n - 10, n + 100) if 0 <= m <= 999 and m != n]
        return number_to_words(rng.choice(cands))

    def check_answer(self, ex: Example, output: str) -> bool:
        gold = ex.answer.replace("-", " ").split()
        return gold in _word_runs(output)

    def solve(self, question: str) -> Example:
        return Example(self.name, question, number_to_words(_ints(question)[0]))


_CAPITALS = {
    "France": "Paris", "Japan": "Tokyo", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid",
    "Egypt": "Cairo", "Canada": "Ottawa", "Kenya": "Nairobi", "Peru": "Lima", "Russia": "Moscow",
    "China": "Beijing", "Greece": "Athens", "Portugal": "Lisbon", "Norway": "Oslo", "Sweden": "Stockholm",
    "Austria": "Vienna", "Ireland": "Dublin", "Poland": "Warsaw", "Thailand": "Bangkok", "Cuba": "Havana",
    "Argentina": "Buenos Aires", "Mexico": "Mexico City", "England": "London", "Finland": "Helsinki",
    "Denmark": "Copenhagen", "Hungary": "Budapest", "Belgium": "Brussels", "Chile": "Santiago",
}
_OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "up": "down", "happy": "sad", "open": "closed",
    "light": "dark", "tall": "short", "early": "late", "full": "empty", "hard": "soft", "wet": "dry",
    "old": "new", "rich": "poor", "strong": "weak", "true": "false", "left": "right", "win": "lose",
    "day": "night", "inside": "outside", "above": "below", "heavy": "light", "thick": "thin",
    "clean": "dirty", "cheap": "expensive", "start": "finish",
}
_OPPOSITES_ALT = {"open": ("shut",), "big": ("little",), "old": ("young",), "start": ("end", "stop")}
_PLURALS = {
    "mouse": "mice", "child": "children", "foot": "feet", "tooth": "teeth", "man": "men", "woman": "women",
    "goose": "geese", "person": "people", "cat": "cats", "box": "boxes", "city": "cities", "knife": "knives",
    "leaf": "leaves", "bus": "buses", "baby": "babies", "wolf": "wolves", "dog": "dogs", "glass": "glasses",
    "story": "stories", "ox": "oxen",
}
_DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
_MONTHS = "January February March April May June July August September October November December".split()


def _knowledge_pool() -> list[Example]:
    name = "knowledge"
    pool = [Example(name, f"What is the capital of {c}?", a) for c, a in _CAPITALS.items()]
    pool += [
        Example(name, f"What is the opposite of '{w}'?", a, _OPPOSITES_ALT.get(w, ())) for w, a in _OPPOSITES.items()
    ]
    pool += [Example(name, f"What is the plural of '{w}'?", a) for w, a in _PLURALS.items()]
    pool += [Example(name, f"Which day comes after {d}?", _DAYS[(i + 1) % 7]) for i, d in enumerate(_DAYS)]
    pool += [Example(name, f"Which month comes after {m}?", _MONTHS[(i + 1) % 12]) for i, m in enumerate(_MONTHS)]
    return pool


class Knowledge(TaskFamily):
    name = "knowledge"
    description = "general knowledge: capitals, opposites, plurals, next weekday / month (evaluation only)"
    max_new_tokens = 12
    finite = True

    def __init__(self):
        self.pool = _knowledge_pool()

    def sample(self, rng: random.Random) -> Example:
        return rng.choice(self.pool)

    def _same_kind(self, ex: Example) -> list[Example]:
        stem = ex.question.split(" ")[:4]
        return [e for e in self.pool if e.question.split(" ")[:4] == stem and e.answer not in ex.answers]

    def wrong_answer(self, ex: Example, rng: random.Random) -> str:
        return rng.choice(self._same_kind(ex)).answer

    def check_answer(self, ex: Example, output: str) -> bool:
        return any(re.search(rf"\b{re.escape(a)}\b", output, flags=re.IGNORECASE) for a in ex.answers)

    def solve(self, question: str) -> Example:
        for ex in self.pool:
            if ex.question == question:
                return ex
        raise ValueError(f"not a {self.name} question: {question!r}")



_PROBE_WORDS = CODE_WORDS
_PROBE_WORD_SET = frozenset(_PROBE_WORDS)


class ReverseWords(TaskFamily):
    """Reverse the order of a list of 3-6 common words: a sequence manipulation none of the stages trains."""

    name = "reverse_words"
    description = "reverse the order of a list of 3-6 common words"
    max_new_tokens = 16

    def sample(self, rng: random.Random) -> Example:
        words = rng.sample(_PROBE_WORDS, rng.randint(3, 6))
        return Example(self.name, "Reverse the order of these words: " + " ".join(words), " ".join(words[::-1]))

    def wrong_answer(self, ex: Example, rng: random.Random) -> str:
        words = ex.answer.split()
        return " ".join(words[1:] + words[:1])  # a rotation: same words, wrong order

    def check_answer(self, ex: Example, output: str) -> bool:
        gold = ex.answer.split()
        said = [w for w in re.findall(r"[a-z]+", output.lower()) if w in _PROBE_WORD_SET]
        return any(said[i : i + len(gold)] == gold for i in range(len(said) - len(gold) + 1))

    def solve(self, question: str) -> Example:
        words = question.rsplit(":", 1)[-1].split()
        return Example(self.name, question, " ".join(words[::-1]))


class WordCodes(TaskFamily):
    """Recall an arbitrary two-word code for a 4-digit key: nothing to generalize and nothing a stage teaches.

    The code of a key is a fixed pseudo-random function of the key, so a probe on this family measures how fast a
    model *fits* new arbitrary targets (its trainability, the plasticity of the continual-learning literature),
    not how well a skill transfers. ``memorize`` makes the probe train and score on the same items."""

    name = "word_codes"
    description = "recall the arbitrary two-word code of a 4-digit key (memorization)"
    max_new_tokens = 8
    memorize = True

    @staticmethod
    def code(key: int) -> str:
        return word_code(key)

    def sample(self, rng: random.Random) -> Example:
        key = rng.randint(1000, 9999)
        return Example(self.name, code_question(key), self.code(key))

    def wrong_answer(self, ex: Example, rng: random.Random) -> str:
        return self.code(_ints(ex.question)[0] + 1)

    def check_answer(self, ex: Example, output: str) -> bool:
        gold = ex.answer.split()
        said = [w for w in re.findall(r"[a-z]+", output.lower()) if w in _PROBE_WORD_SET]
        return said[: len(gold)] == gold

    def solve(self, question: str) -> Example:
        return Example(self.name, question, self.code(_ints(question)[0]))


FAMILIES: dict[str, TaskFamily] = {f.name: f for f in (Arithmetic(), Sorting(), NumberWords(), Knowledge(), ReverseWords(), WordCodes())}
ROLES: dict[str, str] = {"domain_a": "arithmetic", "domain_b": "sorting", "probe": "reverse_words", "ood": "knowledge"}
# the plasticity probe's families, the primary first: word_codes measures fitting (memorization of arbitrary
# answers), the other two the transfer of a skill to a held-out set (docs/demo.md, "The probes")
PROBE_FAMILIES: tuple[str, ...] = ("word_codes", "reverse_words", "number_words")


def get_family(name: str) -> TaskFamily:
    """A family by name or by role (``domain_a``, ``domain_b``, ``probe``, ``ood``)."""
    name = ROLES.get(name, name)
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown task family {name!r}: use one of {', '.join([*FAMILIES, *ROLES])}") from None


# -- chat formats for TRL -----------------------------------------------------------------------------------
def prompt_messages(ex: Example, system: str | None = SYSTEM_PROMPT) -> list[dict]:
    msgs = [{"role": "system", "content": system}] if system else []
    return [*msgs, {"role": "user", "content": ex.question}]


def sft_records(examples: list[Example], system: str | None = SYSTEM_PROMPT) -> list[dict]:
    """Conversational prompt-completion records (SFTTrainer trains on the completion only)."""
    return [
        {"prompt": prompt_messages(ex, system), "completion": [{"role": "assistant", "content": ex.answer}]}
        for ex in examples
    ]


def dpo_records(examples: list[Example], seed: int, system: str | None = SYSTEM_PROMPT) -> list[dict]:
    """Conversational preference records: the checked answer is chosen, a plausibly wrong one rejected."""
    out = []
    for i, ex in enumerate(examples):
        fam = get_family(ex.family)
        wrong = fam.wrong_answer(ex, random.Random(f"supple:{ex.family}:wrong:{seed}:{i}"))
        assert not fam.check_answer(ex, wrong), (ex, wrong)
        out.append(
            {
                "prompt": prompt_messages(ex, system),
                "chosen": [{"role": "assistant", "content": ex.answer}],
                "rejected": [{"role": "assistant", "content": wrong}],
            }
        )
    return out


def rl_records(examples: list[Example], system: str | None = SYSTEM_PROMPT) -> list[dict]:
    """Prompt-only records with the reference answer, for outcome-reward RL (GRPO) with ``reward_function``."""
    return [{"prompt": prompt_messages(ex, system), "question": ex.question, "family": ex.family} for ex in examples]


def _completion_text(c) -> str:
    if isinstance(c, str):
        return c
    if isinstance(c, list) and c and isinstance(c[-1], dict):
        return str(c[-1].get("content", ""))
    return str(c)


def reward_function(family: str | TaskFamily) -> Callable[..., list[float]]:
    """A TRL-style reward function: 1.0 when the checked answer is right, else 0.0.

    Called as ``fn(prompts=..., completions=..., question=[...], **columns)`` (the ``question`` column of
    ``rl_records``); the answer is regenerated from the question, so no answer column leaks into the batch.
    """
    fam = family if isinstance(family, TaskFamily) else get_family(family)
    by_question: dict[str, Example] = {}

    def lookup(q: str) -> Example:
        if q not in by_question:
            by_question[q] = fam.solve(q)
        return by_question[q]

    def reward(completions, question, **_) -> list[float]:
        return [float(fam.check_answer(lookup(q), _completion_text(c))) for c, q in zip(completions, question)]

    reward.__name__ = f"{fam.name}_correct"
    return reward

