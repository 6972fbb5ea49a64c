"""What determines a zoo: the task's problem shape, the target's and the drafter's sizes and
training hyperparameters (ZooSpec, whose hash names the cache directory), and the prompt format
the target was trained on."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

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



def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids of a prompt in the format the zoo target was trained on: <bos> then the text."""
    return [tokenizer.bos_token_id] + tokenizer.encode(prompt)


