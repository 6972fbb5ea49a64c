"""metrics.jsonl written and read across a killed trainer; the console line per step (acceptance
length only where SD ran, the filtered share only where dynamic sampling dropped groups)."""

from __future__ import annotations

from respec_async.metrics import MetricsWriter, StepRecord, read_metrics


def record(**overrides) -> StepRecord:
    fields = dict(step=3, version=4, time=0.0, reward_mean=0.5, accuracy=0.25, response_len_mean=30.0,
                  response_len_max=60, num_samples=8, num_tokens=240, tokens_per_s=1000.0, staleness={"0": 8},
                  staleness_max=0, acceptance_length=0.0, sd_step_share=0.0, wait_s=0.1, train_s=0.2, sync_s=0.01,
                  generation_s=0.3, loss=0.1, clip_fraction=0.0, is_weight_mean=1.0, kl=0.0)
    return StepRecord(**{**fields, **overrides})


def test_console_fields_leave_out_what_did_not_happen():
    plain = record().console_fields()
    assert "accept_len" not in plain and "filtered" not in plain and plain["step"] == 3
    sd = record(acceptance_length=3.456, sd_step_share=0.5, num_filtered=2, filtered_share=0.4).console_fields()
    assert sd["accept_len"] == 3.46 and sd["filtered"] == 0.4


def test_a_writer_after_a_killed_one_ends_its_cut_off_line_and_the_reader_skips_it(tmp_path):
    path = tmp_path / "metrics.jsonl"
    writer = MetricsWriter(path)
    writer.write(record(step=0))
    writer.close()
    with open(path, "ab") as f:
        f.write(b'{"step":1,"vers')  # killed mid-line
    writer = MetricsWriter(path)  # the restarted trainer
    writer.write(record(step=1))
    writer.close()
    assert [r.step for r in read_metrics(path)] == [0, 1]  # joined to the fragment, step 1 was lost
