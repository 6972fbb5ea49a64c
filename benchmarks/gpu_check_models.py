"""The models benchmarks/gpu_check.sh runs on, printed as shell assignments:

    eval "$(.venv/bin/python benchmarks/gpu_check_models.py OUT_DIR)"   # sets ZOO, TARGET, DRAFTER

`--zoo auto` (default): the default zoo when it is already cached (training it takes about ten
minutes on CPU, more than the whole check may), else the micro zoo (`python -m respec_async.zoo
--quick`: same shapes of code path, trained for seconds, not a useful model) built in OUT_DIR.
`--zoo full` trains the default zoo if needed; `--zoo quick` always uses the micro zoo.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from respec_async import zoo  # noqa: E402


def default_zoo_is_cached() -> bool:
    try:
        return zoo.is_complete(zoo.default_cache_dir(), zoo.ZooSpec())
    except Exception:  # the zoo's cache layout is its own business: when in doubt, use the micro zoo
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="where the micro zoo is built")
    parser.add_argument("--zoo", choices=("auto", "full", "quick"), default="auto")
    args = parser.parse_args(argv)
    kind = args.zoo if args.zoo != "auto" else ("full" if default_zoo_is_cached() else "quick")
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    if kind == "full":
        paths = zoo.ensure_zoo(log=log)
    else:
        paths = zoo.ensure_zoo(args.out_dir, spec=zoo.QUICK_SPEC, log=log)
    print(f"ZOO={kind} TARGET={shlex.quote(str(paths.target_dir))} DRAFTER={shlex.quote(str(paths.drafter_dir))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
