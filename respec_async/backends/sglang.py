"""What the generator hands SGLang (0.5.23) and what it reads back, as pure functions.

SGLang does not run on this project's CPU machines (its kernels are CUDA builds), so every
translation the SGLang backend makes lives here, importable and tested without it: the engine's
launch arguments from our config (with the configs SGLang cannot serve exactly refused by key),
sampling parameters, a finished request's output as our `Completion`, a weights manifest as the
weight-update request, our EAGLE-3 drafter's tensors under the names SGLang's draft model loads,
and the adaptive server's plan as SGLang's adaptive speculative config. `SGLANG_SURFACE` lists
every SGLang name these functions rely on; tests/backends/test_sglang_api.py checks each against
the pinned release's source.

Facts of SGLang 0.5.23 behind the choices (read from its source):
- `return_logprob` gives log_softmax(logits / T) over the whole vocabulary: top-p / top-k are
  not applied (`layers/sampler.py`, and `compute_spec_logprobs` under speculation). Its
  truncated-distribution log-probs (`return_sampling_mask`) are refused with EAGLE-3 and NGRAM,
  so a config with top-p < 1 or top-k > 0 is refused here: the trainer would get the wrong
  behaviour log-probs.
- Weight updates run in a begin/end session, with `selector` "target" or "draft" (the Engine
  wrappers do not expose it, so the backend builds the request structs). Draft tensors sent with
  "all" also reach the target's loader; the draft's embedding is the target's own tensor; its
  `d2t` is read once at launch (a new one is ignored), so the draft vocabulary must not change.
- Only the target's runner joins the weight-update group: rank 0 is the sender and every tensor
  is its own `broadcast(src=0)`, in the request's order (ours: manifest order, one tensor per
  bucket; see `transport.weights.plan_buckets`).
- The cache flush after an update fails while requests run (and fails the update call), so
  updates pass flush_cache=False and the backend flushes when the engine is idle.
- Adaptive speculation (`speculative_adaptive`) is EAGLE / EAGLE-3 chains only (topk 1): a JSON
  file of batch-size buckets, each with its `candidate_steps` (0 = no drafting).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

from respec_async.config import Config, ConfigError
from respec_async.engine.requests import Completion, SDConfig
from respec_async.engine.sampling import SamplingParams
from respec_async.sd.grid import PLAIN, parse_config
from transport.schema import TensorSpec

SGLANG_VERSION = "0.5.23"

# Every SGLang name the adapter depends on, by the wheel file that defines it (test_sglang_api).
SGLANG_SURFACE: dict[str, dict[str, Any]] = {
    "sglang/srt/entrypoints/engine.py": {
        "class Engine": ["async_generate", "init_weights_update_group", "destroy_weights_update_group",
                         "begin_weight_update", "end_weight_update", "update_weights_from_distributed",
                         "get_weights_by_name", "flush_cache", "shutdown"],
        "def Engine.async_generate": ["input_ids", "sampling_params", "return_logprob", "rid"],
        "def Engine.init_weights_update_group": ["master_address", "master_port", "rank_offset", "world_size",
                                                 "group_name", "backend"],
        "def Engine.get_weights_by_name": ["name", "truncate_size"],
    },
    "sglang/srt/managers/io_struct.py": {
        "fields UpdateWeightsFromDistributedReqInput": ["names", "dtypes", "shapes", "group_name", "flush_cache",
                                                        "weight_version", "selector"],
        "fields BeginWeightUpdateReqInput": ["selector"],
        "fields InitWeightsUpdateGroupReqInput": ["master_address", "master_port", "rank_offset", "world_size",
                                                  "group_name", "backend"],
        "fields GenerateReqInput": ["input_ids", "sampling_params", "return_logprob", "rid"],
        "fields AddExternalCorpusReqInput": ["corpus_id", "documents"],
        "fields RemoveExternalCorpusReqInput": ["corpus_id"],
        "class EndWeightUpdateReqInput": [],
        "strings": ["target", "draft"],  # the selector's values
    },
    "sglang/srt/managers/tokenizer_control_mixin.py": {
        "def TokenizerControlMixin.begin_weight_update": ["obj"],
        "def TokenizerControlMixin.end_weight_update": ["obj"],
        "def TokenizerControlMixin.update_weights_from_distributed": ["obj"],
        "def TokenizerControlMixin.add_external_corpus": ["obj"],
        "def TokenizerControlMixin.remove_external_corpus": ["corpus_id"],
    },
    "sglang/srt/managers/tokenizer_manager.py": {
        "strings": ["finish_reason", "completion_tokens", "output_token_logprobs", "spec_verify_ct",
                    "spec_num_correct_drafts", "spec_num_proposed_drafts"],
    },
    "sglang/srt/managers/schedule_batch.py": {"strings": ["type", "stop", "length", "abort"]},
    "sglang/srt/sampling/sampling_params.py": {
        "fields SamplingParams": ["max_new_tokens", "temperature", "top_p", "top_k", "stop_token_ids",
                                  "sampling_seed"],
    },
    "sglang/srt/speculative/adaptive_spec_params.py": {"strings": ["candidate_steps"]},
    "sglang/srt/models/llama_eagle3.py": {
        "strings": ["midlayer", "layers.0", "d2t", "t2d", ".qkv_proj", ".q_proj", ".k_proj", ".v_proj",
                    ".gate_up_proj", ".gate_proj", ".up_proj"],
    },
    # Launch arguments: every key `engine_kwargs` can return is a ServerArgs field in one of these.
    "sglang/srt/arg_groups/fields/*.py": {"server_args": []},
}


def refuse_unsupported(config: Config, source: str = "<config>") -> None:
    """Raise ConfigError, naming the key, for what the SGLang backend cannot serve exactly."""
    s, g = config.sampling, config.generator
    if s.top_p < 1.0:
        raise ConfigError(f"{source}: sampling.top_p: SGLang {SGLANG_VERSION} returns log-probs of the untruncated "
                          f"distribution, not the top-p one it samples from; the trainer would get the wrong "
                          f"behaviour log-probs (use top_p = 1.0, or generator.backend = \"builtin\")")
    if s.top_k > 0:
        raise ConfigError(f"{source}: sampling.top_k: SGLang {SGLANG_VERSION} returns log-probs of the untruncated "
                          f"distribution, not the top-k one it samples from (use top_k = 0)")
    if not config.model.device.startswith("cuda"):
        raise ConfigError(f"{source}: model.device: SGLang runs on CUDA GPUs (got {config.model.device!r})")
    if g.sd == "static" and g.sd_source == "eagle" and g.sd_top_k > 1 and g.sd_relaxed_threshold_single < 1.0:
        raise ConfigError(f"{source}: generator.sd_relaxed_threshold_single: SGLang's relaxed acceptance is for "
                          f"chains; a tree (sd_top_k > 1) with it is not exact and not supported")
    if g.sd == "adaptive":
        for entry in g.sd_grid:
            sd = parse_config(entry)
            if sd.source == "history":
                raise ConfigError(f"{source}: generator.sd_grid: {entry!r}: SGLang runs one speculative algorithm "
                                  f"per engine; history drafts are its NGRAM algorithm, which its adaptive mode "
                                  f"(EAGLE / EAGLE-3 only) cannot switch to")
            if sd.top_k > 1:
                raise ConfigError(f"{source}: generator.sd_grid: {entry!r}: SGLang's adaptive mode chooses among "
                                  f"chains only (top_k 1)")


def engine_kwargs(config: Config, model_path: str, drafter_path: str = "",
                  adaptive_config_path: str = "") -> dict[str, Any]:
    """sglang.Engine(**kwargs) for this run's generator: token ids in and out (no tokenizer in
    the engine), one slot per generator.max_batch_size, the run's seed, and the SD mode."""
    refuse_unsupported(config)
    g = config.generator
    kwargs: dict[str, Any] = {
        "model_path": model_path,
        "dtype": config.model.dtype,
        "skip_tokenizer_init": True,
        "random_seed": config.run.seed,
        "max_running_requests": g.max_batch_size,
        "context_length": g.max_seq_len,
    }
    if g.sd == "off":
        return kwargs
    if g.sd_relaxed_threshold_single < 1.0 or g.sd_relaxed_threshold_acc < 1.0:
        kwargs["speculative_accept_threshold_single"] = g.sd_relaxed_threshold_single
        kwargs["speculative_accept_threshold_acc"] = g.sd_relaxed_threshold_acc
    if g.sd == "static" and g.sd_source == "history":
        # Rollout history as SGLang's n-gram trie over every request's tokens (siblings included).
        sd = SDConfig(g.sd_num_steps, g.sd_top_k, g.sd_num_draft_tokens, source="history")
        # Earlier epochs' rollouts go in as external corpora (external_corpus_request): SGLang
        # tokenizes a corpus itself, so the engine keeps its tokenizer here, and half the draft
        # nodes are the corpora's (its limit: at most its draft tokens - 1), half the live trie's.
        kwargs.update(speculative_algorithm="NGRAM", speculative_num_draft_tokens=sd.num_draft_tokens + 1,
                      speculative_ngram_max_bfs_breadth=sd.top_k,
                      speculative_ngram_max_trie_depth=g.history_match_depth + sd.num_steps,
                      speculative_ngram_external_sam_budget=max(1, sd.num_draft_tokens // 2),
                      skip_tokenizer_init=False)
        return kwargs
    if not drafter_path:
        raise ConfigError("model.drafter_path: SGLang's EAGLE-3 speculation loads the drafter from a directory")
    kwargs.update(speculative_algorithm="EAGLE3", speculative_draft_model_path=drafter_path)
    if g.sd == "static":
        sd = SDConfig(g.sd_num_steps, g.sd_top_k, g.sd_num_draft_tokens)
        # SGLang counts the root (the last verified token) among its draft tokens.
        kwargs.update(speculative_num_steps=sd.num_steps, speculative_eagle_topk=sd.top_k,
                      speculative_num_draft_tokens=sd.num_draft_tokens + 1)
        return kwargs
    if not adaptive_config_path:
        raise ValueError("adaptive SD on SGLang needs the path of the adaptive config file (adaptive_config)")
    steps = [parse_config(e).num_steps for e in g.sd_grid]
    kwargs.update(speculative_adaptive=True, speculative_adaptive_config=adaptive_config_path,
                  speculative_num_steps=max(steps), speculative_eagle_topk=1,
                  speculative_num_draft_tokens=max(steps) + 1)
    return kwargs


def adaptive_config(plan: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, list[int]]]:
    """The adaptive server's plan (runs of batch sizes: {"from", "to", "choice"}, choice "plain"
    or "s,1,n") as SGLang's adaptive config: a bucket per run, starting at its first batch
    size, whose candidates are the planned step count and 0 (no drafting), so SGLang can still
    turn SD off where live acceptance falls below the profile's. SGLang routes a batch to the
    largest bucket at or below it (after padding to a CUDA-graph size): the runs' starts."""
    buckets: dict[str, dict[str, list[int]]] = {}
    for run in plan:
        choice = str(run["choice"])
        if choice == PLAIN:
            steps = [0]
        else:
            sd = parse_config(choice)
            if sd.source != "eagle" or sd.top_k != 1:
                raise ValueError(f"SGLang's adaptive mode runs EAGLE chains only; the plan chose {choice!r} "
                                 f"at batch sizes {run['from']}-{run['to']}")
            steps = [0, sd.num_steps]
        buckets[str(int(run["from"]))] = {"candidate_steps": steps}
    if "1" not in buckets:
        raise ValueError("the plan must start at batch size 1 (SGLang clamps smaller batches to the first bucket)")
    return buckets


