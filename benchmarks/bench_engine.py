"""Generation throughput: transformers `generate` vs. our engine, without and with speculative decoding.

    .venv/bin/python benchmarks/bench_engine.py                      # the tiny zoo (trained if missing)
    .venv/bin/python benchmarks/bench_engine.py --target DIR --drafter DIR --batch-sizes 1,4,16

For every active batch size B the engine gets B slots. Workload "stream" (the default when the
target has a tokenizer with an end-of-sequence token, as the zoo does): max(2B, 8) held-out
prompts, each generated until EOS (or --new-tokens), so the engine keeps refilling its B slots
as a rollout generator does and the drafter sees real completions; transformers runs the same
prompts in static batches of B, each batch until its longest sequence ends. Workload "fixed":
B prompts and exactly --new-tokens tokens each, no stop token, so the active batch is B
throughout. tokens/s counts output tokens (up to and including EOS). Rows: (a) transformers' AutoModelForCausalLM.generate on the same checkpoint directory,
(b) our engine with SD off, (c) our engine with SD on for each (s, t, n) of the grid, with its
mean acceptance length (accepted drafts + 1 per verify step). Prints a table and writes
benchmarks/results/bench_engine.json. Each cell is the best of --repeats timed runs.

Throughput is measured twice: wall clock, and this process's CPU time (`--clock cpu`, the
default for the table on CPU). On a machine shared with other jobs the wall clock mostly
measures the neighbours; with one thread, CPU time is what the work itself cost. The JSON has
both. `--device cuda` runs every row on the GPU (float32, TF32 off unless --tf32) and reports
wall clock: every timed run ends by reading its tokens back to the host, which waits for the GPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from respec_async.engine.checkpoint import load_pretrained  # noqa: E402
from respec_async.engine.drafter import Eagle3Drafter  # noqa: E402
from respec_async.engine.engine import Engine  # noqa: E402
from respec_async.engine.requests import Request, SDConfig  # noqa: E402
from respec_async.engine.sampling import SamplingParams  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "bench_engine.json"
DEFAULT_GRID = "3,1,3 5,1,5 7,1,7 3,2,4 4,2,6 5,4,16 5,8,32"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", help="target checkpoint dir (default: the zoo's)")
    parser.add_argument("--drafter", help="drafter dir (default: the zoo's)")
    parser.add_argument("--batch-sizes", default="1,2,4,8,16,32,64")
    parser.add_argument("--grid", default=DEFAULT_GRID, help="SD configs 's,t,n' separated by spaces")
    parser.add_argument("--new-tokens", type=int, default=128, help="max new tokens (exact with --workload fixed)")
    parser.add_argument("--workload", choices=("stream", "fixed"), help="default: stream if the target has an EOS")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-hf", action="store_true", help="leave out transformers generate")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N: where both models run (default cpu)")
    parser.add_argument("--tf32", action="store_true", help="allow TF32 matmuls on CUDA")
    parser.add_argument("--clock", choices=("cpu", "wall"), help="clock the table reports (default: cpu on CPU, "
                        "wall on CUDA)")
    parser.add_argument("--out", default=str(RESULTS))
    return parser.parse_args()


def resolve_paths(args) -> tuple[Path, Path | None, Path | None]:
    """(target dir, drafter dir, tokenizer.json or None)."""
    if args.target:
        target_dir = Path(args.target)
        tokenizer = target_dir / "tokenizer.json"
        return target_dir, Path(args.drafter) if args.drafter else None, tokenizer if tokenizer.is_file() else None
    from respec_async.zoo import ensure_zoo
    paths = ensure_zoo(log=print)
    return paths.target_dir, Path(args.drafter) if args.drafter else paths.drafter_dir, paths.tokenizer_path


def load_zoo(num_prompts: int):
    """The zoo's target and drafter (trained first if not cached), num_prompts held-out prompts
    and the EOS id, for the benchmarks that run on the zoo alone."""
    from respec_async.engine.checkpoint import load_pretrained
    from respec_async.engine.drafter import Eagle3Drafter
    from respec_async.zoo import ensure_zoo
    paths = ensure_zoo(log=print)
    target = load_pretrained(paths.target_dir).eval()
    drafter = Eagle3Drafter.load_pretrained(paths.drafter_dir, target.embed_tokens).eval()
    prompts, eos_id = make_prompts(paths.tokenizer_path, target.config.vocab_size, num_prompts)
    return target, drafter, prompts, eos_id


def make_prompts(tokenizer_path: Path | None, vocab_size: int, num_prompts: int) -> tuple[list[list[int]], int | None]:
    """Held-out arithmetic prompts in the zoo's format and its EOS id, or random ids (no EOS)."""
    if tokenizer_path is not None:
        from respec_async.engine.tokenizer import Tokenizer
        from respec_async.tasks import arithmetic
        from respec_async.zoo import encode_prompt
        tokenizer = Tokenizer.from_file(tokenizer_path)
        problems = arithmetic.problems(num_prompts, seed=123, split="heldout")
        return [encode_prompt(tokenizer, problem.prompt) for problem in problems], tokenizer.eos_token_id
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab_size, (8 + i % 8,), generator=generator).tolist() for i in range(num_prompts)], None


