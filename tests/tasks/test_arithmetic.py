"""The zoo's arithmetic task: deterministic problems, disjoint splits, long-tailed lengths, rule reward."""

from __future__ import annotations

import statistics

import pytest

from respec_async.tasks import arithmetic
from tests.roles.conftest import random_actor_dir  # noqa: F401  (fixture)


def test_problems_are_a_pure_function_of_index_seed_and_split():
    assert arithmetic.problems(50, seed=3) == arithmetic.problems(50, seed=3)
    assert arithmetic.problems(10, seed=3, start=20) == arithmetic.problems(30, seed=3)[20:]
    assert arithmetic.problems(50, seed=3) != arithmetic.problems(50, seed=4)


def test_train_and_heldout_splits_share_no_problem_across_seeds():
    train = {p.prompt for seed in (0, 1) for p in arithmetic.problems(1500, seed=seed, split="train")}
    heldout = {p.prompt for seed in (0, 1) for p in arithmetic.problems(300, seed=seed, split="heldout")}
    assert not train & heldout


def test_completion_lengths_are_long_tailed():
    lengths = sorted(len(p.completion) for p in arithmetic.problems(2000, seed=0))
    median = statistics.median(lengths)
    assert min(lengths) >= 10 and max(lengths) <= 150
    assert median <= 40  # most completions are short ...
    assert lengths[int(0.99 * len(lengths))] >= 3 * median  # ... and a few are several times longer
    assert max(lengths) >= 120


def test_gold_completion_works_the_columns_with_carries():
    assert arithmetic.solve(478, 95) == "8+5+0=13;7+9+1=17;4+0+1=5; ans 573"
    assert arithmetic.solve(5, 5) == "5+5+0=10; ans 10"


def test_every_gold_completion_uses_only_the_alphabet_and_earns_full_reward():
    for p in arithmetic.problems(300, seed=1) + arithmetic.problems(100, seed=1, split="heldout"):
        assert set(p.prompt + p.completion) <= set(arithmetic.ALPHABET)
        assert p.answer == str(eval(p.prompt[:-1]))  # noqa: S307 - digits and one '+'
        assert arithmetic.reward(p.completion, p.answer) == 1.0


@pytest.mark.parametrize("completion, expected", [
    ("3+9+0=12; ans 12", 1.0),
    ("3+9+0=12; ans 13", 0.0),
    ("3+9+0=12;", 0.0),  # no answer stated
    ("", 0.0),
    ("ans 99; ans 12", 1.0),  # the last stated answer counts
    ("3+9+0=12; ans 012", 1.0),  # numerically equal
    ("3+9+0=12; ans 1", 0.0),
])
def test_reward_is_one_for_the_exact_final_answer_only(completion, expected):
    assert arithmetic.reward(completion, "12") == expected


def test_partial_credit_is_off_by_default_and_never_reaches_one():
    assert arithmetic.reward(" ans 1235", "1234") == 0.0
    partial = arithmetic.reward(" ans 1235", "1234", partial_credit=0.2)
    assert 0.0 < partial < 0.2
    assert arithmetic.reward("no answer", "1234", partial_credit=0.2) == 0.0


def test_accuracy_counts_exact_answers():
    assert arithmetic.accuracy([" ans 3", " ans 4", "x"], ["3", "3", "3"]) == pytest.approx(1 / 3)
    assert arithmetic.accuracy([], []) == 0.0
    with pytest.raises(ValueError):
        arithmetic.accuracy(["a"], [])


def test_bad_split_is_rejected():
    with pytest.raises(ValueError, match="split"):
        arithmetic.problem(0, split="test")  # type: ignore[arg-type]


def test_a_finite_training_set_is_seen_once_per_epoch_in_a_new_order(random_actor_dir):
    from respec_async.config import ConfigError, config_from_dict
    from respec_async.prompts import PromptSource

    config = config_from_dict({"model": {"path": str(random_actor_dir)}, "data": {"train_size": 6}})
    source = PromptSource(config)
    prompts = [source.train_example(position).prompt_text for position in range(18)]
    epochs = [prompts[i:i + 6] for i in range(0, 18, 6)]
    assert all(sorted(epoch) == sorted(epochs[0]) and len(set(epoch)) == 6 for epoch in epochs)
    assert len({tuple(epoch) for epoch in epochs}) > 1  # reshuffled between epochs
    endless = PromptSource(config_from_dict({"model": {"path": str(random_actor_dir)}}))
    assert len({endless.train_example(position).prompt_text for position in range(18)}) > 6
    with pytest.raises(ConfigError, match=r"data\.train_size"):
        config_from_dict({"data": {"task": "jsonl", "path": "x.jsonl", "train_size": 6}})


