"""The zoo's synthetic task: multi-digit addition, worked out column by column.

A prompt is `"{a}+{b}="`; the gold completion adds the columns from the right, writing each as
`x+y+carry=sum`, then the answer:

    prompt      "478+95="
    completion  "8+5+0=13;7+9+1=17;4+0+1=5; ans 573"

The number of digits is drawn from a truncated geometric distribution, so most completions are
short (17 characters for one digit) and a few are long (about 150 for fourteen): the long tail
of lengths that makes batched generation, and speculative decoding's batch-size dependence,
interesting. Every answer is checkable, so `reward` is an exact rule.

The long-tail variant (`data.task = "longtail"`, `TASKS`) draws up to 44 digits with a slower
decay: completions from 17 characters to about 450, a median near 70, the long tail of
reasoning lengths that makes generation dominate an RL step. Its numbers are written
little-endian (units digit first, prompt and answer alike), so column i of the worked solution
reads digit i of each operand: a small model need not count back from an operand's end, which a
6-layer target did not learn at 44 digits.

The chat variant (`data.task = "chat-addition"`) is for pretrained instruct models: the same
problems of one or two digits asked in words ("What is 47 + 38? Answer with just the number."),
scored by the last number the reply states (`last_number_reward`); `data.chat_template = true`
wraps the question in the model's chat template.

    prompt      "874+59="        (478 + 95)
    completion  "8+5+0=13;7+9+1=17;4+0+1=5; ans 375"

Problems are a pure function of (index, seed, split): a trainer resumes by remembering an
index, and the train and held-out splits never share a problem because membership is decided
by a hash of the operands, not by the seed.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from typing import Literal, Sequence

# Every character a prompt or gold completion can contain; the zoo's tokenizer is built from it.
ALPHABET = "0123456789+=,; ans"
ANSWER_PREFIX = " ans "

MAX_DIGITS = 14
# P(num_digits = n) is proportional to DIGITS_DECAY ** (n - 1): about a quarter of the problems
# have one digit, 3% have ten or more.
DIGITS_DECAY = 0.75
# The long-tail task: P(n) proportional to 0.9 ** (n - 1) up to 44 digits, little-endian.
LONGTAIL_MAX_DIGITS = 44
LONGTAIL_DIGITS_DECAY = 0.9
DIGITS_LIMIT = 64
# data.task -> problem() keyword arguments
TASKS = {"arithmetic": {"max_digits": MAX_DIGITS, "digits_decay": DIGITS_DECAY, "little_endian": False},
         "longtail": {"max_digits": LONGTAIL_MAX_DIGITS, "digits_decay": LONGTAIL_DIGITS_DECAY,
                      "little_endian": True},
         # SmolLM2-135M-Instruct answers ~50% of one-digit sums at T = 0.7, ~3% of two-digit ones.
         "chat-addition": {"max_digits": 2, "digits_decay": 0.25, "little_endian": False}}
CHAT_QUESTION = "What is {a} + {b}? Answer with just the number."
# One problem in HELDOUT_MODULUS is held out; the rest can be trained on.
HELDOUT_MODULUS = 10

Split = Literal["train", "heldout"]
_ANSWER_RE = re.compile(r"ans (\d+)")
_NUMBER_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


@dataclass(frozen=True)
class Problem:
    prompt: str
    completion: str  # the gold worked solution, without an end-of-sequence token
    answer: str
    num_digits: int  # digits of the longer operand


def is_heldout(a: int, b: int) -> bool:
    """Whether a+b belongs to the held-out split; a stable hash, the same in every process."""
    digest = hashlib.blake2b(f"{a}+{b}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % HELDOUT_MODULUS == 0


def solve(a: int, b: int) -> str:
    """The gold completion for a+b: one `x+y+carry=sum;` per column, right to left, then the answer."""
    da, db = str(a)[::-1], str(b)[::-1]
    columns = []
    carry = 0
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        total = x + y + carry
        columns.append(f"{x}+{y}+{carry}={total};")
        carry = total // 10
    return "".join(columns) + ANSWER_PREFIX + str(a + b)


def _draw_num_digits(rng: random.Random, max_digits: int, decay: float) -> int:
    weights = [decay ** (n - 1) for n in range(1, max_digits + 1)]
    return rng.choices(range(1, max_digits + 1), weights=weights)[0]


def _draw_operand(rng: random.Random, num_digits: int) -> int:
    low = 0 if num_digits == 1 else 10 ** (num_digits - 1)
    return rng.randrange(low, 10 ** num_digits)


def problem(index: int, seed: int = 0, split: Split = "train", max_digits: int = MAX_DIGITS,
            digits_decay: float = DIGITS_DECAY, little_endian: bool = False) -> Problem:
    """The index-th problem of a split: deterministic in (index, seed, split, max_digits,
    digits_decay); little_endian writes the same problem's numbers units digit first."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    if not 1 <= max_digits <= DIGITS_LIMIT:
        raise ValueError(f"max_digits must be in [1, {DIGITS_LIMIT}], got {max_digits}")
    if not 0 < digits_decay <= 1:
        raise ValueError(f"digits_decay must be in (0, 1], got {digits_decay}")
    # A string seed goes through SHA-512 in `random`, so this is stable across processes and runs
    # (the default decay leaves the key as it was: the same problems as before it existed).
    decay_key = "" if digits_decay == DIGITS_DECAY else f"{digits_decay}:"
    rng = random.Random(f"arithmetic:{seed}:{split}:{max_digits}:{decay_key}{index}")
    want_heldout = split == "heldout"
    while True:
        num_digits = _draw_num_digits(rng, max_digits, digits_decay)
        a = _draw_operand(rng, num_digits)
        b = _draw_operand(rng, rng.randint(1, num_digits))
        if rng.random() < 0.5:
            a, b = b, a
        if is_heldout(a, b) == want_heldout:
            if little_endian:
                answer = str(a + b)[::-1]
                completion = solve(a, b).rsplit(ANSWER_PREFIX, 1)[0] + ANSWER_PREFIX + answer
                return Problem(prompt=f"{str(a)[::-1]}+{str(b)[::-1]}=", completion=completion, answer=answer,
                               num_digits=num_digits)
            return Problem(prompt=f"{a}+{b}=", completion=solve(a, b), answer=str(a + b), num_digits=num_digits)


