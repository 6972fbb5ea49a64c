"""JSONL dataset: loading, errors that name the line, deterministic shuffling, resumable position."""

from __future__ import annotations

import json

import pytest

from respec_async.tasks.dataset import DatasetError, JsonlDataset


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture
def ten_records(tmp_path):
    return write_jsonl(tmp_path / "data.jsonl", [{"prompt": f"q{i}", "answer": i} for i in range(10)])


def test_loads_records_and_keeps_numeric_answers_as_text(ten_records):
    dataset = JsonlDataset(ten_records, shuffle=False)
    assert len(dataset) == 10
    first = dataset.next()
    assert (first.prompt, first.answer, first.line_number) == ("q0", "0", 1)


@pytest.mark.parametrize("bad_line, message", [
    ("{not json", "not valid JSON"),
    ('{"prompt": "q"}', "missing field 'answer'"),
    ('["q", "a"]', "expected a JSON object"),
    ('{"prompt": 3, "answer": "a"}', "'prompt' must be"),
    ('{"prompt": "q", "answer": null}', "'answer' must be"),
])
def test_a_bad_line_fails_with_an_error_naming_the_file_and_line(tmp_path, bad_line, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "answer": "1"}, "", bad_line])
    with pytest.raises(DatasetError, match=rf"bad\.jsonl:3: .*{message}"):
        JsonlDataset(path)


def test_empty_or_missing_file_is_rejected(tmp_path):
    with pytest.raises(DatasetError, match="no records"):
        JsonlDataset(write_jsonl(tmp_path / "empty.jsonl", [""]))
    with pytest.raises(DatasetError, match="no such file"):
        JsonlDataset(tmp_path / "missing.jsonl")


def test_shuffle_is_deterministic_by_seed_and_each_epoch_visits_every_record(ten_records):
    order = [r.prompt for r in JsonlDataset(ten_records, seed=1).take(20)]
    assert order == [r.prompt for r in JsonlDataset(ten_records, seed=1).take(20)]
    assert order != [r.prompt for r in JsonlDataset(ten_records, seed=2).take(20)]
    assert sorted(order[:10]) == sorted(order[10:]) == sorted(f"q{i}" for i in range(10))
    assert order[:10] != order[10:]  # a new permutation per epoch


def test_resuming_from_a_saved_position_continues_the_same_sequence(ten_records):
    uninterrupted = [r.prompt for r in JsonlDataset(ten_records, seed=5).take(25)]
    first = JsonlDataset(ten_records, seed=5)
    head = [r.prompt for r in first.take(13)]
    state = json.loads(json.dumps(first.state_dict()))
    resumed = JsonlDataset(ten_records, seed=5)
    resumed.load_state_dict(state)
    assert resumed.epoch == 1
    assert head + [r.prompt for r in resumed.take(12)] == uninterrupted


def test_a_position_saved_under_another_seed_is_refused(ten_records):
    state = JsonlDataset(ten_records, seed=5).state_dict()
    with pytest.raises(DatasetError, match="seed"):
        JsonlDataset(ten_records, seed=6).load_state_dict(state)
