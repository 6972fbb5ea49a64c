"""The tiny model zoo: a character-level target model for the arithmetic task and its EAGLE-3
drafter, trained here on CPU in a few minutes and cached, so every demo, test and benchmark runs
without a model hub.

    python -m respec_async.zoo [--force] [--out DIR] [--quick]

`ensure_zoo()` returns the cached directories when their stamp matches this code's format
version and hyperparameters, and trains them otherwise. Training writes into a temporary
directory that is renamed into place at the end, under a file lock, so a crash or a concurrent
caller never sees a half-written zoo. Cache: --out, else $RESPEC_ZOO_DIR, else
~/.cache/respec_async/zoo.

The target is a small Llama-family model trained with next-token loss on gold worked solutions
and stopped EARLY, when its held-out accuracy at temperature 1 enters a band (by default about
45%): RL needs a policy that is partly right. The stopping rule reads the probability the
model gives to the whole gold completion, measured teacher-forced in one forward pass: it is
the chance that sampling at temperature 1 reproduces the gold solution exactly (a lower bound
on sampled accuracy), and greedy decoding is right exactly when every gold token is the argmax.

The drafter is distilled from the finished target with the unrolled loss of
`respec_async.algorithms.distill` on the target's own distributions over held-in problems,
and reports its per-step top-1 agreement and acceptance rate on held-out ones. Finally both
run through the engine on held-out prompts; the stamp (zoo.json) keeps every number.

Measured with the default spec on the 2-core machine (one torch thread, other jobs running):
target 741k parameters, stopped at step 1275 after 410 s with held-out p(gold)@T1 0.25 (the
whole solution, answer line included); engine generations on 128 held-out prompts: accuracy
0.23 at temperature 1, 0.36 greedy. Drafter 269k parameters, 300 steps in 245 s; chain drafts
of 4 at temperature 1 accept 3.13 tokens per verify step. These two stages ship with the
package (zoo_shipped/, 4 MB), so a fresh clone does not wait for them.

The long-tail zoo (`--task longtail`, LONGTAIL_SPEC): target 1.11M parameters, 1400 steps
with the curriculum in 1423 s on one core (another job on the second), held-out accuracy at
temperature 1 0.125-0.15 (0.33 for <= 4 digits, 0 beyond 10); drafter chains of 4 accept
3.15 tokens per verify step. It ships too (5.4 MB).
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import hashlib
import json
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from respec_async.algorithms.distill import DistillStats, unrolled_distill_loss
from respec_async.checkpoints import replace_dir
from respec_async.tasks import arithmetic

# Bump when the training recipe changes in a way the hyperparameters below do not capture.
ZOO_FORMAT_VERSION = 1
STAMP_NAME = "zoo.json"


@dataclass(frozen=True)
class ZooSpec:
    """Everything that determines the trained zoo; its hash names the cache directory."""

    seed: int = 0
    max_digits: int = arithmetic.MAX_DIGITS
    digits_decay: float = arithmetic.DIGITS_DECAY
    little_endian: bool = False
    # Target: a Llama-style decoder, ~0.74M parameters with these sizes.
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 352
    max_position_embeddings: int = 256
    target_lr: float = 3e-3
    target_batch_size: int = 32
    target_max_steps: int = 3000
    # Stop once the held-out probability of sampling the whole gold solution (answer line
    # included) at temperature 1 reaches this: about 0.6 of the columns-right probability times
    # the 0.4 chance of stating the answer. RL then has room on both.
    target_stop_accuracy: float = 0.24
    # Share of the supervised solutions that stop after the columns without the " ans N" line
    # (a corpus that mixes two styles). Only a stated answer earns reward, so the trained target
    # states it less than half the time (greedy decoding mostly omits it) and RL has a
    # consistent signal at every problem length, on top of the arithmetic it gets right only
    # part of the time.
    unanswered_fraction: float = 0.6
    eval_every: int = 25
    num_eval_problems: int = 256
    # Drafter: EAGLE-3 shaped for the target, distilled with the unrolled loss.
    drafter_lr: float = 3e-3
    drafter_batch_size: int = 32
    drafter_steps: int = 300
    drafter_unroll_steps: int = 6
    # Each batch runs as this many length-sorted parts (same gradient, far less padding).
    num_length_groups: int = 4
    # Curriculum (0: none): the target's training problems have at most curriculum_start_digits
    # digits at first, growing linearly to max_digits by step target_curriculum_steps. A batch
    # of long problems is mostly tokens of columns far from their operands' digits; without
    # easy problems first the long-tail target learnt none of them (issue 13's notes).
    target_curriculum_steps: int = 0
    curriculum_start_digits: int = 4

    def problem_shape(self) -> dict:
        """arithmetic.problem()'s keyword arguments for this zoo's task."""
        return {"max_digits": self.max_digits, "digits_decay": self.digits_decay, "little_endian": self.little_endian}

    def curriculum_digits(self, step: int) -> int:
        """The most digits a training problem has at target step `step` (1-based)."""
        if self.target_curriculum_steps <= 0 or step >= self.target_curriculum_steps:
            return self.max_digits
        start = min(self.curriculum_start_digits, self.max_digits)
        return start + (self.max_digits - start) * step // self.target_curriculum_steps

    def _fields(self) -> dict:
        fields = dataclasses.asdict(self)
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name in _LATER_FIELDS:
            if fields[name] == defaults[name]:
                del fields[name]  # fields added later: their defaults keep the older keys
        return fields

    def key(self) -> str:
        """Names the whole zoo (target and drafter)."""
        return _hash({"format_version": ZOO_FORMAT_VERSION, **self._fields()})

    def target_key(self) -> str:
        """Names the target stage: only the fields the target depends on, so changing a drafter
        hyperparameter reuses the cached target."""
        fields = {k: v for k, v in self._fields().items() if not k.startswith("drafter_")}
        return _hash({"format_version": ZOO_FORMAT_VERSION, **fields})


# ZooSpec fields added after zoos were shipped: left out of the key at their defaults.
_LATER_FIELDS = ("digits_decay", "little_endian", "target_curriculum_steps", "curriculum_start_digits")


def _hash(blob: dict) -> str:
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:12]


# A micro zoo for tests: trains in seconds, same code path, not a useful model.
QUICK_SPEC = ZooSpec(max_digits=3, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                     num_key_value_heads=1, intermediate_size=64, max_position_embeddings=64,
                     target_batch_size=16, target_max_steps=12, target_stop_accuracy=1.01, eval_every=6,
                     num_eval_problems=16, drafter_batch_size=8, drafter_steps=6, drafter_unroll_steps=3, num_length_groups=2)


# The long-tail task's zoo (data.task = "longtail"): solutions up to ~450 tokens, so longer
# positions and two more layers, and a curriculum (problems of <= 4 digits first, all 44 by
# step 900). Without the curriculum the target learnt none of its problems (issue 13's notes).
LONGTAIL_SPEC = ZooSpec(**arithmetic.TASKS["longtail"], num_hidden_layers=6, max_position_embeddings=640,
                        target_lr=2e-3, target_batch_size=32, target_max_steps=1400, target_curriculum_steps=900,
                        curriculum_start_digits=4, target_stop_accuracy=1.01, eval_every=50,
                        drafter_batch_size=16, num_eval_problems=128)
SPECS = {"arithmetic": ZooSpec(), "longtail": LONGTAIL_SPEC}


def spec_for_task(task: str) -> ZooSpec:
    """The zoo a data.task trains on (the arithmetic one for a JSONL task: its models are
    given by model.path)."""
    return SPECS.get(task, SPECS["arithmetic"])


@dataclass(frozen=True)
class ZooPaths:
    target_dir: Path  # Hugging Face layout: config.json, model.safetensors, tokenizer.json
    drafter_dir: Path  # Eagle3Drafter.save_pretrained layout
    tokenizer_path: Path


def default_cache_dir() -> Path:
    return Path(os.environ.get("RESPEC_ZOO_DIR") or Path.home() / ".cache" / "respec_async" / "zoo")


# Trained copies of the default zoo's two stages, shipped with the package (about 4 MB) so a
# fresh clone's demo does not spend six minutes training the target first. They are what this
# module's training writes, stamp included; ensure_zoo copies a stage from here into the cache
# only when its stamp's key matches the spec (any recipe change retrains), and --force always
# retrains. Refresh them with `python -m respec_async.zoo --force --ship`.
SHIPPED_DIR = Path(__file__).resolve().parent / "zoo_shipped"


def _stage_dirs(cache_dir: Path, spec: ZooSpec) -> tuple[Path, Path]:
    return cache_dir / f"target-{spec.target_key()}", cache_dir / f"zoo-{spec.key()}"


def _paths(cache_dir: Path, spec: ZooSpec) -> ZooPaths:
    target_root, zoo_root = _stage_dirs(cache_dir, spec)
    return ZooPaths(target_dir=target_root, drafter_dir=zoo_root / "drafter",
                    tokenizer_path=target_root / "tokenizer.json")


TARGET_FILES = ("config.json", "model.safetensors", "tokenizer.json")
DRAFTER_FILES = ("drafter/config.json", "drafter/model.safetensors")


def _stamp_matches(root: Path, key: str, required: tuple[str, ...]) -> bool:
    try:
        stamp = json.loads((root / STAMP_NAME).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return stamp.get("key") == key and all((root / name).is_file() for name in required)


def _is_complete(cache_dir: Path, spec: ZooSpec) -> bool:
    target_root, zoo_root = _stage_dirs(cache_dir, spec)
    return (_stamp_matches(target_root, spec.target_key(), TARGET_FILES)
            and _stamp_matches(zoo_root, spec.key(), DRAFTER_FILES))


def _copy_shipped(root: Path, key: str, required: tuple[str, ...], log: Callable[[str], None]) -> bool:
    """Copy the shipped stage named like root into root if its stamp matches key."""
    shipped = SHIPPED_DIR / root.name
    if not _stamp_matches(shipped, key, required):
        return False
    replace_dir(root, lambda staging: shutil.copytree(shipped, staging, dirs_exist_ok=True))
    log(f"zoo: {root.name} copied from the trained copy shipped with the package "
        f"(python -m respec_async.zoo --force retrains it)")
    return True


def _build_stage(root: Path, key: str, build: Callable[[Path], dict]) -> None:
    """Run build(staging_dir) -> metrics and stamp the result, into root (see checkpoints.replace_dir)."""

    def fill(staging: Path) -> None:
        metrics = build(staging)
        (staging / STAMP_NAME).write_text(json.dumps({"key": key, "format_version": ZOO_FORMAT_VERSION,
                                                      "metrics": metrics}, indent=2))

    replace_dir(root, fill)


def ensure_zoo(cache_dir: str | Path | None = None, spec: ZooSpec | None = None, force: bool = False,
               log: Callable[[str], None] | None = None, num_threads: int = 1,
               with_drafter: bool = True) -> ZooPaths:
    """The zoo's directories, trained first unless a matching one is cached (see module docstring).

    Two stages, each cached under its own key: target-<key> (model + tokenizer) and zoo-<key>
    (the drafter, the evaluation, the full spec). --force retrains both. with_drafter=False
    makes sure of the target stage only (a run without speculative decoding needs no drafter);
    the returned drafter_dir then exists only if an earlier call trained it.

    Training runs on num_threads torch threads (restored afterwards). One is the default: these
    matrices are too small to gain much from a second thread, and on a shared 2-core machine
    under load a second OpenMP thread made a training step 8x slower (13.9 s vs 1.7 s)."""
    spec = spec or ZooSpec()
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)
    previous_num_threads = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        return _ensure_zoo_locked(cache_dir, spec, force, log, with_drafter)
    finally:
        torch.set_num_threads(previous_num_threads)


def _ensure_zoo_locked(cache_dir: Path, spec: ZooSpec, force: bool, log: Callable[[str], None],
                       with_drafter: bool) -> ZooPaths:
    paths = _paths(cache_dir, spec)
    target_root, zoo_root = _stage_dirs(cache_dir, spec)
    with open(cache_dir / ".lock", "w") as lock:
        # Serialises concurrent callers: the second waits, then finds the first one's zoo.
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _is_complete(cache_dir, spec) and not force:
            log(f"zoo: using cached {zoo_root}")
            return paths
        target_ready = _stamp_matches(target_root, spec.target_key(), TARGET_FILES)
        if not with_drafter and target_ready and not force:
            log(f"zoo: using cached target {target_root}")
            return paths
        # Holding the lock, any staging directory is a killed builder's leftover.
        for leftover in cache_dir.glob(".staging-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        if force or not target_ready:
            if force or not _copy_shipped(target_root, spec.target_key(), TARGET_FILES, log):
                _build_stage(target_root, spec.target_key(), lambda out: train_target_stage(out, spec, log))
        else:
            log(f"zoo: using cached target {target_root}")
        if not with_drafter:
            log(f"zoo: target ready in {target_root}")
            return paths
        if not force and _copy_shipped(zoo_root, spec.key(), DRAFTER_FILES, log):
            return paths

        def build_drafter_stage(out: Path) -> dict:
            metrics = train_drafter_stage(target_root, out / "drafter", spec, log)
            metrics["spec"] = dataclasses.asdict(spec)
            return metrics

        _build_stage(zoo_root, spec.key(), build_drafter_stage)
    log(f"zoo: saved to {zoo_root}")
    return paths


def read_stamp(paths: ZooPaths) -> dict:
    """The zoo's record: key, spec and every measured number (target, drafter, generation)."""
    stamp = json.loads((paths.drafter_dir.parent / STAMP_NAME).read_text())
    target_stamp = json.loads((paths.target_dir / STAMP_NAME).read_text())
    stamp["metrics"]["target"] = target_stamp["metrics"]
    return stamp