def best_of(repeats: int, run) -> tuple[dict[str, float], object]:
    """Best wall-clock and best CPU seconds of `repeats` runs, and the last run's result."""
    best = {"wall": float("inf"), "cpu": float("inf")}
    result = None
    for _ in range(repeats):
        start_wall_s, start_cpu_s = time.perf_counter(), time.process_time()
        result = run()
        best["wall"] = min(best["wall"], time.perf_counter() - start_wall_s)
        best["cpu"] = min(best["cpu"], time.process_time() - start_cpu_s)
    return best, result


def rates(num_tokens: int, seconds: dict[str, float]) -> dict[str, float]:
    return {clock: num_tokens / elapsed_s for clock, elapsed_s in seconds.items()}


def bench_hf(model, prompts, batch_size: int, new_tokens: int, temperature: float, stop_id: int | None,
             repeats: int, device: str = "cpu") -> dict[str, float]:
    """transformers generate over `prompts` in static batches of batch_size (left-padded)."""
    pad = 0
    sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else \
        dict(do_sample=False)
    length_args = dict(eos_token_id=stop_id) if stop_id is not None else dict(eos_token_id=None,
                                                                             min_new_tokens=new_tokens)
    model.generation_config.eos_token_id = stop_id

    def run():
        num_tokens = 0
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            width = max(len(p) for p in chunk)
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
            with torch.inference_mode():
                output = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, pad_token_id=pad,
                                        **length_args, **sampling)[:, width:]
            for row in output.tolist():
                num_tokens += row.index(stop_id) + 1 if stop_id in row else len(row)
        return num_tokens

    seconds, num_tokens = best_of(repeats, run)
    return rates(num_tokens, seconds)


