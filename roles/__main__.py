"""Entry point of one role process: `python -m roles NAME --run-dir DIR`.

The supervisor starts each role this way; it reads the resolved config, endpoints and keys
from the run directory, sets up logging, and runs the role's actor on uvloop.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

import msgspec
import uvloop

from respec_async.actor import RoleContext
from respec_async.config import Config
from respec_async.endpoints import Endpoints, RoleId
from respec_async.logs import configure_logging
from transport.security import Security

# kind -> "module:ActorClass", imported only when that role is started.
ROLE_CLASSES = {
    "echo": "roles.echo:EchoActor",
    "generator": "roles.generator:GeneratorActor",
    "reward": "roles.reward:RewardActor",
    "trainer": "roles.trainer:TrainerActor",
    "drafter_learner": "roles.drafter_learner:DrafterLearnerActor",
}


def load_actor_class(kind: str) -> type:
    if kind not in ROLE_CLASSES:
        raise SystemExit(f"unknown role kind {kind!r}; known: {', '.join(sorted(ROLE_CLASSES))}")
    module, _, cls = ROLE_CLASSES[kind].partition(":")
    return getattr(importlib.import_module(module), cls)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m roles", description=__doc__)
    parser.add_argument("name", help="role instance name, e.g. generator-0")
    parser.add_argument("--run-dir", required=True, type=Path)
    parser.add_argument("--restart-count", type=int, default=0)
    args = parser.parse_args(argv)

    run_dir: Path = args.run_dir
    config = msgspec.json.decode((run_dir / "config.json").read_bytes(), type=Config)
    if config.model.device.startswith("cuda"):
        from respec_async.models import place_role  # imports torch: only when there is a GPU to place on

        place_role(config, args.name)
    endpoints = Endpoints.load(run_dir / "endpoints.json")
    keys = run_dir / "keys.json"
    security = Security.load(keys) if keys.exists() else Security(insecure=True)
    configure_logging(run_dir / "logs" / f"{args.name}.jsonl", role=args.name, level=config.run.log_level)
    actor_class = load_actor_class(RoleId.parse(args.name).kind)
    try:
        import setproctitle  # optional nicety: `ps` shows the role name

        setproctitle.setproctitle(f"respec:{args.name}")
    except ImportError:
        pass

    async def run() -> int:
        ctx = RoleContext(config, run_dir, args.name, endpoints, security, args.restart_count)
        return await actor_class(ctx).run()

    code = uvloop.run(run())
    # The actor has stopped cleanly; a worker thread may still sit in a collective whose peer
    # is gone (until its timeout). Do not let it hold the process: exit now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