# ---- data --------------------------------------------------------------------------------


@dataclass
class TokenBatch:
    input_ids: torch.Tensor  # [B, T], right-padded: <bos> prompt completion <eos> <pad>...
    loss_mask: torch.Tensor  # [B, T], 1 at the positions that predict a completion token or <eos>
    lengths: torch.Tensor  # [B], tokens before the padding

    def split_by_length(self, num_parts: int) -> list["TokenBatch"]:
        """The rows sorted by length into num_parts batches, each padded only to its own
        longest row. A mixed batch of the task's long-tailed lengths is mostly padding; summing
        per-token losses over the parts (over the whole batch's token count) gives the same
        gradient at a fraction of the compute."""
        parts = []
        for rows in self.lengths.argsort().chunk(num_parts):
            width = int(self.lengths[rows].max())
            parts.append(TokenBatch(self.input_ids[rows, :width], self.loss_mask[rows, :width], self.lengths[rows]))
        return parts


def encode_problems(tokenizer, problems: list[arithmetic.Problem]) -> TokenBatch:
    rows, prompt_lengths = [], []
    for problem in problems:
        prompt_ids = [tokenizer.bos_token_id] + tokenizer.encode(problem.prompt)
        rows.append(prompt_ids + tokenizer.encode(problem.completion) + [tokenizer.eos_token_id])
        prompt_lengths.append(len(prompt_ids))
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    loss_mask = torch.zeros(len(rows), width)
    for i, (row, prompt_length) in enumerate(zip(rows, prompt_lengths)):
        input_ids[i, : len(row)] = torch.tensor(row)
        # Position s predicts token s+1: from the prompt's last token to the one before <eos>.
        loss_mask[i, prompt_length - 1: len(row) - 1] = 1.0
    return TokenBatch(input_ids, loss_mask, torch.tensor([len(row) for row in rows]))