def problems(num_problems: int, seed: int = 0, split: Split = "train", start: int = 0,
             max_digits: int = MAX_DIGITS, digits_decay: float = DIGITS_DECAY,
             little_endian: bool = False) -> list[Problem]:
    return [problem(i, seed, split, max_digits, digits_decay, little_endian) for i in range(start, start + num_problems)]


def parse_answer(completion_text: str) -> str | None:
    """The number after the last `ans `, or None when the completion never states an answer."""
    found = _ANSWER_RE.findall(completion_text)
    return found[-1] if found else None


def reward(completion_text: str, answer: str, partial_credit: float = 0.0) -> float:
    """1.0 when the stated final answer equals `answer`, else 0.0.

    With partial_credit > 0, a wrong answer earns partial_credit times the fraction of answer
    digits it gets right (aligned from the units digit); off by default because it rewards
    well-formed wrong answers and the GRPO signal is cleaner without it.
    """
    stated = parse_answer(completion_text)
    # A little-endian answer's leading zeros are its low digits: they must be stated.
    exact = answer[:1] == "0"
    if stated is not None and answer.isdigit() and (stated == answer if exact else int(stated) == int(answer)):
        return 1.0
    if partial_credit <= 0.0 or stated is None:
        return 0.0
    num_right = sum(x == y for x, y in zip(reversed(stated), reversed(answer)))
    return partial_credit * num_right / max(len(answer), len(stated))


def chat_question(problem: Problem) -> str:
    """The problem asked in words (big-endian problems only)."""
    a, b = problem.prompt.rstrip("=").split("+")
    return CHAT_QUESTION.format(a=a, b=b)


def last_number_reward(completion_text: str, answer: str) -> float:
    """1.0 when the last number in the text (thousands separators allowed) equals `answer`."""
    found = _NUMBER_RE.findall(completion_text)
    if not found:
        return 0.0
    stated = found[-1].replace(",", "")
    return 1.0 if float(stated) == int(answer) else 0.0  # "12.0" states 12


def accuracy(completions: Sequence[str], answers: Sequence[str]) -> float:
    """Fraction of completions whose final answer is exactly right."""
    if len(completions) != len(answers):
        raise ValueError(f"{len(completions)} completions but {len(answers)} answers")
    if not completions:
        return 0.0
    return sum(reward(c, a) == 1.0 for c, a in zip(completions, answers)) / len(completions)
