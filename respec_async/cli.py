"""The `respec` command.

    respec launch CONFIG [--set a.b=c ...]     start a run under the supervisor
    respec config show CONFIG [--set a.b=c]    print the resolved config (validated)

Config errors are reported as one line naming the file and the dotted key, before anything
starts, with exit code 2.
"""

from __future__ import annotations

import argparse
import sys

from respec_async.config import ConfigError, config_to_toml, load_config


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="path to a TOML config, e.g. configs/tiny.toml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value by dotted key (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="respec", description="Asynchronous RL with speculative decoding (ReSpec).")
    commands = parser.add_subparsers(dest="command", required=True)

    launch = commands.add_parser("launch", help="start a run: the supervisor starts and watches every role")
    _add_config_args(launch)

    config = commands.add_parser("config", help="inspect configs")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    show = config_commands.add_parser("show", help="print the resolved config")
    _add_config_args(show)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    if args.command == "config":
        sys.stdout.write(config_to_toml(config))
        return 0
    if args.command == "launch":
        from respec_async.supervisor import launch

        return launch(config)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