def sampling_params(params: SamplingParams, seed: int | None = None) -> dict[str, Any]:
    """Our SamplingParams as SGLang's sampling_params dict (temperature 0: greedy)."""
    out: dict[str, Any] = {"max_new_tokens": params.max_new_tokens, "temperature": params.temperature,
                           "stop_token_ids": list(params.stop_token_ids)}
    if params.top_p < 1.0 or params.top_k > 0:
        raise ValueError("top-p / top-k sampling: SGLang's log-probs would not be the sampled distribution's")
    if seed is not None:
        out["sampling_seed"] = seed
    return out


def completion_from_output(output: Mapping[str, Any], request_id: str, prompt_ids: list[int]) -> Completion:
    """A finished `async_generate(..., return_logprob=True)` result as our Completion. SD
    statistics come from the finished request's spec_* fields (absent without speculation)."""
    meta = output["meta_info"]
    reason = meta.get("finish_reason")
    if not isinstance(reason, Mapping) or reason.get("type") not in ("stop", "length"):
        raise RuntimeError(f"SGLang request {request_id} did not finish: finish_reason {reason!r}")
    output_ids = list(output["output_ids"])
    logprobs = [float(entry[0]) for entry in meta["output_token_logprobs"]]
    tokens = [int(entry[1]) for entry in meta["output_token_logprobs"]]
    if tokens != output_ids:
        raise RuntimeError(f"SGLang request {request_id}: log-probs are for {len(tokens)} tokens "
                           f"{tokens[:8]}..., the output has {len(output_ids)} {output_ids[:8]}...")
    verify = int(meta.get("spec_verify_ct", 0))
    accepted = int(meta.get("spec_num_correct_drafts", 0))
    return Completion(
        request_id=request_id, prompt_ids=list(prompt_ids), output_ids=output_ids, logprobs=logprobs,
        finish_reason=reason["type"], num_drafted=int(meta.get("spec_num_proposed_drafts", 0)),
        num_accepted=accepted, num_verify_steps=verify,
        num_decode_steps=verify if verify else max(len(output_ids) - 1, 0),
        acceptance_length=len(output_ids) / verify if verify else 0.0)


