"""The HTML report of a real run, opened in a real headless browser (Debian's Chromium): every
embedded plot decodes there, and the screenshot shows them (drawn lines, not a blank or broken
page). Skipped where Chromium is not installed (`apt-get install chromium`; .ci/run does)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest

from tests.roles.conftest import rl_config
from tests.roles.test_rl_loop import finished

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (Debian: apt-get install chromium)")

# What the machine's closed network needs: no background connections, no sandbox as root.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars"]


def chromium(*args: str, user_dir) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={user_dir}", *args],
                          capture_output=True, text=True, timeout=120)


def plot_pixels(png_path) -> int:
    """Pixels in the colours of matplotlib's first curves (blue C0, orange C1): drawn plot lines."""
    import numpy as np
    from PIL import Image

    pixels = np.asarray(Image.open(png_path).convert("RGB"), dtype=np.int32)
    return int(sum((np.abs(pixels - colour).sum(axis=-1) < 60).sum() for colour in ([31, 119, 180], [255, 127, 14])))


def test_the_report_of_a_real_run_renders_its_plots_in_chromium(launch, random_actor_dir, tmp_path):
    run = launch(rl_config(random_actor_dir, steps=6))
    finished(run)
    page = tmp_path / "report.html"
    proc = subprocess.run([sys.executable, "-m", "respec_async.cli", "report", str(run.run_dir), "--out", str(page)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    html = page.read_text()
    num_images = html.count("<img ")
    assert num_images >= 6  # SD off here: its two plots are a line of text
    # The browser's own word on the images: a script counts those it decoded into the title.
    probe = tmp_path / "probe.html"
    probe.write_text(html.replace("</body>", "<script>window.onload = () => { document.title = 'decoded ' + "
                                  "[...document.images].filter(i => i.complete && i.naturalWidth > 0).length; }"
                                  "</script></body>"))
    dom = chromium("--virtual-time-budget=5000", "--dump-dom", probe.as_uri(), user_dir=tmp_path / "chrome1")
    assert re.search(r"<title>decoded (\d+)</title>", dom.stdout), dom.stderr[-2000:]
    assert int(re.search(r"<title>decoded (\d+)</title>", dom.stdout).group(1)) == num_images
    shot = tmp_path / "report.png"
    chromium("--window-size=1280,3000", f"--screenshot={shot}", page.as_uri(), user_dir=tmp_path / "chrome2")
    assert shot.exists() and shot.stat().st_size > 10_000
    assert plot_pixels(shot) > 2_000  # a blank page or broken images have none
