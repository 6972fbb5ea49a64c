"""`respec report`: one self-contained HTML page per run (or several runs overlaid), its plots
embedded as PNG data that decode to non-blank images, its table read from metrics.jsonl and
the supervisor's log."""

from __future__ import annotations

import base64
import io
import json
import re

import pytest

from respec_async.cli import main
from respec_async.metrics import MetricsWriter
from tests.runtime.test_metrics import record

PLOTS = ["Reward", "Response length", "Throughput", "Staleness", "Speculative decoding", "Drafter lag",
         "Trainer time", "Role timeline"]


def make_run(root, name: str, steps: int = 12, restart: bool = False, sd: bool = True):
    run_dir = root / name
    (run_dir / "logs").mkdir(parents=True)
    writer = MetricsWriter(run_dir / "metrics.jsonl")
    for i in range(steps):
        writer.write(record(step=i, version=i + 1, time=1000.0 + 2 * i, reward_mean=0.2 + 0.03 * i, num_tokens=500,
                            acceptance_length=3.0 if sd else 0.0, sd_step_share=0.5 if sd else 0.0,
                            drafter_lag=0.5 if sd else -1.0,
                            sd_sources={"history": {"acceptance_length": 4.0, "step_share": 0.3},
                                        "eagle": {"acceptance_length": 2.0, "step_share": 0.2}} if sd else {}))
    writer.close()
    events = [("run.started", None, 0), ("role.started", "generator-0", 0), ("role.started", "trainer-0", 0),
              ("role.ready", "generator-0", 3), ("role.ready", "trainer-0", 4)]
    if restart:
        events += [("role.restarting", "generator-0", 10), ("role.started", "generator-0", 11)]
    events += [("role.done", "trainer-0", 30), ("run.finished", None, 31)]
    with open(run_dir / "logs" / "supervisor.jsonl", "w") as f:
        for event, role, t in events:
            line = {"event": event, "level": "info", "timestamp": f"2026-12-01T10:00:{t:02d}.000000"}
            if role:
                line["role"] = role
            f.write(json.dumps(line) + "\n")
    return run_dir


def images(page: str) -> dict[str, bytes]:
    return {name: base64.b64decode(data)
            for name, data in re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([^"]+)">', page)}


def assert_not_blank(png: bytes) -> None:
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("L")
    lo, hi = image.getextrema()
    coloured = sum(image.histogram()[:200])
    assert hi - lo > 100 and coloured > 0.01 * image.width * image.height


def test_one_run_is_one_page_with_every_plot_and_its_summary(tmp_path, capsys):
    run_dir = make_run(tmp_path, "tiny-1", restart=True)
    assert main(["report", str(run_dir)]) == 0
    out = run_dir / "report.html"
    assert capsys.readouterr().out.strip() == str(out)
    page = out.read_text()
    found = images(page)
    assert list(found) == PLOTS
    for png in found.values():
        assert_not_blank(png)
    assert "reward, first -&gt; last steps</td><td>0.335 -&gt; 0.395 (10 each)" in page  # 0.2 + 0.03 x mean(0..9), (2..11)
    assert "role restarts</td><td>1<" in page and "SD acceptance length, mean</td><td>3.00" in page
    assert "completion tokens / s overall</td><td>250<" in page  # 11 x 500 tokens after the first, over 22 s
    assert "src=\"http" not in page and "<script" not in page  # self-contained


def test_several_runs_overlay_in_one_page(tmp_path):
    runs = [make_run(tmp_path, "no-sd", sd=False), make_run(tmp_path, "respec", steps=6)]  # lengths differ
    out = tmp_path / "compare.html"
    assert main(["report", *map(str, runs), "--out", str(out)]) == 0
    page = out.read_text()
    assert list(images(page)) == PLOTS
    assert "<th>no-sd</th><th>respec</th>" in page
    assert "SD acceptance length, mean</td><td>SD off</td><td>3.00</td>" in page
    assert "(10 each)</td><td>" in page and "(6 each)</td></tr>" in page


def test_a_run_without_sd_says_so_instead_of_drawing_empty_sd_plots(tmp_path):
    page = (make_run(tmp_path, "no-sd", sd=False) / "report.html")
    assert main(["report", str(page.parent)]) == 0
    html = page.read_text()
    assert list(images(html)) == [p for p in PLOTS if p not in ("Speculative decoding", "Drafter lag")]
    assert "<h2>Speculative decoding</h2><p>SD off: no run here used speculative decoding.</p>" in html
    assert "<h2>Drafter lag</h2><p>No drafter: SD was off.</p>" in html


def test_a_directory_without_metrics_is_a_one_line_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 1
    assert capsys.readouterr().err.strip() == f"respec report: {tmp_path}: no metrics.jsonl (not a run directory, " \
                                               f"or no step finished yet)"


def test_the_blank_check_can_fail():
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (200, 100), "white").save(buffer, format="PNG")
    with pytest.raises(AssertionError):
        assert_not_blank(buffer.getvalue())