class TrainBatches:
    """Batches of train-split problems in order of problem index, so a batch mixes short and long
    problems as the task's distribution does. (Batches drawn from length buckets pad less, but
    in one comparison trained several times slower per step; `split_by_length` saves the
    padding without changing the gradient.)"""

    def __init__(self, tokenizer, spec: ZooSpec, batch_size: int, seed: int):
        self.tokenizer, self.spec, self.batch_size, self.seed = tokenizer, spec, batch_size, seed
        self.next_index = 0

    def next(self, max_digits: int | None = None) -> TokenBatch:
        shape = self.spec.problem_shape()
        if max_digits is not None:
            shape["max_digits"] = max_digits
        problems = arithmetic.problems(self.batch_size, seed=self.seed, split="train", start=self.next_index, **shape)
        problems = [unanswered(p) if _is_unanswered(self.seed, self.next_index + i, self.spec.unanswered_fraction)
                    else p for i, p in enumerate(problems)]
        self.next_index += self.batch_size
        return encode_problems(self.tokenizer, problems)


def _is_unanswered(seed: int, index: int, fraction: float) -> bool:
    return fraction > 0 and random.Random(f"unanswered:{seed}:{index}").random() < fraction


def unanswered(problem: arithmetic.Problem) -> arithmetic.Problem:
    """The problem with its worked solution cut before the answer line (it earns no reward)."""
    return dataclasses.replace(problem, completion=problem.completion.split(arithmetic.ANSWER_PREFIX)[0])