CORPUS_PREFIX = "respec-rollouts-epoch-"


def external_corpus_request(epoch: int, rollouts: Iterable[Sequence[int]],
                            decode: Callable[[list[int]], str]) -> dict[str, Any]:
    """AddExternalCorpusReqInput's fields for one epoch's finished rollouts: the earlier-epoch
    half of our history drafter on SGLang (its live n-gram trie already holds the running
    requests, siblings included). 0.5.23's tokenizer manager takes `documents` (text it
    tokenizes) or a file, and refuses bare token chunks, so the rollouts go as their text."""
    documents = [decode(list(ids)) for ids in rollouts if len(ids)]
    return {"corpus_id": f"{CORPUS_PREFIX}{epoch}", "documents": [d for d in documents if d]}


def stale_corpora(loaded: Iterable[str], epoch: int, keep_epochs: int) -> list[str]:
    """Our corpora to remove once `epoch`'s is loaded: all but the newest `keep_epochs` (a bound
    on SGLang's memory, as generator.history_max_bytes bounds our own index)."""
    ours = [c for c in loaded if c.startswith(CORPUS_PREFIX) and c[len(CORPUS_PREFIX):].isdigit()]
    return sorted((c for c in ours if int(c[len(CORPUS_PREFIX):]) <= epoch - keep_epochs),
                  key=lambda c: int(c[len(CORPUS_PREFIX):]))


