"""Rollout-history drafting on the zoo: its cost per step, its acceptance, its speedup at B = 1.

    .venv/bin/python benchmarks/bench_history.py [--prompts 64] [--samples 8] [--repeats 3]

Workload: an RL generation phase of the zoo task, --prompts held-out arithmetic prompts x
--samples samples (GRPO groups) until EOS at temperature 1 (at most 192 new tokens), streamed
through 64 slots, one torch thread, CPU clock. The same prompts run twice: epoch 1 (the index
starts empty: siblings of a group and the prompt are the only history) and epoch 2 (epoch 1's
rollouts are stored). Three tables:

1. Acceptance length (tokens per verify step) of each history config in both epochs, and the
   RL phase's CPU seconds against plain decoding (the history engine's index carries over from
   epoch 1 to 2; plain runs the same requests, and "plain+index" too with an index kept up,
   what the index costs a plain step).
2. Drafting cost: at active batch size B (slots fed from a queue of epoch-2 requests, index
   holding epoch 1), an engine running history steps and one stepping plainly, interleaved;
   the median drafting seconds of a history step (finding sources, drafting, the draft
   tensors) over the median plain step (steps that admit left out), CPU clock, for a chain and
   a tree.
3. B = 1: epoch-2 groups decoded one sequence at a time, tokens per CPU second of plain,
   EAGLE-3 (3,1,3) and each history config, best of --repeats.

Writes benchmarks/results/bench_history.json.
"""

from __future__ import annotations

import argparse
import copy
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
from respec_async.engine.requests import Request, SDConfig  # noqa: E402
from respec_async.engine.history import HistoryIndex, chain_tensors, draft_tensors  # noqa: E402
from respec_async.engine.sampling import SamplingParams  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "bench_history.json"
HISTORY = {"h 4,1,4": SDConfig(4, 1, 4, "history"), "h 8,1,8": SDConfig(8, 1, 8, "history"),
           "h 16,1,16": SDConfig(16, 1, 16, "history"), "h 8,2,12": SDConfig(8, 2, 12, "history")}
EAGLE = {"eagle 3,1,3": SDConfig(3, 1, 3)}
COST_CONFIGS = ("h 8,1,8", "h 8,2,12")
BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)


def group_requests(prompts, samples, params, tag=""):
    return [Request(f"{tag}{i}:{j}", prompts[i], params) for i in range(len(prompts)) for j in range(samples)]


def run_phase(engine: Engine, requests, sd) -> tuple[float, list]:
    start = time.process_time()
    completions = engine.generate(requests, sd)
    return time.process_time() - start, completions


def acceptance(completions) -> float:
    verify = sum(c.num_verify_steps for c in completions)
    return (sum(c.num_accepted for c in completions) + verify) / verify if verify else 0.0