def heldout_batches(tokenizer, spec: ZooSpec, batch_size: int = 64) -> list[TokenBatch]:
    problems = arithmetic.problems(spec.num_eval_problems, seed=spec.seed, split="heldout",
                                   **spec.problem_shape())
    problems.sort(key=lambda p: len(p.prompt) + len(p.completion))
    return [encode_problems(tokenizer, problems[i: i + batch_size]) for i in range(0, len(problems), batch_size)]


# ---- target --------------------------------------------------------------------------------


def completion_loss(logits: torch.Tensor, batch: TokenBatch, num_tokens: float | None = None) -> torch.Tensor:
    """Next-token cross-entropy summed over the completion tokens, divided by num_tokens (by
    default this batch's count: the mean)."""
    logprobs = F.log_softmax(logits[:, :-1].float(), dim=-1)
    token_logprobs = logprobs.gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
    mask = batch.loss_mask[:, :-1]
    return -(token_logprobs * mask).sum() / (num_tokens if num_tokens is not None else mask.sum())


@torch.no_grad()
def teacher_forced_accuracy(model, batches: list[TokenBatch]) -> dict[str, float]:
    """Held-out accuracy read off one teacher-forced forward per batch: `greedy` is the fraction
    of problems whose every gold token is the argmax (greedy decoding reproduces the gold
    solution exactly then), `sampled_t1` the mean probability of the whole gold completion
    (the chance that temperature-1 sampling reproduces it; a lower bound on sampled accuracy)."""
    num_greedy, total_probability, num_problems = 0.0, 0.0, 0
    for batch in batches:
        logits = model(batch.input_ids).logits
        logprobs = F.log_softmax(logits[:, :-1].float(), dim=-1)
        gold = batch.input_ids[:, 1:]
        mask = batch.loss_mask[:, :-1].bool()
        token_logprobs = logprobs.gather(-1, gold[..., None]).squeeze(-1)
        num_greedy += ((logprobs.argmax(-1) == gold) | ~mask).all(dim=1).sum().item()
        total_probability += (token_logprobs * mask).sum(dim=1).exp().sum().item()
        num_problems += gold.shape[0]
    return {"greedy": num_greedy / num_problems, "sampled_t1": total_probability / num_problems}


