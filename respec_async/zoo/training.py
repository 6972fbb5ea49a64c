"""Training and evaluating the zoo's two stages: the target (next-token loss on gold worked
solutions, stopped when held-out temperature-1 accuracy enters a band) and its EAGLE-3 drafter
(the unrolled distillation loss on the target's distributions), then both through the engine."""

from __future__ import annotations

import dataclasses
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from respec_async.algorithms.distill import DistillStats, unrolled_distill_loss
from respec_async.tasks import arithmetic
from respec_async.zoo.spec import ZooSpec, encode_prompt

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


def evaluate_generation(target, tokenizer, spec: ZooSpec, drafter=None, num_problems: int = 128,
                        sd_num_steps: int = 4) -> dict:
    """Held-out accuracy of real generations (temperature 1 and greedy) through the engine, and,
    with a drafter, the mean acceptance length of chain drafts of sd_num_steps at temperature 1."""
    from respec_async.engine.engine import Engine
    from respec_async.engine.requests import Request, SDConfig
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


