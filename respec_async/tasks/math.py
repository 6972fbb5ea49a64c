r"""Final-answer exact match for math word problems (GSM8K, MATH-style JSONL datasets).

`extract_answer` finds the final answer of a completion, trying in order the last `\boxed{...}`
(or `\fbox{...}`), the text after the last `####`, and the text after the last "answer is".
`answers_match` compares two answers numerically when both parse as numbers (integers,
decimals, `a/b`, `\frac{a}{b}`, thousands separators, a trailing `%` or unit-free `$`), and as
normalised strings otherwise. `reward` is 1.0 on a match, else 0.0.

A gold answer may itself be a full GSM8K solution ("...#### 72"): it goes through
`extract_answer` too, falling back to the whole string.
"""

from __future__ import annotations

import re
from fractions import Fraction

_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_HASHES_RE = re.compile(r"####\s*([^\n]*)")
_ANSWER_IS_RE = re.compile(r"answer\s+is\s*:?\s*([^\n]*)", re.IGNORECASE)
_TEXT_RE = re.compile(r"\\(?:text|textbf|mathrm|mbox)\s*\{([^{}]*)\}")
_FRAC_RE = re.compile(r"^(-?)\\[dt]?frac\s*\{([^{}]+)\}\s*\{([^{}]+)\}$")
_NUMBER_RE = re.compile(r"^[-+]?(\d+(\.\d*)?|\.\d+)$")
_THOUSANDS_RE = re.compile(r"^[-+]?\d{1,3}(,\d{3})+(\.\d*)?$")


def _last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...}, matching nested braces; None if absent or unclosed."""
    starts = [m.end() for m in _BOXED_RE.finditer(text)]
    for start in reversed(starts):
        depth = 1
        for i in range(start, len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    return text[start:i]
    return None


def _first_sentence(text: str) -> str:
    # "The answer is 42. Next we ..." -> "42"; a decimal point followed by a digit is kept.
    return re.split(r"\.(?!\d)\s|\.$", text.strip(), maxsplit=1)[0]


def extract_answer(completion_text: str) -> str | None:
    """The final answer a completion states, un-normalised, or None when it states none."""
    boxed = _last_boxed(completion_text)
    if boxed is not None:
        return boxed.strip()
    hashes = _HASHES_RE.findall(completion_text)
    if hashes:
        return hashes[-1].strip()
    answer_is = _ANSWER_IS_RE.findall(completion_text)
    if answer_is:
        return _first_sentence(answer_is[-1])
    return None


def normalize_answer(answer: str) -> str:
    """Strip the formatting that does not change an answer: $, \\text{}, spacing macros,
    a leading `x =`, a trailing period, surrounding whitespace, letter case."""
    text = answer.strip()
    text = _TEXT_RE.sub(r"\1", text)
    for token in ("\\$", "$", "\\!", "\\,", "\\;", "\\left", "\\right", "^\\circ", "^{\\circ}"):
        text = text.replace(token, "")
    text = re.sub(r"^[a-zA-Z]\s*=\s*", "", text)
    text = text.strip().rstrip(".").strip()
    return re.sub(r"\s+", " ", text).lower()


def parse_number(answer: str) -> Fraction | None:
    """The exact value of a numeric answer, or None when it is not a number."""
    text = normalize_answer(answer).replace(" ", "")
    if text.endswith("%"):
        text = text[:-1]
    if _THOUSANDS_RE.match(text):
        text = text.replace(",", "")
    frac = _FRAC_RE.match(text)
    if frac:
        sign, numerator, denominator = frac.groups()
        text = f"{sign}{numerator}/{denominator}"
    try:
        if "/" in text:
            numerator, denominator = text.split("/", 1)
            if not (_NUMBER_RE.match(numerator) and _NUMBER_RE.match(denominator)):
                return None
            return Fraction(numerator) / Fraction(denominator)
        if _NUMBER_RE.match(text):
            return Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None
    return None


def answers_match(predicted: str, gold: str) -> bool:
    predicted_value, gold_value = parse_number(predicted), parse_number(gold)
    if predicted_value is not None and gold_value is not None:
        return predicted_value == gold_value
    return normalize_answer(predicted) == normalize_answer(gold)


def reward(completion_text: str, answer: str) -> float:
    """1.0 when the completion's final answer matches the gold answer, else 0.0."""
    predicted = extract_answer(completion_text)
    if predicted is None:
        return 0.0
    stated_gold = extract_answer(answer) if ("####" in answer or "\\boxed" in answer) else None
    return 1.0 if answers_match(predicted, stated_gold or answer) else 0.0
