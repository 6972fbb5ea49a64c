"""`respec report RUN_DIR [RUN_DIR ...]`: one self-contained HTML page of a run's metrics, or of
several runs overlaid (e.g. the arms of bench_e2e).

The page (`RUN_DIR/report.html` for one run, `--out` or ./report.html for several) embeds its
plots as PNG data, so it opens anywhere without the run directory: a summary table (steps, wall
time, reward and accuracy first vs last window, tokens/s, staleness, SD share and acceptance,
role restarts), then reward and accuracy, response length, generation throughput, staleness,
SD step share and acceptance length per draft source, drafter lag, where the trainer's time
went, and the role timeline (starts, restarts, exits from the supervisor's log).
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from respec_async.ledger import audit_run
from respec_async.metrics import StepRecord, moving_average, read_metrics

WINDOW = 10  # steps averaged for the table's first / last reward


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


@dataclass
class Run:
    name: str
    run_dir: Path
    records: list[StepRecord]
    # (seconds since the run started, role, event) from the supervisor's log, and when it ended
    role_events: list[tuple[float, str, str]] = field(default_factory=list)
    end_s: float = 0.0

    @classmethod
    def load(cls, run_dir: Path) -> "Run":
        path = run_dir / "metrics.jsonl"
        if not path.exists():
            raise ValueError(f"{run_dir}: no metrics.jsonl (not a run directory, or no step finished yet)")
        records = read_metrics(path)
        if not records:
            raise ValueError(f"{path} has no step records yet")
        return cls(run_dir.name, run_dir, records, *_role_events(run_dir / "logs" / "supervisor.jsonl"))

    @property
    def restarts(self) -> int:
        return sum(event == "role.restarting" for _, _, event in self.role_events)


def _role_events(path: Path) -> tuple[list[tuple[float, str, str]], float]:
    """The roles' lifecycle events, in seconds since run.started, and the last event's time."""
    wanted = {"role.started", "role.ready", "role.restarting", "role.failed", "role.done"}
    out, start, last = [], None, 0.0
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            event = json.loads(line)
            when = datetime.fromisoformat(event["timestamp"]).timestamp()
        except (json.JSONDecodeError, KeyError, ValueError):
            continue
        if start is None:
            start = when
        last = max(last, when)
        if event.get("event") in wanted and "role" in event:
            out.append((when, event["role"], event["event"]))
    start = start or 0.0
    return [(when - start, role, name) for when, role, name in out], last - start


def summary_rows(run: Run) -> dict[str, str]:
    r = run.records
    window = min(WINDOW, len(r))
    wall_s = r[-1].time - r[0].time
    sd = [x.sd_step_share for x in r]
    accept = [x.acceptance_length for x in r if x.acceptance_length > 0]
    lags = [x.drafter_lag for x in r if x.drafter_lag >= 0]
    return {
        "steps": str(len(r)),
        "wall time (first to last step)": f"{wall_s:.0f} s",
        # Fixed labels (the window in the cell): overlaid runs of different lengths share rows.
        "reward, first -> last steps": f"{_mean(x.reward_mean for x in r[:window]):.3f} -> "
                                       f"{_mean(x.reward_mean for x in r[-window:]):.3f} ({window} each)",
        "accuracy, first -> last steps": f"{_mean(x.accuracy for x in r[:window]):.3f} -> "
                                         f"{_mean(x.accuracy for x in r[-window:]):.3f} ({window} each)",
        # The tokens of the steps after the first, over the time between the first and last.
        "completion tokens / s overall": f"{sum(x.num_tokens for x in r[1:]) / wall_s:.0f}" if wall_s > 0 else "-",
        "response length, mean": f"{_mean(x.response_len_mean for x in r):.1f}",
        "staleness, max versions behind": str(max(x.staleness_max for x in r)),
        "SD share of decode steps, mean": f"{_mean(sd):.0%}",
        "SD acceptance length, mean": f"{_mean(accept):.2f}" if accept else "SD off",
        "drafter lag, mean versions": f"{_mean(lags):.2f}" if lags else "no drafter",
        "groups filtered (dynamic sampling)": str(sum(x.num_filtered for x in r)),
        "role restarts": str(run.restarts),
        "prompt groups (ledger)": _ledger_cell(run.run_dir),
    }


def _ledger_cell(run_dir: Path) -> str:
    result = audit_run(run_dir)
    return "no ledger" if result is None else result.summary()


def _figures(runs: list[Run]):
    """(title, figure) per plot, or (title, a line of text) where there is nothing to plot (SD off
    in every run); every plot overlays the runs, one colour each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    overlay = len(runs) > 1
    colours = [f"C{i}" for i in range(len(runs))]

    def lines(ax, key, label, smooth=True, raw=not overlay, style="-", where=lambda v: True):
        for run, colour in zip(runs, colours):
            steps = [r.step for r in run.records]
            values = [key(r) if where(key(r)) else float("nan") for r in run.records]
            name = f"{run.name}: {label}" if overlay else label
            if raw and smooth:
                ax.plot(steps, values, color=colour, alpha=0.25, linestyle=style)
            ax.plot(steps, moving_average(values, 5) if smooth else values, color=colour, linestyle=style,
                    label=name + (" (5-step avg)" if smooth else ""))

    def figure(title, ylabel):
        fig, ax = plt.subplots(figsize=(11, 3.8) if overlay else (8, 3.6))
        ax.set(title=title, xlabel="RL step", ylabel=ylabel)
        ax.grid(alpha=0.3)
        return fig, ax

    out = []
    fig, ax = figure("Reward and accuracy", "reward / accuracy")
    lines(ax, lambda r: r.reward_mean, "mean reward")
    lines(ax, lambda r: r.accuracy, "accuracy", raw=False, style="--")
    out.append(("Reward", fig))

    fig, ax = figure("Response length", "completion tokens")
    lines(ax, lambda r: r.response_len_mean, "mean")
    lines(ax, lambda r: float(r.response_len_max), "max", smooth=False, style=":")
    out.append(("Response length", fig))

    fig, ax = figure("Generation throughput", "completion tokens / s")
    lines(ax, lambda r: r.tokens_per_s, "tokens / s while generating")
    out.append(("Throughput", fig))

    fig, ax = figure("Staleness of trained rollouts", "versions behind")
    lines(ax, lambda r: sum(int(k) * n for k, n in r.staleness.items()) / max(r.num_samples, 1), "mean",
          smooth=False)
    lines(ax, lambda r: float(r.staleness_max), "max", smooth=False, style=":")
    out.append(("Staleness", fig))

    if not any(r.sd_step_share > 0 for run in runs for r in run.records):
        # An empty chart with a made-up axis says less than this line.
        out.append(("Speculative decoding", "SD off: no run here used speculative decoding."))
        out.append(("Drafter lag", "No drafter: SD was off."))
    fig, (share_ax, accept_ax) = plt.subplots(1, 2, figsize=(13, 3.8) if overlay else (10, 3.6))
    for run, colour in zip(runs, colours):
        steps = [r.step for r in run.records]
        prefix = f"{run.name}: " if overlay else ""
        sources = sorted({s for r in run.records for s in r.sd_sources})
        what = "all sources" if len(sources) != 1 else sources[0]
        share_ax.plot(steps, [r.sd_step_share for r in run.records], color=colour, label=prefix + what)
        accept_ax.plot(steps, [r.acceptance_length or float("nan") for r in run.records], color=colour,
                       label=prefix + what)
        for source, style in zip(sources if len(sources) > 1 else (), (":", "--", "-.")):
            share_ax.plot(steps, [r.sd_sources.get(source, {}).get("step_share", 0.0) for r in run.records],
                          color=colour, linestyle=style, label=prefix + source)
            accept_ax.plot(steps, [r.sd_sources.get(source, {}).get("acceptance_length", float("nan"))
                                   for r in run.records], color=colour, linestyle=style, label=prefix + source)
    share_ax.set(title="SD share of decode steps", xlabel="RL step", ylabel="share", ylim=(0, 1.05))
    accept_ax.set(title="Acceptance length (tokens per verify step)", xlabel="RL step", ylabel="tokens")
    for ax in (share_ax, accept_ax):
        ax.grid(alpha=0.3)
    fig_lag, ax = figure("Drafter lag: actor versions the drafting drafter was behind", "versions")
    lines(ax, lambda r: r.drafter_lag, "drafter lag", smooth=False, where=lambda v: v >= 0)
    if not any(title == "Speculative decoding" for title, _ in out):
        out += [("Speculative decoding", fig), ("Drafter lag", fig_lag)]
    else:
        plt.close(fig)
        plt.close(fig_lag)

    fig, ax = figure("Trainer time per step", "seconds")
    if overlay:
        lines(ax, lambda r: r.wait_s + r.train_s + r.sync_s, "wait + train + sync")
        lines(ax, lambda r: r.wait_s, "waiting for rollouts", raw=False, style="--")
    else:
        records = runs[0].records
        ax.stackplot([r.step for r in records], [r.wait_s for r in records], [r.train_s for r in records],
                     [r.sync_s for r in records], labels=["waiting for rollouts", "training", "weight sync"],
                     alpha=0.8)
    out.append(("Trainer time", fig))

    fig, ax = plt.subplots(figsize=(8, 0.6 + 0.35 * max(1, sum(len({e[1] for e in r.role_events}) for r in runs))))
    ax.set(title="Role timeline (starts, ready, restarts, exits)", xlabel="seconds since the run started")
    markers = {"role.started": ("|", "start"), "role.ready": (".", "ready"), "role.restarting": ("x", "restart"),
               "role.failed": ("v", "failed"), "role.done": ("s", "done")}
    labels, seen = [], set()
    for run, colour in zip(runs, colours):
        roles = sorted({role for _, role, _ in run.role_events})
        for role in roles:
            y = len(labels)
            labels.append(f"{run.name}: {role}" if overlay else role)
            times = [t for t, name, _ in run.role_events if name == role]
            ended = [t for t, name, event in run.role_events if name == role and event in ("role.done", "role.failed")]
            # A role lives from its first start to its exit, or to the run's end.
            ax.plot([min(times), max(ended) if ended else run.end_s], [y, y], color=colour, alpha=0.3, linewidth=4)
            for t, name, event in run.role_events:
                if name == role:
                    marker, text = markers[event]
                    ax.plot([t], [y], marker=marker, color="black" if event != "role.restarting" else "red",
                            linestyle="", label=text if text not in seen else None, markersize=8)
                    seen.add(text)
    ax.set_yticks(range(len(labels)), labels)
    if seen:
        ax.legend(fontsize=7, loc="lower right")
    out.append(("Role timeline", fig))

    for _, fig in out:
        if isinstance(fig, str):
            continue
        for ax in fig.axes:
            if ax.get_legend_handles_labels()[0] and ax.get_legend() is None:
                # Overlaid runs: the legend beside the plot, where it hides no curve.
                ax.legend(fontsize=7, **({"loc": "upper left", "bbox_to_anchor": (1.01, 1.0)} if overlay else {}))
        fig.tight_layout()
    return out


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def render(runs: list[Run]) -> str:
    """The page's HTML."""
    title = runs[0].name if len(runs) == 1 else f"{len(runs)} runs: " + ", ".join(r.name for r in runs)
    rows = [summary_rows(run) for run in runs]
    head = "".join(f"<th>{html.escape(run.name)}</th>" for run in runs)
    body = "".join(f"<tr><td>{html.escape(key)}</td>" + "".join(f"<td>{html.escape(row[key])}</td>" for row in rows)
                   + "</tr>" for key in rows[0])
    plots = "".join(f"<h2>{html.escape(name)}</h2><p>{html.escape(fig)}</p>" if isinstance(fig, str) else
                    f'<h2>{html.escape(name)}</h2><img alt="{html.escape(name)}" src="data:image/png;base64,'
                    f'{_png(fig)}">' for name, fig in _figures(runs))
    where = "".join(f"<li>{html.escape(run.name)}: {html.escape(str(run.run_dir))}</li>" for run in runs)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>respec report: {html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1060px; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
td, th {{ border: 1px solid #ccc; padding: 4px 10px; text-align: left; }}
th {{ background: #f3f3f3; }}
img {{ max-width: 100%; }}
h2 {{ margin-top: 1.6em; font-size: 1.15em; }}
</style></head><body>
<h1>respec report: {html.escape(title)}</h1>
<table><tr><th></th>{head}</tr>{body}</table>
{plots}
<h2>Runs</h2><ul>{where}</ul>
</body></html>
"""


def write_report(run_dirs: list[Path], out: Path | None = None) -> Path:
    """Write the page for these runs; returns its path."""
    runs = [Run.load(Path(d)) for d in run_dirs]
    if out is None:
        out = runs[0].run_dir / "report.html" if len(runs) == 1 else Path("report.html")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(runs))
    return out
