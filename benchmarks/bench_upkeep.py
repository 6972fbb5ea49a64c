"""What keeping a drafter ready costs plain decoding: the engine's lazy vs eager drafter upkeep.

    .venv/bin/python benchmarks/bench_upkeep.py [--rounds 5] [--requests 128] [--slots 64]

The zoo target alone, and with the zoo drafter under eager upkeep (the drafter prefilled with
every admitted prompt, caught up every MAX_PENDING_FEATURES plain steps) and under lazy upkeep
(features buffered until SD is next chosen), generate the same requests with SD off: held-out
arithmetic prompts until EOS (temperature 1, at most 192 new tokens), --requests of them
through --slots slots, one torch thread. The three modes run one after the other within each
round, --rounds rounds; the table gives each mode's median CPU seconds over the rounds and its
ratio to the target alone (a per-round ratio, then the median). Writes
benchmarks/results/bench_upkeep.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_engine import load_zoo  # noqa: E402

from respec_async.engine.engine import Engine  # noqa: E402
from respec_async.engine.requests import Request  # noqa: E402
from respec_async.engine.sampling import SamplingParams  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "bench_upkeep.json"
MODES = {"no drafter": (False, None), "eager upkeep": (True, False), "lazy upkeep": (True, True)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--slots", type=int, default=64)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    target, drafter, prompts, eos_id = load_zoo(args.requests)
    params = SamplingParams(temperature=1.0, max_new_tokens=192, stop_token_ids=(eos_id,))
    seconds: dict[str, list[float]] = {mode: [] for mode in MODES}
    tokens: dict[str, int] = {}
    for round_index in range(args.rounds + 1):  # round 0 warms up and is not kept
        for mode, (with_drafter, lazy) in MODES.items():
            engine = Engine(target, drafter if with_drafter else None, max_batch_size=args.slots, max_seq_len=256,
                            seed=round_index, lazy_drafter=lazy)
            start = time.process_time()
            completions = engine.generate([Request(i, p, params) for i, p in enumerate(prompts)], None)
            elapsed = time.process_time() - start
            if round_index:
                seconds[mode].append(elapsed)
                tokens[mode] = tokens.get(mode, 0) + sum(len(c.output_ids) for c in completions)
    base = seconds["no drafter"]
    rows = []
    print(f"\nplain decoding, {args.requests} requests through {args.slots} slots, SD off, {args.rounds} rounds "
          f"(CPU seconds, one thread)")
    print(f"{'mode':<13} | {'median s':>8} | {'tokens':>7} | {'vs no drafter':>13}")
    for mode in MODES:
        ratio = statistics.median(m / b for m, b in zip(seconds[mode], base))
        rows.append({"mode": mode, "seconds": seconds[mode], "median_s": statistics.median(seconds[mode]),
                     "tokens": tokens[mode], "ratio_to_no_drafter": ratio})
        print(f"{mode:<13} | {statistics.median(seconds[mode]):8.3f} | {tokens[mode]:7d} | {ratio:12.3f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "bench_upkeep", "command": " ".join(sys.argv), "rounds": args.rounds,
                               "requests": args.requests, "slots": args.slots, "torch": torch.__version__,
                               "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