def update_request(manifest: list[TensorSpec], group_name: str, selector: str, version: int) -> dict[str, Any]:
    """The fields of SGLang's UpdateWeightsFromDistributedReqInput for one broadcast of
    `manifest` (sent one tensor per broadcast, in this order)."""
    if selector not in ("target", "draft"):
        raise ValueError(f"selector must be 'target' or 'draft' (with 'all' draft tensors reach the target), got {selector!r}")
    return {"names": [spec.name for spec in manifest], "dtypes": [spec.dtype for spec in manifest],
            "shapes": [list(spec.shape) for spec in manifest], "group_name": group_name,
            "flush_cache": False, "weight_version": str(version), "selector": selector}


# EAGLE-3 checkpoint name pieces -> SGLang's fused parameters (llama_eagle3.load_weights).
_STACKED = ((".q_proj", ".qkv_proj", "q"), (".k_proj", ".qkv_proj", "k"), (".v_proj", ".qkv_proj", "v"),
            (".gate_proj", ".gate_up_proj", 0), (".up_proj", ".gate_up_proj", 1))
_NOT_SENT = ("d2t", "t2d")  # the draft vocabulary is read once, at launch


def draft_update_tensors(state: Mapping[str, torch.Tensor],
                         launched_d2t: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Our drafter's state dict as the draft tensors of a selector="draft" update, under the
    EAGLE-3 checkpoint names SGLang's draft loader takes (it maps `midlayer` to `layers.0` and
    fuses q/k/v and gate/up itself). The vocabulary map is not sent (SGLang reads it once): a
    drafter whose d2t differs from the launched one is refused."""
    if launched_d2t is not None and "d2t" in state and not torch.equal(state["d2t"].cpu(), launched_d2t.cpu()):
        raise ValueError("the drafter's draft vocabulary (d2t) changed since SGLang was launched; SGLang ignores a "
                         "new one, so its drafts would map to the wrong target tokens")
    return {name: tensor for name, tensor in state.items() if name not in _NOT_SENT}


def sglang_draft_parameter(name: str) -> tuple[str, str | int | None]:
    """Where SGLang's EAGLE-3 draft puts a checkpoint tensor: (its parameter, shard); mirrors
    llama_eagle3.load_weights so tests can show every tensor we send lands in a parameter."""
    name = name.replace("midlayer", "layers.0")
    shard: str | int | None = None
    for piece, fused, shard_id in _STACKED:
        if piece in name:
            name, shard = name.replace(piece, fused), shard_id
            break
    return (name if name.startswith(("lm_head.", "model.")) else f"model.{name}"), shard
