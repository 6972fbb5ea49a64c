"""`respec report RUN_DIR`: PNG plots of a run's metrics.jsonl.

Writes `RUN_DIR/report/{reward,acceptance,throughput,staleness,time}.png` and prints their
paths: reward and accuracy, SD acceptance length and SD share, generation tokens/s, the
staleness of each batch, and where the trainer's time went, all over optimizer steps.
"""

from __future__ import annotations

from pathlib import Path

from respec_async.metrics import StepRecord, read_metrics


def _smooth(values: list[float], window: int = 5) -> list[float]:
    out = []
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1): i + 1]
        out.append(sum(chunk) / len(chunk))
    return out


def write_report(run_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records: list[StepRecord] = read_metrics(run_dir / "metrics.jsonl")
    if not records:
        raise ValueError(f"{run_dir}/metrics.jsonl has no step records yet")
    out_dir = run_dir / "report"
    out_dir.mkdir(exist_ok=True)
    steps = [r.step for r in records]
    written = []

    def save(fig, name: str) -> None:
        path = out_dir / f"{name}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    fig, ax = plt.subplots(figsize=(7, 4))
    reward = [r.reward_mean for r in records]
    ax.plot(steps, reward, alpha=0.35, label="mean reward")
    ax.plot(steps, _smooth(reward), label="mean reward (5-step avg)")
    ax.plot(steps, _smooth([r.accuracy for r in records]), label="accuracy (5-step avg)")
    ax.set(xlabel="step", ylabel="reward", title="Reward")
    ax.legend()
    save(fig, "reward")

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r.acceptance_length for r in records], label="acceptance length")
    ax.set(xlabel="step", ylabel="tokens per verify step", title="Speculative decoding")
    ax2 = ax.twinx()
    ax2.plot(steps, [r.sd_step_share for r in records], color="tab:orange", alpha=0.6, label="SD step share")
    sources = sorted({source for r in records for source in r.sd_sources})
    if len(sources) > 1:  # per draft source (EAGLE drafter, rollout history) where both ran
        for source, style in zip(sources, (":", "--")):
            ax.plot(steps, [r.sd_sources.get(source, {}).get("acceptance_length", float("nan")) for r in records],
                    linestyle=style, label=f"acceptance, {source}")
            ax2.plot(steps, [r.sd_sources.get(source, {}).get("step_share", 0.0) for r in records],
                     color="tab:orange", linestyle=style, alpha=0.6, label=f"step share, {source}")
    ax2.set_ylabel("share of decode steps with SD")
    ax2.set_ylim(0, 1.05)
    ax.legend(loc="upper left")
    ax2.legend(loc="upper right")
    save(fig, "acceptance")

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [r.tokens_per_s for r in records])
    ax.set(xlabel="step", ylabel="completion tokens / s", title="Generation throughput")
    save(fig, "throughput")

    fig, ax = plt.subplots(figsize=(7, 4))
    max_k = max(int(k) for r in records for k in r.staleness) if records else 0
    bottom = [0.0] * len(records)
    for k in range(max_k + 1):
        share = [r.staleness.get(str(k), 0) / max(r.num_samples, 1) for r in records]
        ax.bar(steps, share, bottom=bottom, label=f"{k} behind", width=1.0)
        bottom = [b + s for b, s in zip(bottom, share)]
    ax.set(xlabel="step", ylabel="share of rollouts", title="Staleness of trained rollouts (versions behind)")
    ax.legend()
    save(fig, "staleness")

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.stackplot(steps, [r.wait_s for r in records], [r.train_s for r in records], [r.sync_s for r in records],
                 labels=["waiting for rollouts", "training", "weight sync"])
    ax.set(xlabel="step", ylabel="seconds", title="Trainer time per step")
    ax.legend(loc="upper left")
    save(fig, "time")
    return written