def bench_engine(target, drafter, prompts, batch_size: int, new_tokens: int, temperature: float,
                 stop_id: int | None, sd: SDConfig | None, repeats: int) -> tuple[dict[str, float], float]:
    params = SamplingParams(temperature=temperature, max_new_tokens=new_tokens,
                            stop_token_ids=() if stop_id is None else (stop_id,))
    max_seq_len = max(len(p) for p in prompts) + new_tokens + 1
    engine = Engine(target, drafter if sd is not None else None, max_batch_size=batch_size, max_seq_len=max_seq_len)

    def run():
        return engine.generate([Request(i, p, params) for i, p in enumerate(prompts)], sd)

    seconds, completions = best_of(repeats, run)
    num_tokens = sum(len(c.output_ids) for c in completions)
    num_verify = sum(c.num_verify_steps for c in completions)
    acceptance_length = (sum(c.num_accepted for c in completions) + num_verify) / num_verify if num_verify else 0.0
    return rates(num_tokens, seconds), acceptance_length


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    clock = args.clock or ("wall" if device.type == "cuda" else "cpu")
    if device.type == "cuda":
        if device.index is not None:  # torch >= 2.11 refuses a bare "cuda" here
            torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
    target_dir, drafter_dir, tokenizer_path = resolve_paths(args)
    target = load_pretrained(target_dir, device=device).eval()
    # The drafter follows the target's device and dtype (it shares the target's embedding).
    drafter = Eagle3Drafter.load_pretrained(drafter_dir, target.embed_tokens).eval() if drafter_dir else None
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    grid = [SDConfig(*(int(x) for x in item.split(","))) for item in args.grid.split()] if drafter else []
    all_prompts, eos_id = make_prompts(tokenizer_path, target.config.vocab_size, max(2 * max(batch_sizes), 8))
    workload = args.workload or ("stream" if eos_id is not None else "fixed")
    stop_id = eos_id if workload == "stream" else None
    hf_model = None
    if not args.skip_hf:
        from transformers import AutoModelForCausalLM
        hf_model = AutoModelForCausalLM.from_pretrained(str(target_dir), dtype=torch.float32).to(device).eval()

    # Warm up every path once (allocator, lazy imports) before anything is timed.
    bench_engine(target, drafter, all_prompts[:2], 2, 4, args.temperature, stop_id, grid[0] if grid else None, 1)
    bench_engine(target, drafter, all_prompts[:2], 2, 4, args.temperature, stop_id, None, 1)

    rows = []
    for batch_size in batch_sizes:
        prompts = all_prompts[:max(2 * batch_size, 8)] if workload == "stream" else all_prompts[:batch_size]
        row = {"batch_size": batch_size, "num_requests": len(prompts)}
        if hf_model is not None:
            row["hf_tokens_per_s"] = bench_hf(hf_model, prompts, batch_size, args.new_tokens, args.temperature,
                                              stop_id, args.repeats, device)
        row["plain_tokens_per_s"], _ = bench_engine(target, None, prompts, batch_size, args.new_tokens,
                                                    args.temperature, stop_id, None, args.repeats)
        row["sd"] = {}
        for sd in grid:
            tokens_per_s, acceptance_length = bench_engine(target, drafter, prompts, batch_size, args.new_tokens,
                                                           args.temperature, stop_id, sd, args.repeats)
            row["sd"][f"{sd.num_steps},{sd.top_k},{sd.num_draft_tokens}"] = {
                "tokens_per_s": tokens_per_s, "acceptance_length": acceptance_length}
        rows.append(row)
        print_row(row, grid, header=len(rows) == 1, with_hf=not args.skip_hf, clock=clock)

    checks = target_checks(rows, clock)
    for name, passed in checks.items():
        print(f"{'PASS' if passed else 'MISS'}  {name}")

    result = {"target": str(target_dir), "checks": checks, "workload": workload, "drafter": str(drafter_dir) if drafter_dir else None,
              "new_tokens": args.new_tokens, "temperature": args.temperature, "threads": args.threads,
              "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
              "clock": clock,
              "repeats": args.repeats, "machine": platform.platform(), "torch": torch.__version__,
              "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {out}")


def target_checks(rows: list[dict], clock: str) -> dict[str, bool]:
    """The engine's performance targets, on the table's clock."""
    checks = {}
    if all("hf_tokens_per_s" in row for row in rows):
        checks["plain >= 1.5x transformers generate at every batch size"] = all(
            row["plain_tokens_per_s"][clock] >= 1.5 * row["hf_tokens_per_s"][clock] for row in rows)
    batch_one = [row for row in rows if row["batch_size"] == 1 and row["sd"]]
    if batch_one:
        best = max(sd["tokens_per_s"][clock] for sd in batch_one[0]["sd"].values())
        checks["best SD config at batch 1 >= 2x plain"] = best >= 2 * batch_one[0]["plain_tokens_per_s"][clock]
    lengths = [sd["acceptance_length"] for row in rows for sd in row["sd"].values()]
    if lengths:
        checks["best mean acceptance length >= 3"] = max(lengths) >= 3
    return checks


def print_row(row: dict, grid, header: bool, with_hf: bool, clock: str) -> None:
    names = [f"{sd.num_steps},{sd.top_k},{sd.num_draft_tokens}" for sd in grid]
    if header:
        print(f"tokens/s by {clock} clock; sd cells: tokens/s, speedup over plain, [acceptance length]")
        columns = ["batch"] + (["hf tok/s"] if with_hf else []) + ["plain tok/s"] + \
            (["plain/hf"] if with_hf else []) + [f"sd({name}) tok/s x plain [acc]" for name in names]
        print(" | ".join(columns))
    plain = row["plain_tokens_per_s"][clock]
    cells = [f"{row['batch_size']:5d}"]
    if with_hf:
        cells.append(f"{row['hf_tokens_per_s'][clock]:8.0f}")
    cells.append(f"{plain:11.0f}")
    if with_hf:
        cells.append(f"{plain / row['hf_tokens_per_s'][clock]:8.2f}")
    for name in names:
        sd = row["sd"][name]
        cells.append(f"{sd['tokens_per_s'][clock]:8.0f} x{sd['tokens_per_s'][clock] / plain:.2f} "
                     f"[{sd['acceptance_length']:.2f}]")
    print(" | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