def drafting_cost(target, stored: HistoryIndex, prompts, args, params, batch_size: int, sd: SDConfig) -> dict:
    """B slots fed from a queue of epoch-2 requests, one engine stepping plainly and one with
    `sd`, interleaved step by step. Before each history step the benchmark drafts for its rows
    as the step would (finding sources, the chain or tree, the draft tensors), timed; the step
    then finds the same drafts ready (rows a step admits are drafted inside it: they are counted
    at the others' per-row rate). CPU time of this thread (one torch thread): on this VM the
    wall clock also measures the neighbours. Plain steps that admit new rows are left out."""
    engines = {}
    for mode in ("plain", "history"):
        engine = Engine(target, None, seed=batch_size, history=copy.deepcopy(stored), max_batch_size=batch_size,
                        max_seq_len=256, max_draft_tokens=64)
        # Enough requests that B stays B (a row that finishes is refilled from the queue).
        rounds = 1 + (4 * batch_size + 4 * args.cost_steps) // (len(prompts) * args.samples)
        for r in range(rounds):
            for request in group_requests(prompts, args.samples, params, f"c{r}-"):
                engine.add_request(request)
        engines[mode] = engine
    plain_s, draft_s = [], []
    for step in range(args.cost_steps):
        for mode, engine in engines.items():
            if not engine.slots.waiting:
                continue
            refill = bool(engine.slots.free_slots)  # this step admits (and prefills) new rows
            drafted = 0.0
            cursors = [engine.slots.running[slot].cursor for slot in sorted(engine.slots.running)]
            if mode == "history" and cursors:
                started = time.thread_time()
                if sd.is_chain:  # the chain and its tensors, as Engine._history_step makes them
                    chain_tensors(*engine.history.draft_chains(cursors, sd.num_steps))
                else:
                    draft_tensors(engine.history.draft(cursors, sd.num_steps, sd.top_k, sd.num_draft_tokens))
                # Rows this step admits are drafted inside it: count them at the others' rate.
                drafted = (time.thread_time() - started) * batch_size / len(cursors)
            started = time.thread_time()
            engine.step(sd if mode == "history" else None)
            elapsed = time.thread_time() - started
            if step < 2 or engine.last_step.num_active != batch_size:
                continue
            if mode == "history":
                draft_s.append(drafted)
            elif not refill:  # a prefill would inflate the plain step
                plain_s.append(elapsed)
    row = {"plain_step_s": statistics.median(plain_s), "draft_s": statistics.median(draft_s),
           "steps": [len(plain_s), len(draft_s)]}
    row["draft_share"] = row["draft_s"] / row["plain_step_s"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--slots", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--b1-prompts", type=int, default=8, help="prompts (x samples) decoded at B = 1")
    parser.add_argument("--cost-steps", type=int, default=150, help="steps for each drafting-cost cell")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    target, drafter, prompts, eos_id = load_zoo(args.prompts)
    params = SamplingParams(temperature=1.0, max_new_tokens=192, stop_token_ids=(eos_id,))
    engine_args = dict(max_batch_size=args.slots, max_seq_len=256, max_draft_tokens=64)
    result: dict = {"benchmark": "bench_history", "command": " ".join(sys.argv), "torch": torch.__version__,
                    "prompts": args.prompts, "samples": args.samples, "slots": args.slots}

    # 1. RL phases, two epochs.
    phases: dict[str, dict] = {}
    plain_engine = Engine(target, None, seed=0, **engine_args)
    plain_engine.generate(group_requests(prompts[:8], 2, params, "warm-"), None)  # first calls are slower
    indexed_engine = Engine(target, None, seed=0, history=HistoryIndex(), **engine_args)
    plain, indexed = [], []
    for e in (1, 2):  # plain decoding without and with an index kept up (every token indexed)
        plain.append(run_phase(plain_engine, group_requests(prompts, args.samples, params, f"e{e}-"), None))
        indexed.append(run_phase(indexed_engine, group_requests(prompts, args.samples, params, f"e{e}-"), None))
    lengths = sorted(len(c.output_ids) for c in plain[0][1])
    phases["plain"] = {"seconds": [p[0] for p in plain], "tokens": [sum(len(c.output_ids) for c in p[1]) for p in plain]}
    phases["plain + index"] = {"seconds": [p[0] for p in indexed],
                               "speedup": [p[0] / q[0] for p, q in zip(plain, indexed)]}
    stored: HistoryIndex | None = None
    for name, sd in HISTORY.items():
        index = HistoryIndex()
        engine = Engine(target, None, seed=0, history=index, **engine_args)
        runs = [run_phase(engine, group_requests(prompts, args.samples, params, f"e{e}-"), sd) for e in (1, 2)]
        if stored is None:  # epoch 1's rollouts for tables 2 and 3: reuse this index (epoch 2 added too)
            stored = HistoryIndex()
            replay = Engine(target, None, seed=1, history=stored, **engine_args)
            replay.generate(group_requests(prompts, args.samples, params, "s-"), None)
        phases[name] = {"seconds": [r[0] for r in runs], "acceptance": [acceptance(r[1]) for r in runs],
                        "tokens": [sum(len(c.output_ids) for c in r[1]) for r in runs],
                        "speedup": [p / r[0] for p, r in zip(phases["plain"]["seconds"], runs)]}
    result["phases"] = phases
    result["completion_lengths"] = {"p50": lengths[len(lengths) // 2], "p90": lengths[int(len(lengths) * 0.9)],
                                    "max": lengths[-1], "mean": sum(lengths) / len(lengths)}
    print(f"\nRL generation phase: {args.prompts} prompts x {args.samples} samples, {args.slots} slots, CPU s "
          f"(completions p50 {result['completion_lengths']['p50']}, max {lengths[-1]} tokens)")
    print(f"{'mode':<11} | {'epoch 1 s':>9} | {'speedup':>7} | {'accept':>6} | {'epoch 2 s':>9} | {'speedup':>7} | {'accept':>6}")
    print(f"{'plain':<11} | {plain[0][0]:9.2f} | {1.0:6.2f}x | {'-':>6} | {plain[1][0]:9.2f} | {1.0:6.2f}x | {'-':>6}")
    r = phases["plain + index"]
    print(f"{'plain+index':<11} | {r['seconds'][0]:9.2f} | {r['speedup'][0]:6.2f}x | {'-':>6} | {r['seconds'][1]:9.2f} | "
          f"{r['speedup'][1]:6.2f}x | {'-':>6}")
    for name in HISTORY:
        r = phases[name]
        print(f"{name:<11} | {r['seconds'][0]:9.2f} | {r['speedup'][0]:6.2f}x | {r['acceptance'][0]:6.2f} | "
              f"{r['seconds'][1]:9.2f} | {r['speedup'][1]:6.2f}x | {r['acceptance'][1]:6.2f}")

    # 2. Drafting cost per step against a plain step, at fixed active batch sizes.
    cost_rows = []
    for batch_size in BATCH_SIZES:
        row = {"batch_size": batch_size}
        for name in COST_CONFIGS:
            row[name] = drafting_cost(target, stored, prompts, args, params, batch_size, HISTORY[name])
        cost_rows.append(row)
    result["drafting_cost"] = cost_rows
    print("\ndrafting cost in history SD steps (index: one epoch stored), medians over the steps, CPU clock: "
          "drafting seconds / a plain step's at the same B (steps that admit left out)")
    print(f"{'B':>3} | {'plain step ms':>13} | " + " | ".join(f"{name + ' draft ms':>18} | {'share':>6}"
                                                           for name in COST_CONFIGS))
    for row in cost_rows:
        cells = [f"{row[name]['draft_s'] * 1e3:18.3f} | {row[name]['draft_share']:6.1%}" for name in COST_CONFIGS]
        print(f"{row['batch_size']:3d} | {row[COST_CONFIGS[0]]['plain_step_s'] * 1e3:13.3f} | " + " | ".join(cells))

    # 3. B = 1, second epoch.
    b1_prompts = prompts[:args.b1_prompts]
    requests = group_requests(b1_prompts, args.samples, params, "b1-")
    b1 = {}
    for name, sd in {"plain": None, **EAGLE, **HISTORY}.items():
        best, tokens, accept = float("inf"), 0, 0.0
        for repeat in range(args.repeats):
            index = copy.deepcopy(stored) if sd is not None and sd.source == "history" else None
            engine = Engine(target, drafter if sd is not None and sd.uses_drafter else None, max_batch_size=1,
                            max_seq_len=256, seed=repeat, history=index)
            seconds, completions = run_phase(engine, requests, sd)
            best = min(best, seconds)
            tokens = sum(len(c.output_ids) for c in completions)
            accept = acceptance(completions)
        b1[name] = {"seconds": best, "tokens": tokens, "tokens_per_s": tokens / best, "acceptance": accept}
    for name in b1:
        b1[name]["speedup"] = b1[name]["tokens_per_s"] / b1["plain"]["tokens_per_s"]
    result["batch_1"] = b1
    print(f"\nB = 1, epoch 2 ({len(requests)} rollouts), best of {args.repeats}, CPU clock")
    print(f"{'mode':<11} | {'tok/s':>7} | {'speedup':>7} | {'accept':>6}")
    for name, row in b1.items():
        print(f"{name:<11} | {row['tokens_per_s']:7.0f} | {row['speedup']:6.2f}x | {row['acceptance']:6.2f}")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