def test_the_default_task_draws_the_problems_it_always_drew():
    # Pinned from before the long-tail variant existed: a resumed or compared run sees the same data.
    assert [arithmetic.problem(i).prompt for i in range(3)] == ["8176+9=", "3631+2525=", "7+21892="]
    assert arithmetic.problem(5, seed=3, split="heldout").prompt == "83+67="


def test_the_longtail_task_has_a_long_tail_of_solution_lengths():
    shape = arithmetic.TASKS["longtail"]
    problems = arithmetic.problems(4000, **shape)
    lengths = sorted(len(p.completion) + 1 for p in problems)  # + EOS; one token per character
    p50, p90, p99 = (lengths[int(q * len(lengths))] for q in (0.5, 0.9, 0.99))
    assert 40 <= p50 <= 100 and p90 >= 150 and p99 >= 300 and lengths[-1] >= 400, (p50, p90, p99, lengths[-1])
    assert lengths[0] <= 20
    assert all(arithmetic.reward(p.completion, p.answer) == 1.0 for p in problems[:200])
    assert problems[7] == arithmetic.problem(7, **shape)
    assert [p.prompt for p in problems[:3]] != [arithmetic.problem(i).prompt for i in range(3)]


def test_little_endian_problems_write_units_first_and_need_the_low_zeros():
    big = arithmetic.problem(3, max_digits=20, digits_decay=0.9)
    little = arithmetic.problem(3, max_digits=20, digits_decay=0.9, little_endian=True)
    a, b = big.prompt[:-1].split("+")
    assert little.prompt == f"{a[::-1]}+{b[::-1]}=" and little.answer == big.answer[::-1]
    assert little.completion.split(arithmetic.ANSWER_PREFIX)[0] == big.completion.split(arithmetic.ANSWER_PREFIX)[0]
    assert arithmetic.reward(little.completion, little.answer) == 1.0
    # 570 little-endian is "075": "75" (57) is wrong, though int("75") == int("075").
    assert arithmetic.reward(" ans 075", "075") == 1.0 and arithmetic.reward(" ans 75", "075") == 0.0
    assert arithmetic.reward(" ans 573", "573") == 1.0


def test_bad_digit_settings_are_rejected():
    with pytest.raises(ValueError, match="max_digits"):
        arithmetic.problem(0, max_digits=65)
    with pytest.raises(ValueError, match="digits_decay"):
        arithmetic.problem(0, digits_decay=0.0)


def test_chat_addition_asks_in_words_and_reads_the_last_number():
    shape = arithmetic.TASKS["chat-addition"]
    problems = arithmetic.problems(300, **shape)
    assert max(p.num_digits for p in problems) == 2 and sum(p.num_digits == 1 for p in problems) > 200
    p = problems[0]
    a, b = p.prompt.rstrip("=").split("+")
    assert arithmetic.chat_question(p) == f"What is {a} + {b}? Answer with just the number."
    assert arithmetic.last_number_reward("7 + 5 = 12", "12") == 1.0
    assert arithmetic.last_number_reward("12, no wait: 13", "12") == 0.0
    assert arithmetic.last_number_reward("The sum is 1,234.", "1234") == 1.0
    assert arithmetic.last_number_reward("I cannot say.", "12") == 0.0
    assert arithmetic.last_number_reward("-12", "12") == 0.0
    assert arithmetic.last_number_reward("It is 12.0.", "12") == 1.0
    assert arithmetic.last_number_reward("12.5", "12") == 0.0


def test_chat_prompts_need_a_pretrained_model_and_home_paths_expand(tmp_path):
    import os

    from respec_async.config import ConfigError, config_from_dict

    with pytest.raises(ConfigError, match=r"model\.path: data\.task = \"chat-addition\" needs a pretrained chat model"):
        config_from_dict({"data": {"task": "chat-addition"}})
    with pytest.raises(ConfigError, match=r"model\.path: data\.chat_template needs"):
        config_from_dict({"data": {"chat_template": True}})
    config = config_from_dict({"model": {"path": "~/models/x"}, "data": {"task": "chat-addition"}})
    assert config.model.path == os.path.join(os.path.expanduser("~"), "models/x")
