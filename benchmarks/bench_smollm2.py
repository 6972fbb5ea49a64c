"""A real pretrained model on CPU: SmolLM2-135M-Instruct through transformers and the engine, and
rollout-history SD on it.

    .venv/bin/python benchmarks/bench_smollm2.py --dtype bfloat16   # ~18 min; --skip-rl: table 1 only (~2 min)

The model comes from `respec models fetch smollm2-135m` (fetched here if it is not cached).
Prompts: two-operand additions in the chat template ("What is 47 + 38? Think step by step, then
give the answer."), one torch thread, CPU clock (this process's CPU time).

1. Decode throughput without SD: transformers `generate` against the engine, B prompts of one
   static batch at B = 1..64, --new-tokens tokens each (no stop token: the batch stays B),
   temperature 1; --repeats turns of one transformers run then one engine run, best of each
   and the median of the turns' ratios.
2. History SD in an RL generation phase: P prompts x 8 samples (GRPO groups) until EOS or
   --sd-new-tokens, through B slots; epoch 1 decodes plainly and fills a history index, epoch 2
   runs the same prompts again in each mode on a copy of that index: plain, history:4,1,4,
   history:8,1,8 (tokens per CPU second, acceptance), at each temperature of --temperatures.

Writes benchmarks/results/bench_smollm2.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_engine import bench_engine, bench_hf  # noqa: E402

from respec_async import pretrained  # noqa: E402
from respec_async.engine.checkpoint import load_pretrained  # noqa: E402
from respec_async.engine.engine import Engine  # noqa: E402
from respec_async.engine.requests import Request, SDConfig  # noqa: E402
from respec_async.engine.history import HistoryIndex  # noqa: E402
from respec_async.engine.sampling import SamplingParams  # noqa: E402
from respec_async.engine.tokenizer import Tokenizer  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "bench_smollm2.json"
SD_MODES = {"plain": None, "history:4,1,4": SDConfig(4, 1, 4, "history"),
            "history:8,1,8": SDConfig(8, 1, 8, "history")}
GROUP = 8


def chat_prompts(tokenizer: Tokenizer, count: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        text = f"What is {a} + {b}? Think step by step, then give the answer."
        out.append(tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": text}])))
    return out


def rl_phase(target, prompts, slots: int, params: SamplingParams, index: HistoryIndex, sd, seed: int):
    """One generation phase of GROUP samples per prompt through `slots` slots: (CPU s, tokens,
    acceptance length)."""
    requests = [Request(f"{i}:{j}", p, params) for i, p in enumerate(prompts) for j in range(GROUP)]
    engine = Engine(target, None, max_batch_size=slots, max_seq_len=max(map(len, prompts)) + params.max_new_tokens + 1,
                    seed=seed, history=index)
    start = time.process_time()
    completions = engine.generate(requests, sd)
    seconds = time.process_time() - start
    verify = sum(c.num_verify_steps for c in completions)
    accepted = sum(c.num_accepted for c in completions)
    return seconds, sum(len(c.output_ids) for c in completions), (accepted + verify) / verify if verify else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-sizes", default="1,4,16,64")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=4, help="turns of table 1 (one run of each side a turn)")
    parser.add_argument("--sd-batch-sizes", default="1,8,32", help="slots of the RL phases; prompts = max(1, B/8)x2")
    parser.add_argument("--sd-new-tokens", type=int, default=48)
    parser.add_argument("--temperatures", default="1.0,0.6")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--skip-rl", action="store_true", help="table 1 only (no RL generation phases)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="weights of both the engine and transformers")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    path = pretrained.fetch("smollm2-135m", progress=print)
    dtype = getattr(torch, args.dtype)
    target = load_pretrained(path, dtype=dtype).eval()
    tokenizer = Tokenizer.from_dir(path)
    result: dict = {"benchmark": "bench_smollm2", "command": " ".join(sys.argv), "torch": torch.__version__,
                    "model": str(path), "threads": 1, "clock": "cpu",
                    "dtype": args.dtype, "cpu_bf16": torch.cpu._is_avx512_bf16_supported(),
                    "cpu_amx": torch.cpu._is_amx_tile_supported()}

    # 1. transformers vs the engine, no SD.
    hf = None
    if not args.skip_hf:
        import transformers
        hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    rows = []
    print(f"\ndecode throughput, no SD: B prompts, {args.new_tokens} new tokens each, temperature 1, CPU clock")
    print(f"{'B':>3} | {'transformers tok/s':>18} | {'engine tok/s':>12} | {'engine / hf':>11} | "
          f"{'median of turns':>14}")
    for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
        prompts = chat_prompts(tokenizer, batch_size, seed=batch_size)
        row = {"batch_size": batch_size, "hf_runs": [], "engine_runs": []}
        # One run of each in turn, so a change in the machine's speed lands on both sides.
        for _ in range(args.repeats):
            if hf is not None:
                row["hf_runs"].append(bench_hf(hf, prompts, batch_size, args.new_tokens, 1.0, None, 1)["cpu"])
            rates, _ = bench_engine(target, None, prompts, batch_size, args.new_tokens, 1.0, None, None, 1)
            row["engine_runs"].append(rates["cpu"])
        row["engine"] = max(row["engine_runs"])
        row["hf"] = max(row["hf_runs"]) if hf is not None else None
        row["speedup"] = row["engine"] / row["hf"] if hf is not None else None
        # The median of each turn's ratio: the best-of ratio can pair a fast moment with a slow one.
        row["median_pair_speedup"] = (statistics.median(e / h for e, h in zip(row["engine_runs"], row["hf_runs"]))
                                      if hf is not None else None)
        rows.append(row)
        hf_cell = f"{row['hf']:18.1f}" if hf is not None else f"{'-':>18}"
        ratio = f"{row['speedup']:10.2f}x" if hf is not None else f"{'-':>11}"
        pair = f"{row['median_pair_speedup']:13.2f}x" if hf is not None else f"{'-':>14}"
        print(f"{batch_size:3d} | {hf_cell} | {row['engine']:12.1f} | {ratio} | {pair}", flush=True)
    result["throughput"] = rows
    del hf

    # 2. History SD in RL generation phases.
    phases = []
    if not args.skip_rl:
        print(f"\nRL generation phase, epoch 2 (epoch 1's rollouts stored): prompts x {GROUP} samples through B "
              f"slots, until EOS or {args.sd_new_tokens} tokens, CPU clock")
        print(f"{'T':>4} | {'B':>3} | {'rollouts':>8} | " + " | ".join(f"{name:>22}" for name in SD_MODES))
    for temperature in [] if args.skip_rl else [float(t) for t in args.temperatures.split(",")]:
        params = SamplingParams(temperature=temperature, max_new_tokens=args.sd_new_tokens,
                                stop_token_ids=(tokenizer.eos_token_id,))
        for slots in [int(b) for b in args.sd_batch_sizes.split(",")]:
            prompts = chat_prompts(tokenizer, max(1, slots // GROUP) * 2, seed=1000 + slots)
            index = HistoryIndex()
            rl_phase(target, prompts, slots, params, index, None, seed=0)  # epoch 1 fills the index
            cells = {}
            for name, sd in SD_MODES.items():
                seconds, tokens, accept = rl_phase(target, prompts, slots, params, copy.deepcopy(index), sd, seed=1)
                cells[name] = {"seconds": seconds, "tokens": tokens, "tok_s": tokens / seconds, "acceptance": accept}
            for cell in cells.values():
                cell["speedup"] = cell["tok_s"] / cells["plain"]["tok_s"]
            phases.append({"temperature": temperature, "slots": slots, "rollouts": len(prompts) * GROUP,
                           "modes": cells})
            print(f"{temperature:4.1f} | {slots:3d} | {len(prompts) * GROUP:8d} | " + " | ".join(
                f"{c['tok_s']:6.1f} t/s {c['speedup']:4.2f}x L{c['acceptance']:4.2f}" for c in cells.values()),
                flush=True)
    result["rl_phases"] = phases
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
