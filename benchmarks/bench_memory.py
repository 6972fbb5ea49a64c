"""Engine memory: the KV cache size computed from the config against what is allocated, and
the process's resident memory over a long generation run (no per-step growth).

    .venv/bin/python benchmarks/bench_memory.py [--minutes 5] [--batch-size 64]

A stream of held-out arithmetic prompts keeps every slot of the engine busy for --minutes
(finished sequences leave, new ones enter: continuous batching); the SD mode cycles through
plain, a chain and a tree config step by step, so every code path runs, and every --swap-every
steps new target and drafter weights are loaded as a generator loads a broadcast (two weight
sets alternate, so the fused inference path rebuilds its derived weights). RSS is read from
/proc/self/statm every 5 seconds; the first --warmup-s are excluded (allocator and caches
settle). Reported: RSS after warm-up and at the end, the largest, and the slope of a least
squares line through the samples (MB per minute). Target: no per-step growth, i.e. end - start
within 2% of start and the slope under 1 MB/min. Writes benchmarks/results/bench_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from respec_async.engine.checkpoint import load_pretrained  # noqa: E402
from respec_async.engine.drafter import Eagle3Drafter  # noqa: E402
from respec_async.engine.engine import Engine  # noqa: E402
from respec_async.engine.requests import Request, SDConfig  # noqa: E402
from respec_async.engine.model import KVCache  # noqa: E402
from respec_async.engine.sampling import SamplingParams  # noqa: E402
from respec_async.engine.tokenizer import Tokenizer  # noqa: E402
from respec_async.tasks import arithmetic  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "bench_memory.json"


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def slope_mb_per_min(samples: list[tuple[float, float]]) -> float:
    n = len(samples)
    if n < 2:
        return 0.0
    mean_t = sum(t for t, _ in samples) / n
    mean_r = sum(r for _, r in samples) / n
    var = sum((t - mean_t) ** 2 for t, _ in samples)
    return 60 * sum((t - mean_t) * (r - mean_r) for t, r in samples) / var if var else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--warmup-s", type=float, default=30.0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--swap-every", type=int, default=20, help="steps between weight loads (0 = none)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from respec_async.zoo import ensure_zoo

    paths = ensure_zoo(log=lambda message: print(message, file=sys.stderr))
    target = load_pretrained(paths.target_dir).eval()
    drafter = Eagle3Drafter.load_pretrained(paths.drafter_dir, target.embed_tokens).eval()
    tokenizer = Tokenizer.from_dir(paths.target_dir)
    engine = Engine(target, drafter, max_batch_size=args.batch_size, max_seq_len=args.max_seq_len, seed=0)
    stated_target = KVCache.bytes_for(target.config, args.batch_size, engine.cache_len)
    stated_drafter = KVCache.bytes_for(drafter.config.cache_config(), args.batch_size, engine.cache_len)
    allocated_target = engine.cache.num_bytes
    allocated_drafter = engine.drafter_cache.num_bytes
    params = SamplingParams(temperature=1.0, max_new_tokens=192, stop_token_ids=(tokenizer.eos_token_id,))
    modes = [None, SDConfig(4, 1, 4), SDConfig(3, 2, 4)]
    # Two weight sets to alternate between: as loaded, and nudged (a broadcast is a fresh dict).
    with torch.no_grad():
        weight_sets = [({k: v.clone() for k, v in target.state_dict().items()},
                        {k: v.clone() for k, v in drafter.state_dict().items()})]
        weight_sets.append(tuple({k: v * 1.001 if v.is_floating_point() else v for k, v in state.items()}
                                 for state in weight_sets[0]))
    num_swaps = 0
    next_prompt, num_steps, num_tokens, num_done = 0, 0, 0, 0
    samples: list[tuple[float, float]] = []
    start_s = time.perf_counter()
    last_sample = -1e9
    end_s = start_s + 60 * args.minutes
    while time.perf_counter() < end_s:
        while engine.num_active + len(engine.slots.waiting) < args.batch_size:
            problem = arithmetic.problem(next_prompt, seed=0, split="heldout")
            engine.add_request(Request(next_prompt, [tokenizer.bos_token_id] + tokenizer.encode(problem.prompt),
                                       params))
            next_prompt += 1
        finished = engine.step(modes[num_steps % len(modes)])
        num_steps += 1
        if args.swap_every and num_steps % args.swap_every == 0:
            target_state, drafter_state = weight_sets[num_swaps % 2]
            engine.load_target_state({k: v.clone() for k, v in target_state.items()})
            engine.load_drafter_state({k: v.clone() for k, v in drafter_state.items()})
            num_swaps += 1
        num_done += len(finished)
        num_tokens += sum(len(c.output_ids) for c in finished)
        now = time.perf_counter() - start_s
        if now - last_sample >= 5.0:
            last_sample = now
            samples.append((now, rss_mb()))
            print(f"  {now:6.0f}s  rss {samples[-1][1]:8.1f} MB  steps {num_steps:6d}  sequences done {num_done}",
                  flush=True)
    settled = [(t, r) for t, r in samples if t >= args.warmup_s] or samples
    start_rss, end_rss = settled[0][1], settled[-1][1]
    result = {
        "minutes": args.minutes, "batch_size": args.batch_size, "cache_len": engine.cache_len,
        "kv_cache_target_bytes_stated": stated_target, "kv_cache_target_bytes_allocated": allocated_target,
        "kv_cache_drafter_bytes_stated": stated_drafter, "kv_cache_drafter_bytes_allocated": allocated_drafter,
        "num_steps": num_steps, "num_sequences": num_done, "num_tokens": num_tokens,
        "rss_start_mb": start_rss, "rss_end_mb": end_rss, "rss_max_mb": max(r for _, r in settled),
        "rss_slope_mb_per_min": slope_mb_per_min(settled), "samples": samples,
        "step_stats_len": len(engine.step_stats), "num_weight_swaps": num_swaps,
        "fused_inference": target.fused_inference,
    }
    growth = end_rss - start_rss
    result["pass"] = abs(growth) <= 0.02 * start_rss and result["rss_slope_mb_per_min"] < 1.0
    print()
    print(f"KV cache (target):  stated {stated_target / 2**20:.2f} MiB = 2 x {target.config.num_hidden_layers} layers x "
          f"{args.batch_size} slots x {target.config.num_key_value_heads} kv heads x {engine.cache_len} positions x "
          f"{target.config.head_dim} x 4 B; allocated {allocated_target / 2**20:.2f} MiB")
    print(f"KV cache (drafter): stated {stated_drafter / 2**20:.2f} MiB; allocated {allocated_drafter / 2**20:.2f} MiB")
    print(f"weight loads: {num_swaps} (every {args.swap_every} steps); fused inference path: {target.fused_inference}")
    print(f"{'steps':>7} {'sequences':>9} {'tokens':>8} {'rss start':>10} {'rss end':>9} {'rss max':>9} {'slope':>12}")
    print(f"{num_steps:>7} {num_done:>9} {num_tokens:>8} {start_rss:>8.1f}MB {end_rss:>7.1f}MB "
          f"{result['rss_max_mb']:>7.1f}MB {result['rss_slope_mb_per_min']:>+8.2f}MB/min")
    print(f"{'PASS' if result['pass'] else 'MISS'}  no per-step growth: end - start {growth:+.1f} MB "
          f"(limit 2% = {0.02 * start_rss:.1f} MB), slope {result['rss_slope_mb_per_min']:+.2f} MB/min (limit 1)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
