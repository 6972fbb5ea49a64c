"""`python -m respec_async.zoo`: make sure of (train, or find cached) a task's zoo and print
its stamp."""

from __future__ import annotations

import argparse
import json
import time

from respec_async.zoo.cache import SHIPPED_DIR, ensure_zoo, read_stamp, ship
from respec_async.zoo.spec import QUICK_SPEC, SPECS

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m respec_async.zoo", description="Train (or find cached) the tiny model zoo: a target and its EAGLE-3 drafter.")
    parser.add_argument("--out", help="cache directory (default: $RESPEC_ZOO_DIR or ~/.cache/respec_async/zoo)")
    parser.add_argument("--force", action="store_true", help="retrain even when a matching zoo is cached")
    parser.add_argument("--quick", action="store_true", help="a micro zoo in seconds (tests; not a useful model)")
    parser.add_argument("--task", choices=sorted(SPECS), default="arithmetic",
                        help="the task's zoo (data.task; default arithmetic)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for training (default 1)")
    parser.add_argument("--ship", action="store_true",
                        help=f"also copy the trained stages into {SHIPPED_DIR} (the copies shipped with the package)")
    args = parser.parse_args(argv)
    spec = QUICK_SPEC if args.quick else SPECS[args.task]
    start_s = time.perf_counter()
    paths = ensure_zoo(args.out, spec=spec, force=args.force, log=lambda message: print(message, flush=True),
                       num_threads=args.threads)
    if args.ship:
        ship(paths)
    metrics = read_stamp(paths)["metrics"]
    print(json.dumps(metrics, indent=2))
    print(f"target:    {paths.target_dir}\ndrafter:   {paths.drafter_dir}\ntokenizer: {paths.tokenizer_path}\n"
          f"({time.perf_counter() - start_s:.0f}s)")
    return 0