def train_target(model, tokenizer, spec: ZooSpec, log: Callable[[str], None]) -> dict:
    """Supervised next-token training, stopped when held-out temperature-1 accuracy reaches
    spec.target_stop_accuracy (or at target_max_steps)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.target_lr, betas=(0.9, 0.98), weight_decay=0.0)
    batches = TrainBatches(tokenizer, spec, spec.target_batch_size, seed=spec.seed)
    heldout = heldout_batches(tokenizer, spec)
    warmup_steps = max(1, min(50, spec.target_max_steps // 10))
    start_s = time.perf_counter()
    accuracy = {"greedy": 0.0, "sampled_t1": 0.0}
    step = 0
    model.train()
    for step in range(1, spec.target_max_steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = spec.target_lr * min(1.0, step / warmup_steps)
        batch = batches.next(spec.curriculum_digits(step))
        num_tokens = batch.loss_mask.sum().item()
        optimizer.zero_grad(set_to_none=True)
        loss = 0.0
        for part in batch.split_by_length(spec.num_length_groups):
            part_loss = completion_loss(model(part.input_ids).logits, part, num_tokens)
            part_loss.backward()
            loss += part_loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % spec.eval_every == 0 or step == spec.target_max_steps:
            model.eval()
            accuracy = teacher_forced_accuracy(model, heldout)
            model.train()
            log(f"target step {step:5d}  digits <= {spec.curriculum_digits(step):2d}  loss {loss:.3f}  "
                f"held-out greedy {accuracy['greedy']:.3f}  p(gold)@T1 {accuracy['sampled_t1']:.3f}  "
                f"{time.perf_counter() - start_s:.0f}s")
            if accuracy["sampled_t1"] >= spec.target_stop_accuracy:
                break
    model.eval()
    return {"num_steps": step, "train_time_s": round(time.perf_counter() - start_s, 1),
            "heldout_greedy_teacher_forced": accuracy["greedy"],
            "heldout_p_gold_t1": accuracy["sampled_t1"]}


# ---- drafter -------------------------------------------------------------------------------


def target_features_and_logits(target, input_ids: torch.Tensor, feature_layers) -> tuple[list[torch.Tensor], torch.Tensor]:
    with torch.no_grad():
        output = target(input_ids, hidden_layers=tuple(feature_layers))
    return list(output.hidden), output.logits


def _mean_stats(all_stats: list[DistillStats]) -> dict:
    num_steps = len(all_stats[0].top1_agreement_per_step)
    weights = [s.num_tokens for s in all_stats]
    total = max(sum(weights), 1)

    def mean(values):
        return sum(v * w for v, w in zip(values, weights)) / total

    return {
        "top1_agreement_per_step": [round(mean([s.top1_agreement_per_step[j] for s in all_stats]), 4)
                                    for j in range(num_steps)],
        "accept_prob_per_step": [round(mean([s.accept_prob_per_step[j] for s in all_stats]), 4)
                                 for j in range(num_steps)],
        "loss": round(mean([s.loss for s in all_stats]), 4),
    }


def evaluate_drafter(drafter, target, batches: list[TokenBatch], num_steps: int) -> dict:
    all_stats = []
    with torch.no_grad():
        for batch in batches:
            features, logits = target_features_and_logits(target, batch.input_ids, drafter.config.feature_layers)
            _, stats = unrolled_distill_loss(drafter, features, batch.input_ids, logits, batch.loss_mask,
                                             num_steps=num_steps)
            all_stats.append(stats)
    summary = _mean_stats(all_stats)
    length, survive = 1.0, 1.0
    for accept in summary["accept_prob_per_step"]:
        survive *= accept
        length += survive
    summary["estimated_acceptance_length"] = round(length, 3)
    return summary


def train_drafter(drafter, target, tokenizer, spec: ZooSpec, log: Callable[[str], None]) -> dict:
    """Plain KD (all sample weights 1: the gold solutions are all correct) of the drafter on the
    target's distributions, with the unrolled training-time-test loss."""
    optimizer = torch.optim.AdamW([p for p in drafter.parameters() if p.requires_grad], lr=spec.drafter_lr,
                                  betas=(0.9, 0.98), weight_decay=0.0)
    batches = TrainBatches(tokenizer, spec, spec.drafter_batch_size, seed=spec.seed + 1)
    heldout = heldout_batches(tokenizer, spec)
    warmup_steps = max(1, min(50, spec.drafter_steps // 10))
    start_s = time.perf_counter()
    log_every = max(1, spec.drafter_steps // 10)
    drafter.train()
    for step in range(1, spec.drafter_steps + 1):
        # Cosine decay to a tenth: the drafter is trained for a fixed budget, not to a band.
        progress = step / spec.drafter_steps
        scale = min(1.0, step / warmup_steps) * (0.1 + 0.45 * (1 + torch.cos(torch.tensor(progress * torch.pi)).item()))
        for group in optimizer.param_groups:
            group["lr"] = spec.drafter_lr * scale
        batch = batches.next()
        num_tokens = batch.loss_mask.sum().item()
        optimizer.zero_grad(set_to_none=True)
        loss = 0.0
        for part in batch.split_by_length(spec.num_length_groups):
            features, logits = target_features_and_logits(target, part.input_ids, drafter.config.feature_layers)
            part_loss, stats = unrolled_distill_loss(drafter, features, part.input_ids, logits, part.loss_mask,
                                                     num_steps=spec.drafter_unroll_steps)
            # Each part's loss is a per-token mean: weight it by its share of the batch's tokens.
            (part_loss * part.loss_mask.sum().item() / num_tokens).backward()
            loss += part_loss.item() * part.loss_mask.sum().item() / num_tokens
        torch.nn.utils.clip_grad_norm_(drafter.parameters(), 1.0)
        optimizer.step()
        if step % log_every == 0 or step == spec.drafter_steps:
            agreement = " ".join(f"{a:.2f}" for a in stats.top1_agreement_per_step)
            log(f"drafter step {step:5d}  loss {loss:.3f}  top-1 agreement per step [{agreement}]  "
                f"{time.perf_counter() - start_s:.0f}s")
    drafter.eval()
    summary = evaluate_drafter(drafter, target, heldout, spec.drafter_unroll_steps)
    summary["train_time_s"] = round(time.perf_counter() - start_s, 1)
    summary["num_steps"] = spec.drafter_steps
    return summary


# ---- sampled evaluation ----------------------------------------------------------------------


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids of a prompt in the format the zoo target was trained on: <bos> then the text."""
    return [tokenizer.bos_token_id] + tokenizer.encode(prompt)


def evaluate_generation(target, tokenizer, spec: ZooSpec, drafter=None, num_problems: int = 128,
                        sd_num_steps: int = 4) -> dict:
    """Held-out accuracy of real generations (temperature 1 and greedy) through the engine, and,
    with a drafter, the mean acceptance length of chain drafts of sd_num_steps at temperature 1."""
    from respec_async.engine.engine import Engine, Request, SDConfig
    from respec_async.engine.sampling import SamplingParams

    problems = arithmetic.problems(num_problems, seed=spec.seed + 7, split="heldout", **spec.problem_shape())
    max_new_tokens = max(len(p.completion) for p in problems) + 16
    max_seq_len = max(len(encode_prompt(tokenizer, p.prompt)) for p in problems) + max_new_tokens + 1
    results = {}
    runs = [("t1", 1.0, None), ("greedy", 0.0, None)]
    if drafter is not None:
        runs.append(("t1_sd", 1.0, SDConfig(num_steps=sd_num_steps, top_k=1, num_draft_tokens=sd_num_steps)))
    for name, temperature, sd in runs:
        engine = Engine(target, drafter if sd is not None else None, max_batch_size=min(64, num_problems),
                        max_seq_len=max_seq_len, seed=spec.seed)
        params = SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens,
                                stop_token_ids=(tokenizer.eos_token_id,))
        requests = [Request(i, encode_prompt(tokenizer, p.prompt), params) for i, p in enumerate(problems)]
        start_s = time.perf_counter()
        completions = engine.generate(requests, sd_policy=sd)
        texts = [tokenizer.decode([t for t in c.output_ids if t != tokenizer.eos_token_id]) for c in completions]
        results[f"accuracy_{name}"] = round(arithmetic.accuracy(texts, [p.answer for p in problems]), 4)
        results[f"generate_time_s_{name}"] = round(time.perf_counter() - start_s, 1)
        if sd is not None:
            num_verify = sum(c.num_verify_steps for c in completions)
            num_accepted = sum(c.num_accepted for c in completions)
            results["acceptance_length"] = round((num_accepted + num_verify) / max(num_verify, 1), 3)
            results["sd_num_steps"] = sd_num_steps
    lengths = [len(p.completion) + 1 for p in problems]
    results["num_problems"] = num_problems
    results["mean_completion_tokens"] = round(sum(lengths) / len(lengths), 1)
    return results


# ---- the whole zoo ---------------------------------------------------------------------------


def build_tokenizer():
    from respec_async.engine.tokenizer import build_char_tokenizer
    return build_char_tokenizer(arithmetic.ALPHABET)


def build_target(spec: ZooSpec, tokenizer):
    from respec_async.engine.model import ModelConfig, Transformer
    config = ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=spec.hidden_size,
                         intermediate_size=spec.intermediate_size, num_hidden_layers=spec.num_hidden_layers,
                         num_attention_heads=spec.num_attention_heads, num_key_value_heads=spec.num_key_value_heads,
                         max_position_embeddings=spec.max_position_embeddings, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    return Transformer(config)


def zoo_feature_layers(num_layers: int) -> tuple[int, int, int]:
    """Target layers the zoo drafter fuses: the outputs of layers 1, L//2 and L-1.

    EAGLE-3's rule (outputs of 1, L//2-1, L-4) is made for deep models; on a 4-layer target it
    clamps to (1, 1, 0) and leaves out the top layers, which carry the next-token prediction
    the drafter most needs. Low, middle and the last layer keep the spread the rule intends."""
    return (min(1, num_layers - 1), num_layers // 2, num_layers - 1)


def build_drafter(target):
    from respec_async.engine.drafter import Eagle3Drafter
    drafter = Eagle3Drafter.from_target(target)
    config = dataclasses.replace(drafter.config, feature_layers=zoo_feature_layers(target.config.num_hidden_layers))
    param = target.embed_tokens.weight
    return Eagle3Drafter(config, target.embed_tokens).to(device=param.device, dtype=param.dtype)


def num_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def train_target_stage(out_dir: Path, spec: ZooSpec, log: Callable[[str], None]) -> dict:
    """Train the target and save it with its tokenizer in Hugging Face layout into out_dir."""
    from respec_async.engine.checkpoint import save_pretrained

    tokenizer = build_tokenizer()
    # Forked so training the zoo leaves the caller's random state as it found it.
    with torch.random.fork_rng():
        torch.manual_seed(spec.seed)
        target = build_target(spec, tokenizer)
        log(f"zoo: target {num_parameters(target):,} parameters, training until held-out p(gold)@T1 >= "
            f"{spec.target_stop_accuracy}")
        metrics = train_target(target, tokenizer, spec, log)
    save_pretrained(target, out_dir)
    tokenizer.save(out_dir / "tokenizer.json")
    return {"num_parameters": num_parameters(target), **metrics}


def train_drafter_stage(target_dir: Path, drafter_dir: Path, spec: ZooSpec, log: Callable[[str], None],
                        evaluate: bool = True) -> dict:
    """Distill a drafter from the saved target into drafter_dir; measure generation with both."""
    from respec_async.engine.checkpoint import load_pretrained
    from respec_async.engine.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(target_dir)
    target = load_pretrained(target_dir).eval()
    target.requires_grad_(False)
    with torch.random.fork_rng():
        torch.manual_seed(spec.seed + 1)
        drafter = build_drafter(target)
        log(f"zoo: drafter {num_parameters(drafter):,} parameters (feature layers "
            f"{tuple(drafter.config.feature_layers)}), {spec.drafter_steps} distillation steps")
        metrics = {"drafter": {"num_parameters": num_parameters(drafter),
                               **train_drafter(drafter, target, tokenizer, spec, log)}}
    drafter.save_pretrained(drafter_dir)
    if evaluate:
        metrics["generation"] = evaluate_generation(target, tokenizer, spec, drafter,
                                                    num_problems=min(128, spec.num_eval_problems))
        log("zoo: generation " + json.dumps(metrics["generation"]))
    return metrics


def ship(paths: ZooPaths, shipped_dir: Path | None = None) -> None:
    """Replace the shipped copies of this zoo's two stages (target and drafter) and their stamps;
    other stages shipped (another task's zoo) stay."""
    shipped_dir = shipped_dir or SHIPPED_DIR
    shipped_dir.mkdir(parents=True, exist_ok=True)
    for stage in (paths.target_dir, paths.drafter_dir.parent):
        if (shipped_dir / stage.name).exists():
            shutil.rmtree(shipped_dir / stage.name)
        shutil.copytree(stage, shipped_dir / stage.name, ignore=shutil.ignore_patterns(".*"))
    print(f"shipped: {shipped_dir}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m respec_async.zoo", description=__doc__.split("\n\n")[0])
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


if __name__ == "__main__":
    sys.exit(main())
