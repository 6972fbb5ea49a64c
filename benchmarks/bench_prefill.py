"""What GRPO's shared prompts save at admission: the engine with and without prompt sharing.

    .venv/bin/python benchmarks/bench_prefill.py [--rounds 3] [--groups 16] [--samples 8]

An RL generation phase on each zoo (the tiny arithmetic one, prompts ~10 tokens; the long-tail
one, prompts up to ~95): --groups training prompts x --samples samples (GRPO groups), streamed
through 64 slots until EOS (temperature 1), plain decoding and history chains of 8 (epoch 2:
an index holding epoch 1's rollouts of the same prompts), one torch thread, CPU clock. With
`share_prompts` a sample admitted beside a sibling copies the sibling's prompt K/V and runs its
last prompt token only (engine/engine.py, _share_prompt); without it every sample is
prefilled. The two run one after the other in each of --rounds rounds (a fresh seed per
round, the same in both; the order alternates); the table sums admission CPU seconds and
completion tokens over the rounds, and gives the phase's tokens per CPU second (the same seed
does not sample the same completions in both: sharing changes which draw goes to which row,
so compare per token). No drafter model: what sharing saves of the drafter's prompt work
(EAGLE modes) is not in it.
Writes benchmarks/results/bench_prefill.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from respec_async.engine.checkpoint import load_pretrained  # noqa: E402
from respec_async.engine.engine import Engine  # noqa: E402
from respec_async.engine.history import HistoryIndex  # noqa: E402
from respec_async.engine.requests import Request, SDConfig  # noqa: E402
from respec_async.engine.sampling import SamplingParams  # noqa: E402
from respec_async.engine.tokenizer import Tokenizer  # noqa: E402
from respec_async.tasks import arithmetic  # noqa: E402
from respec_async.zoo import ensure_zoo  # noqa: E402
from respec_async.zoo.spec import SPECS, encode_prompt  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "bench_prefill.json"
WORKLOADS = {"arithmetic": 192, "longtail": 480}  # task -> max_new_tokens
MODES = {"plain": None, "history 8,1,8": SDConfig(8, 1, 8, "history")}


def workload(task: str, num_groups: int):
    paths = ensure_zoo(spec=SPECS[task], log=print, with_drafter=False)
    target = load_pretrained(paths.target_dir).eval()
    tokenizer = Tokenizer.from_file(paths.tokenizer_path)
    problems = arithmetic.problems(num_groups, seed=0, split="train", **arithmetic.TASKS[task])
    prompts = [encode_prompt(tokenizer, problem.prompt) for problem in problems]
    assert tokenizer.eos_token_id is not None, f"the {task} zoo's tokenizer has no EOS"
    params = SamplingParams(temperature=1.0, max_new_tokens=WORKLOADS[task], stop_token_ids=(tokenizer.eos_token_id,))
    return target, prompts, params


def phase(engine: Engine, requests, sd) -> tuple[float, float, int]:
    """(whole-phase CPU s, admission CPU s, completion tokens)."""
    admit_s = [0.0]
    admit = engine._admit

    def timed(*args, **kwargs):
        start = time.process_time()
        try:
            return admit(*args, **kwargs)
        finally:
            admit_s[0] += time.process_time() - start

    engine._admit = timed
    start = time.process_time()
    completions = engine.generate(requests, sd)
    return time.process_time() - start, admit_s[0], sum(len(c.output_ids) for c in completions)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--groups", type=int, default=16)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for task in WORKLOADS:
        target, prompts, params = workload(task, args.groups)

        def requests(tag):
            return [Request(f"{tag}{i}:{j}", prompt, params) for i, prompt in enumerate(prompts)
                    for j in range(args.samples)]

        max_seq_len = target.config.max_position_embeddings
        first = Engine(target, None, seed=0, history=HistoryIndex(), max_batch_size=64, max_seq_len=max_seq_len)
        first.generate(requests("epoch1-"), None)
        for mode, sd in MODES.items():
            totals = {share: [0.0, 0.0, 0] for share in (False, True)}
            for round_index in range(args.rounds):
                for share in ((False, True) if round_index % 2 == 0 else (True, False)):
                    engine = Engine(target, None, seed=1 + round_index, history=copy.deepcopy(first.history),
                                    max_batch_size=64, max_seq_len=max_seq_len,
                                    share_prompts=share)
                    for i, value in enumerate(phase(engine, requests("epoch2-"), sd)):
                        totals[share][i] += value
                print(f"  {task} {mode} round {round_index + 1}/{args.rounds}", flush=True)
            (off_s, off_admit, off_tokens), (on_s, on_admit, on_tokens) = totals[False], totals[True]
            rows.append({"task": task, "mode": mode, "rollouts": len(prompts) * args.samples * args.rounds,
                         "off_s": off_s, "off_admit_s": off_admit, "off_tokens": off_tokens,
                         "on_s": on_s, "on_admit_s": on_admit, "on_tokens": on_tokens})
    print("\n| zoo | mode | rollouts | admission CPU s: prefill all / shared | less | admission share of the phase "
          "| phase tokens per CPU s: prefill all / shared | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        off_speed, on_speed = r["off_tokens"] / r["off_s"], r["on_tokens"] / r["on_s"]
        print(f"| {r['task']} | {r['mode']} | {r['rollouts']} | {r['off_admit_s']:.2f} / {r['on_admit_s']:.2f} | "
              f"{1 - r['on_admit_s'] / r['off_admit_s']:.0%} | {r['off_admit_s'] / r['off_s']:.0%} / "
              f"{r['on_admit_s'] / r['on_s']:.0%} | {off_speed:.0f} / {on_speed:.0f} | {on_speed / off_speed:.2f}x |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
