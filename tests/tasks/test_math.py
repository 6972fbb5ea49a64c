"""Math final-answer extraction and matching."""

from __future__ import annotations

import pytest

from respec_async.tasks.math import answers_match, extract_answer, parse_number, reward


@pytest.mark.parametrize("completion, expected", [
    (r"so the total is \boxed{42}.", "42"),
    (r"first \boxed{1} then \boxed{\frac{3}{4}}", r"\frac{3}{4}"),  # the last box, nested braces
    (r"\boxed{ {a}+{b} }", "{a}+{b}"),
    ("Natalia sold 48 clips ... #### 72", "72"),
    ("#### 1,234\n", "1,234"),
    ("So the answer is 3.5.", "3.5"),
    ("The answer is: $18$. Done", "$18$"),
    ("The final Answer is 7", "7"),
    ("no stated answer, just 12", None),
    (r"unclosed \boxed{12", None),
])
def test_extract_answer_finds_the_stated_final_answer(completion, expected):
    assert extract_answer(completion) == expected


@pytest.mark.parametrize("text, value", [
    ("42", 42), ("-3", -3), ("1,234", 1234), ("3.50", 3.5), ("1/4", 0.25), (r"\frac{1}{2}", 0.5),
    (r"\dfrac{3}{4}", 0.75), ("$5$", 5), ("x = 7", 7), ("12.", 12), (r"\text{10}", 10),
])
def test_parse_number_reads_common_numeric_forms(text, value):
    assert parse_number(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["abc", "1,23", "1/0", "", "(A)"])
def test_parse_number_returns_none_for_non_numbers(text):
    assert parse_number(text) is None


def test_answers_match_numerically_then_as_normalised_strings():
    assert answers_match("0.5", r"\frac{1}{2}")
    assert answers_match("1,000", "1000.0")
    assert not answers_match("0.51", "0.5")
    assert answers_match(r"\text{(A)}", "(a)")
    assert not answers_match("(B)", "(A)")


def test_reward_reads_the_gold_answer_out_of_a_full_gsm8k_solution():
    assert reward("the answer is 72", "She sold 48/2 = 24 ... #### 72") == 1.0
    assert reward(r"\boxed{72}", "72") == 1.0
    assert reward(r"\boxed{71}", "72") == 0.0
    assert reward("72", "72") == 0.0  # no stated final answer
