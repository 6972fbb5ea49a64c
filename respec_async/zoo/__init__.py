"""The tiny model zoo: a character-level target model for the arithmetic task and its EAGLE-3
drafter, trained here on CPU in a few minutes and cached, so every demo, test and benchmark runs
without a model hub.

    python -m respec_async.zoo [--force] [--out DIR] [--quick] [--task longtail]

- `spec`: what determines a zoo (ZooSpec; its hash names the cache directory) and the prompt
  format its target was trained on.
- `cache`: `ensure_zoo()` returns the cached directories when their stamp matches this code's
  format version and hyperparameters, copies a trained stage shipped with the package
  (`shipped/`) when its key matches, and trains otherwise. Training writes into a temporary
  directory renamed into place at the end, under a file lock, so a crash or a concurrent caller
  never sees a half-written zoo. Cache: --out, else $RESPEC_ZOO_DIR, else ~/.cache/respec_async/zoo.
- `training` (imported only to build a zoo): the target, a small Llama-family model trained
  with next-token loss on gold worked solutions and stopped EARLY, when its held-out accuracy at
  temperature 1 enters a band (RL needs a policy that is partly right); the drafter, distilled
  from the finished target with the unrolled loss of `respec_async.algorithms.distill`; then
  both through the engine on held-out prompts. The stamp (zoo.json) keeps every number; the
  measured ones are in docs/BENCHMARKS.md ("The model zoo").
- `command`: the command line above.

A run asks the cache for its models (`respec_async.models.resolve_models`) and imports nothing
of the training code unless a stage has to be trained.
"""

from respec_async.zoo.cache import (SHIPPED_DIR, ZooPaths, default_cache_dir, ensure_zoo, is_complete,
                                    read_stamp, ship)
from respec_async.zoo.spec import (LONGTAIL_SPEC, QUICK_SPEC, SPECS, STAMP_NAME, ZooSpec, encode_prompt,
                                   spec_for_task)

__all__ = ["LONGTAIL_SPEC", "QUICK_SPEC", "SHIPPED_DIR", "SPECS", "STAMP_NAME", "ZooPaths", "ZooSpec",
           "default_cache_dir", "encode_prompt", "ensure_zoo", "is_complete", "read_stamp", "ship", "spec_for_task"]
