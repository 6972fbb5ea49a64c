"""Continuous-batching generation engine with exact speculative decoding.

    engine = Engine(target, drafter, max_batch_size=16, max_seq_len=512, seed=0)
    completions = engine.generate(requests, sd_policy=lambda batch: SDConfig(4, 1, 4) if batch <= 4 else None)

Every sequence owns a slot of a static, preallocated KV cache (target and drafter). Each
`step(sd)` admits waiting requests into free slots with one batched prefill (a request whose
prompt a running or just-admitted sequence has takes that one's prompt K/V and drafter state and
runs only its last prompt token: a GRPO group's samples pay one prefill), then runs one
decode step for every active sequence: plain (one token) or speculative with the given
SDConfig, chosen per step by the caller (ReSpec's adaptive scheduler reads `num_active` and
`refilling` first). Nothing is reallocated when the mode or the SD config changes between steps.
Which request holds which slot, and what each sequence has emitted, is the slot scheduler's
(engine/slots.py); the request, completion and SD-config types are in engine/requests.py. This
module runs the models on the slots and keeps their device state.

Per-slot state, all on the device:
    tokens[slot, :L+1]   the sequence; token L is the last one emitted and not yet in the
                         target cache (the next forward's input)
    lengths[slot] = L    tokens whose K/V the target cache holds
    pending features     target features f_{L-P}..f_{L-1} the drafter has not consumed yet
                         (P = num_pending >= 1). Drafter cache entry i pairs token x_{i+1}
                         with f_i at position i (as in algorithms.distill), so entries
                         0..L-P-1 are valid; the entry at L-1 is the root every draft grows
                         from. A speculative step first runs the drafter over the pending
                         entries ("catch-up", EAGLE's re-run on accepted tokens), which
                         also yields the root's logits and hidden. Plain steps only append
                         features: an eager engine catches up in a batch whenever
                         MAX_PENDING_FEATURES are buffered; a lazy one (the default where
                         a buffer for whole sequences is small) catches up only when SD
                         is next chosen, and skips the drafter's prompt prefill of
                         requests admitted by a plain step, so a sequence that finishes
                         under plain decoding never costs a drafter forward.

Drafts come from the EAGLE drafter or, for SDConfig(source="history"), from the rollout
history (engine/history.py; `Engine(history=HistoryIndex())` indexes every sequence as it is
emitted and keeps it after it finishes): no drafter forward, chains verified by
point_chain_accept and trees by tree_accept, exact either way; the verified path's features
queue behind the pending ones for the drafter's next catch-up. With shadow_length, every step
also drafts unverified history chains for a few rows (StepStats.shadow_tests/hits), a free sample
of what a history step would accept.

Every emitted token's behaviour log-prob is the target's `sampling_logprobs` of it, read from
the forward that verified or sampled it.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Iterable

import torch

from respec_async.engine import fused
from respec_async.engine.drafter import Eagle3Drafter
from respec_async.engine.history import HistoryIndex, chain_tensors, draft_tensors
from respec_async.engine.model import KVCache, Linear, ModelOutput, Transformer, can_prepack, prepack_available
from respec_async.engine.requests import Completion, Request, SDConfig, SDPolicy, StepStats
from respec_async.engine.sampling import sample, sampling_logprobs, token_logprobs
from respec_async.engine.slots import Sequence, SlotScheduler
from respec_async.engine.speculative import (
    DraftTree, RelaxedAcceptance, chain_accept, point_chain_accept, select_tree, tree_accept, tree_attention_mask)

# Target features buffered per slot between drafter catch-ups while SD is off (eager upkeep).
MAX_PENDING_FEATURES = 32
# Lazy upkeep buffers a whole sequence's features per slot; the engine takes it by default
# when that buffer (max_batch_size x max_seq_len x 3 hidden) is at most this many bytes.
LAZY_PENDING_BYTES = 256 * 2**20
# The largest target the engine runs through engine/fused.py by default (fused_inference=None).
FUSED_MAX_PARAMETERS = 50_000_000
# The largest bf16 CPU target whose linear weights the engine prepacks for oneDNN by default
# (prepack_weights=None): the packed copy doubles the weight memory.
PREPACK_MAX_BYTES = 4 * 2**30


class Engine:
    def __init__(self, target: Transformer, drafter: Eagle3Drafter | None = None, max_batch_size: int = 16,
                 max_seq_len: int = 512, seed: int = 0, relaxed: RelaxedAcceptance | None = None,
                 max_draft_tokens: int = 64, fused_inference: bool | None = None,
                 lazy_drafter: bool | None = None, history: HistoryIndex | None = None,
                 shadow_length: int = 0, shadow_rows: int = 4, min_packed_saving: int = 32,
                 spread_siblings: bool = False, prepack_weights: bool | None = None, share_prompts: bool = True):
        param = next(target.parameters())
        if prepack_weights and not can_prepack(param):  # before anything is changed on the models
            raise ValueError(f"prepack_weights=True: the packed copy is for bfloat16 weights on a CPU that runs "
                             f"oneDNN's packed bf16 linear (torch.ops.mkldnn._reorder_linear_weight / "
                             f"_linear_pointwise: {'usable' if prepack_available() else 'not usable'} with this "
                             f"torch build and CPU); this target's weights are {param.dtype} on {param.device}")
        self.target = target.eval()
        self.drafter = None if drafter is None else drafter.eval()
        self.device, self.dtype = param.device, param.dtype
        # engine/fused.py: the same math in fewer ops, for about twice the weight memory. On by
        # default for small float32 models on CPU, whose decode steps cost their op count; a
        # large model's cost is its matmuls, which fusing does not shrink.
        if fused_inference is None:
            fused_inference = (param.device.type == "cpu" and param.dtype == torch.float32
                               and sum(p.numel() for p in target.parameters()) <= FUSED_MAX_PARAMETERS)
        for model in (self.target, self.drafter):
            if model is not None:
                model.fused_inference = fused_inference
        # model.Linear.prepack: bf16 CPU matmuls of more than one row on a oneDNN-packed weight
        # copy (1.3-1.6x faster, bit-identical), for a second copy of the weights.
        if prepack_weights is None:
            prepack_weights = (can_prepack(param) and sum(
                p.numel() * p.element_size() for p in target.parameters()) <= PREPACK_MAX_BYTES)
        for module in self.target.modules():
            if isinstance(module, Linear):
                module.prepack = prepack_weights
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len
        # A sample admitted beside one with the same prompt is not prefilled (_share_prompt).
        self.share_prompts = share_prompts
        self._target_weights = 0  # load_target_state calls so far
        self.max_draft_tokens = max_draft_tokens
        self.relaxed = relaxed
        # A ragged chain verification (history rows draft 0..k tokens) is packed, skipping the
        # padding's projections and MLPs, when it saves at least this many tokens: packing
        # costs a few ops a layer, which only a large padded share pays back.
        self.min_packed_saving = min_packed_saving
        # Rollout history (engine/history.py): every sequence is indexed as it is generated and
        # kept after it finishes, whatever the weights; history SD configs draft from it.
        self.history = history
        # Shadow acceptance (HistoryIndex.shadow_chains): each decode step drafts a chain of
        # shadow_length for up to shadow_rows rows without verifying it (at 4 rows a plain step
        # at B = 64 costs ~2% more, at 16 ~11%: a new match after a rejection is not cheap); StepStats.shadow_tests
        # and shadow_hits then tell how many drafts the rows' own tokens matched. 0 = off.
        self.shadow_length, self.shadow_rows = (shadow_length, shadow_rows) if history is not None else (0, 0)
        self._shadow_turn = 0
        self.generator = torch.Generator(self.device).manual_seed(seed)
        # Room past max_seq_len for a verified tree, drafter tree entries and catch-up padding.
        self.cache_len = max_seq_len + max_draft_tokens + MAX_PENDING_FEATURES + 2
        config = target.config
        # Drafter upkeep while SD is off (module docstring): lazy buffers every feature of a
        # sequence until SD is chosen, eager catches up every MAX_PENDING_FEATURES steps.
        if lazy_drafter is None:
            buffer_bytes = max_batch_size * (max_seq_len + 1) * 3 * config.hidden_size * self.dtype.itemsize
            lazy_drafter = buffer_bytes <= LAZY_PENDING_BYTES
        self.lazy_drafter = drafter is not None and lazy_drafter
        # (+ a verified path: a history step appends its features without a catch-up)
        self.max_pending = max_seq_len + max_draft_tokens + 2 if self.lazy_drafter else MAX_PENDING_FEATURES
        with torch.inference_mode():
            self.cache = KVCache(config, max_batch_size, self.cache_len, self.dtype, self.device)
            self.tokens = torch.zeros(max_batch_size, self.cache_len, dtype=torch.long, device=self.device)
            self.lengths = torch.zeros(max_batch_size, dtype=torch.long, device=self.device)
            self.temperature = torch.ones(max_batch_size, device=self.device)
            self.top_p = torch.ones(max_batch_size, device=self.device)
            self.top_k = torch.zeros(max_batch_size, device=self.device)
            self.feature_layers: tuple[int, ...] = ()
            if drafter is not None:
                self.feature_layers = tuple(drafter.config.feature_layers)
                self.drafter_cache = KVCache(drafter.config.cache_config(), max_batch_size, self.cache_len,
                                             self.dtype, self.device)
                self.pending_features = torch.zeros(max_batch_size, self.max_pending, 3 * config.hidden_size,
                                                    dtype=self.dtype, device=self.device)
                self.num_pending = torch.zeros(max_batch_size, dtype=torch.long, device=self.device)
        self._step_draft: tuple[list[int], float] | None = None
        # spread_siblings (engine/slots.py): only useful with a history index to draft from.
        self.slots = SlotScheduler(max_batch_size, max_seq_len, spread_siblings and history is not None)
        # The most recent steps, for metrics; bounded so a long-lived generator does not grow.
        self.step_stats: deque[StepStats] = deque(maxlen=10_000)

    # ---- requests and weights -------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        self.slots.add(request)

    # What a caller choosing the next step's SD config reads (the slot scheduler's state).
    @property
    def num_active(self) -> int:
        """Sequences the next step will decode: the running ones plus those it will admit."""
        return self.slots.num_active

    @property
    def has_unfinished(self) -> bool:
        return self.slots.has_unfinished

    @property
    def refilling(self) -> bool:
        """More requests wait than slots are free (slots freed now are refilled next step)."""
        return self.slots.refilling

    @property
    def last_step(self) -> StepStats | None:
        """What the latest `step()` did (mode, SD config, batch, tokens emitted and accepted)."""
        return self.step_stats[-1] if self.step_stats else None

    def load_target_state(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Copy new target weights into the existing parameters (call between steps)."""
        with torch.no_grad():
            self.target.load_state_dict(state_dict, strict=True)
        fused.drop_cache(self.target)  # load_state_dict bumps the version counters; be explicit anyway
        self._target_weights += 1  # prompts prefilled before now are no source for sharing

    def load_drafter_state(self, state_dict: dict[str, torch.Tensor]) -> None:
        if self.drafter is None:
            raise ValueError("this engine has no drafter")
        with torch.no_grad():
            self.drafter.load_state_dict(state_dict, strict=True)
        fused.drop_cache(self.drafter)

    # ---- the loop -------------------------------------------------------------------------

    def generate(self, requests: Iterable[Request], sd_policy: SDPolicy = None) -> list[Completion]:
        """Run `requests` to completion; sd_policy is consulted before every step with the
        active batch size. Completions come back in request order."""
        requests = list(requests)
        for request in requests:
            self.add_request(request)
        done: dict[str | int, Completion] = {}
        while self.has_unfinished:
            sd = sd_policy(self.num_active) if callable(sd_policy) else sd_policy
            for completion in self.step(sd):
                done[completion.request_id] = completion
        return [done[request.request_id] for request in requests]

    @torch.inference_mode()
    def step(self, sd: SDConfig | None = None) -> list[Completion]:
        """Admit waiting requests (prefill), then one plain or speculative decode step for every
        running sequence. Returns the sequences that finished in this step."""
        start_s = time.perf_counter()
        finished: list[Completion] = []
        num_admitted, num_prefilled = self._admit(finished, sd)
        self._compact()  # holes that admission left (fewer requests waited than slots were free)
        slots = sorted(self.slots.running)
        num_emitted = num_accepted = 0
        mode = "idle"
        self._step_draft: tuple[list[int], float] | None = None  # history steps: drafts per row, seconds
        if slots:
            slot_ids = torch.tensor(slots, device=self.device)
            sampling_args = self._sampling_args(slots, slot_ids)
            if sd is not None:
                self._check_sd(sd)
                tokens, logprobs, num_tokens = self._speculative_step(slot_ids, sd, sampling_args)
                mode = "sd"
            else:
                tokens, logprobs, num_tokens = self._plain_step(slot_ids, sampling_args)
                mode = "plain"
            if self.shadow_length:
                self._start_shadows(slots)
            num_emitted = self._emit(slots, tokens, logprobs, num_tokens, sd if mode == "sd" else None, finished)
            if mode == "sd":
                num_accepted = int(num_tokens.sum()) - len(slots)
        if not self.slots.waiting:
            self._compact()  # nothing will refill the freed slots: close the holes now
        if mode == "sd":
            num_drafted = sum(self._step_draft[0]) if self._step_draft else sd.num_draft_tokens * len(slots)
            draft_s = self._step_draft[1] if self._step_draft else 0.0
        else:
            num_drafted, draft_s = 0, 0.0
        shadow_tests, shadow_hits = self.history.take_shadow_counts() if self.shadow_length else ([], [])
        self.step_stats.append(StepStats(mode, sd if mode == "sd" else None, len(slots), num_admitted, num_emitted,
                                         time.perf_counter() - start_s, num_accepted, num_drafted, draft_s,
                                         shadow_tests, shadow_hits, num_prefilled))
        return finished

    def _start_shadows(self, slots: list[int]) -> None:
        """Shadow chains for up to shadow_rows rows, taken in turn (before this step's tokens
        are emitted: they are the first the shadows are scored against). Any step will do: plain
        or speculative, the emitted tokens are samples of the target."""
        count = min(self.shadow_rows, len(slots))
        start = self._shadow_turn % len(slots)
        chosen = [slots[(start + i) % len(slots)] for i in range(count)]
        self._shadow_turn = start + count
        self.history.shadow_chains([self.slots.running[slot].cursor for slot in chosen], self.shadow_length)

    def _check_sd(self, sd: SDConfig) -> None:
        if sd.source == "history":
            if self.history is None:
                raise ValueError(f"history speculative decoding {sd} requested, but this engine keeps no history index")
            if sd.num_draft_tokens > self.max_draft_tokens or sd.num_steps > self.max_draft_tokens:
                raise ValueError(f"{sd} exceeds the engine's max_draft_tokens {self.max_draft_tokens}")
            return
        if self.drafter is None:
            raise ValueError(f"speculative decoding {sd} requested, but this engine has no drafter")
        if sd.num_draft_tokens > self.max_draft_tokens or (sd.num_steps - 1) * sd.top_k > self.max_draft_tokens \
                or sd.num_steps + 1 > self.max_pending:
            raise ValueError(f"{sd} exceeds the engine's max_draft_tokens {self.max_draft_tokens} "
                             f"(or num_steps >= {self.max_pending})")
        if sd.top_k > self.drafter.config.draft_vocab_size:
            raise ValueError(f"{sd}: top_k exceeds the draft vocabulary")

    def _sampling_args(self, slots: list[int], slot_ids: torch.Tensor) -> tuple:
        """(temperature, top_p, top_k) for sampling_logprobs: Python scalars when every sequence
        shares them (no per-row tensors on the hot path), else one value per row."""
        distinct = {(p.temperature, p.top_p, p.top_k) for p in (self.slots.running[slot].request.params for slot in slots)}
        if len(distinct) == 1:
            return distinct.pop()
        return self.temperature[slot_ids], self.top_p[slot_ids], self.top_k[slot_ids]

    def _features(self, hidden: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(hidden, dim=-1)

    # ---- prefill ----------------------------------------------------------------------------

    def _admit(self, finished: list[Completion], sd: SDConfig | None = None) -> tuple[int, int]:
        """Waiting requests into free slots: (admitted, prefilled)."""
        admitted = self.slots.admit()
        for sequence in admitted:
            request = sequence.request
            params = request.params
            self.temperature[sequence.slot] = params.temperature
            self.top_p[sequence.slot] = params.top_p
            self.top_k[sequence.slot] = params.top_k
            if self.history is not None:
                sequence.cursor = self.history.open(request.prompt_ids)
            sequence.prompt_key = tuple(request.prompt_ids)
        if not admitted:
            return 0, 0
        prefill, copies = admitted, []
        if self.share_prompts:
            # A GRPO group's samples share their prompt: the first one admitted is prefilled, the
            # others take its prompt's K/V and drafter state and run only its last token.
            # Sources: prompts whose K/V the current target weights computed (a sequence admitted
            # before a weight update keeps its old K/V; a new sample must not inherit it).
            new = {sequence.slot for sequence in admitted}
            sources = {sequence.prompt_key: slot for slot, sequence in self.slots.running.items()
                       if slot not in new and sequence.prompt_weights == self._target_weights}
            prefill = []
            for sequence in admitted:
                sequence.prompt_weights = self._target_weights
                key = sequence.prompt_key
                if len(key) < 2:
                    prefill.append(sequence)
                elif key in sources:
                    copies.append((sequence, sources[key]))
                else:
                    sources[key] = sequence.slot
                    prefill.append(sequence)
        if prefill:
            self._prefill(prefill, finished, sd)
        if copies:
            self._share_prompt(copies, finished)
        return len(admitted), len(prefill)

    def _prefill(self, admitted: list[Sequence], finished: list[Completion], sd: SDConfig | None) -> None:
        """The target over the sequences' prompts (their K/V into the cache), their first tokens
        sampled and emitted, the drafter's prompt entries written or queued."""
        slots = torch.tensor([sequence.slot for sequence in admitted], device=self.device)
        prompt_lens = torch.tensor([len(sequence.request.prompt_ids) for sequence in admitted], device=self.device)
        max_len = int(prompt_lens.max())
        ids = torch.zeros(len(admitted), max_len, dtype=torch.long, device=self.device)
        for row, sequence in enumerate(admitted):
            ids[row, :len(sequence.request.prompt_ids)] = torch.tensor(sequence.request.prompt_ids)
        positions = torch.arange(max_len, device=self.device).expand(len(admitted), -1)
        # Padding past a prompt writes K/V beyond its length, which later steps overwrite.
        out = self._target(ids, positions, slots, logits_positions=(prompt_lens - 1)[:, None])
        sampling_args = self._sampling_args([sequence.slot for sequence in admitted], slots)
        logprobs = sampling_logprobs(out.logits[:, 0], *sampling_args)
        first = sample(logprobs, self.generator)
        self.tokens[slots, :max_len] = ids
        self.tokens[slots, prompt_lens] = first
        self.lengths[slots] = prompt_lens
        if self.lazy_drafter and (sd is None or not sd.uses_drafter):
            # Every prompt feature waits for the next catch-up (entries 0..P-2 and the root).
            # Not before an EAGLE step: its catch-up pads every row to the longest backlog, so a
            # prompt left pending would cost B x prompt-length drafter entries.
            self.pending_features[slots, :max_len] = self._features(out.hidden)
            self.num_pending[slots] = prompt_lens
        elif self.drafter is not None:
            features = self._features(out.hidden)
            # Drafter entries 0..P-2 now; f_{P-1} waits for the token after the next one.
            if max_len > 1:
                self.drafter(ids[:, 1:], features[:, :-1], positions[:, :-1], self.drafter_cache, slots,
                             positions[:, :-1], None, logits_positions=positions[:, :0])
            self.pending_features[slots, 0] = features[torch.arange(len(admitted), device=self.device), prompt_lens - 1]
            self.num_pending[slots] = 1
        self._emit([sequence.slot for sequence in admitted], first[:, None], token_logprobs(logprobs, first)[:, None],
                   torch.ones_like(first), None, finished, prefill=True)

    def _share_prompt(self, copies: list[tuple[Sequence, int]], finished: list[Completion]) -> None:
        """Each (sequence, source slot): a running sequence with the same prompt P tokens long.
        The new one takes the K/V of prompt positions 0..P-2 from the source, and the drafter
        state of those positions (the drafter entries the source has written below P - 1, the
        pending features of the rest); a one-token forward of its last prompt token then gives
        its first token as a prefill would (same distribution, same state after)."""
        destination = torch.tensor([sequence.slot for sequence, _ in copies], device=self.device)
        source = torch.tensor([slot for _, slot in copies], device=self.device)
        prompt_lens = torch.tensor([len(sequence.request.prompt_ids) for sequence, _ in copies], device=self.device)
        num_shared = int(prompt_lens.max()) - 1
        # Entries past a shorter prompt's P - 1 are the source's own; the new row overwrites them
        # before any query of its own sees them.
        for buffer in (self.cache.k, self.cache.v):
            buffer[:, destination, :, :num_shared] = buffer[:, source, :, :num_shared]
        self.tokens[destination, :num_shared + 1] = self.tokens[source, :num_shared + 1]
        last = prompt_lens - 1
        out = self._target(self.tokens[destination, last][:, None], last[:, None], destination)
        sampling_args = self._sampling_args([sequence.slot for sequence, _ in copies], destination)
        logprobs = sampling_logprobs(out.logits[:, 0], *sampling_args)
        first = sample(logprobs, self.generator)
        self.tokens[destination, prompt_lens] = first
        self.lengths[destination] = prompt_lens
        if self.drafter is not None:
            written = torch.minimum(self.lengths[source] - self.num_pending[source], last)
            if int(written.max()) > 0:
                num_written = int(written.max())
                for buffer in (self.drafter_cache.k, self.drafter_cache.v):
                    buffer[:, destination, :, :num_written] = buffer[:, source, :, :num_written]
            # The source's pending features start at its first unwritten entry: below P - 1 they
            # are the prompt's, the same for every sample; f_{P-1} comes from the forward above.
            num_pending = last - written
            width = int(num_pending.max())
            if width > 0:
                self.pending_features[destination, :width] = self.pending_features[source, :width]
            self.pending_features[destination, num_pending] = self._features(out.hidden)[:, 0]
            self.num_pending[destination] = num_pending + 1
        self._emit([sequence.slot for sequence, _ in copies], first[:, None], token_logprobs(logprobs, first)[:, None],
                   torch.ones_like(first), None, finished, prefill=True)

    def _compact(self) -> None:
        """Keep the running sequences in slots 0..n-1: move the highest-numbered ones into the
        free slots below n. Attention then reads each layer's cache rows as one slice instead
        of gathering them (on CPU a gather of B slots' K/V costs several decode steps' worth of
        memory traffic once sequences are long). Holes only persist once no request waits to
        fill them (the tail of a generation phase); a move copies one sequence's valid cache
        entries and per-slot state, once."""
        movers, holes = self.slots.compaction()
        if not holes:
            return
        source = torch.tensor(movers, device=self.device)
        destination = torch.tensor(holes, device=self.device)
        num_keys = int(self.lengths[source].max()) + 1
        caches = [self.cache] + ([self.drafter_cache] if self.drafter is not None else [])
        for cache in caches:
            for buffer in (cache.k, cache.v):
                buffer[:, destination, :, :num_keys] = buffer[:, source, :, :num_keys]
        per_slot = [self.tokens, self.lengths, self.temperature, self.top_p, self.top_k]
        if self.drafter is not None:
            per_slot.append(self.num_pending)
            # Only the pending entries: under lazy upkeep a row holds up to a whole sequence.
            num_pending = int(self.num_pending[source].max())
            self.pending_features[destination, :num_pending] = self.pending_features[source, :num_pending]
        for buffer in per_slot:
            buffer[destination] = buffer[source]
        self.slots.move(movers, holes)

    # ---- plain decoding -------------------------------------------------------------------

    def _target(self, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, *,
                cache_positions: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                **kwargs) -> ModelOutput:
        """The target over `ids` [B, T] at RoPE `positions`, written to the KV-cache rows `slots`
        at `cache_positions` (default: the positions), attending by `mask` (default: causal by
        cache index); returns the drafter's feature layers too. kwargs: logits_positions (where
        logits are wanted; default every token), num_real (ragged rows)."""
        return self.target(ids, positions, self.cache, slots, positions if cache_positions is None else cache_positions,
                           mask, hidden_layers=self.feature_layers, **kwargs)

    def _plain_step(self, slots: torch.Tensor, sampling_args: tuple):
        lengths = self.lengths[slots]
        out = self._target(self.tokens[slots, lengths][:, None], lengths[:, None], slots)
        logprobs = sampling_logprobs(out.logits[:, 0], *sampling_args)
        tokens = sample(logprobs, self.generator)
        self.tokens[slots, lengths + 1] = tokens
        self.lengths[slots] = lengths + 1
        if self.drafter is not None:
            num_pending = self.num_pending[slots]
            self.pending_features[slots, num_pending] = self._features(out.hidden)[:, 0]
            self.num_pending[slots] = num_pending + 1
            if int(num_pending.max()) + 1 >= self.max_pending:
                self._drafter_catch_up(slots, keep_last=True)
        return tokens[:, None], token_logprobs(logprobs, tokens)[:, None], torch.ones_like(tokens)

    # ---- speculative decoding -------------------------------------------------------------

    def _drafter_catch_up(self, slots: torch.Tensor, keep_last: bool = False):
        """Run the drafter over every pending entry (token x_{i+1}, target feature f_i).

        Returns the root's draft logits [B, V_draft] and hidden [B, h] (entry L-1), or, with
        keep_last, stops short of the root and leaves its feature pending (plain mode)."""
        num_pending = self.num_pending[slots] - int(keep_last)
        num_entries = int(num_pending.max())
        if num_entries == 0:
            return None, None
        first = self.lengths[slots] - self.num_pending[slots]
        # A slot with fewer entries than the most pads past its length, where later writes land
        # anyway; the clamp keeps a long lazy catch-up's padding inside the cache.
        positions = (first[:, None] + torch.arange(num_entries, device=self.device)).clamp_(max=self.cache_len - 2)
        ids = self.tokens[slots[:, None], positions + 1]
        last = (num_pending - 1).clamp(min=0)[:, None]
        logits, hidden = self.drafter(ids, self.pending_features[slots, :num_entries], positions, self.drafter_cache,
                                      slots, positions, None, logits_positions=last if not keep_last else last[:, :0])
        if keep_last:
            self.pending_features[slots, 0] = self.pending_features[slots, num_pending]
            self.num_pending[slots] = 1
            return None, None
        self.num_pending[slots] = 0
        return logits[:, 0], hidden.gather(1, last[:, :, None].expand(-1, -1, hidden.shape[-1]))[:, 0]

    def _speculative_step(self, slots: torch.Tensor, sd: SDConfig, sampling_args: tuple):
        """Draft (chain or tree), verify in one target forward, accept exactly, commit."""
        lengths = self.lengths[slots]
        if sd.source == "history":
            emitted, num_accepted, path, target_logprobs, features = self._history_step(
                slots, lengths, sd, sampling_args)
        else:
            root_logits, root_hidden = self._drafter_catch_up(slots)
            step = self._chain_step if sd.is_chain else self._tree_step
            emitted, num_accepted, path, target_logprobs, features = step(
                slots, lengths, root_logits, root_hidden, sd, sampling_args)
        # Commit: the emitted tokens, the target features of the verified path for the next
        # catch-up, and the new length (root + accepted drafts are now in the target cache).
        num_slots_written = emitted.shape[1]
        offsets = torch.arange(num_slots_written, device=self.device)
        self.tokens[slots[:, None], lengths[:, None] + 1 + offsets] = emitted
        if self.drafter is not None and sd.uses_drafter:
            self.pending_features[slots, :num_slots_written] = features
            self.num_pending[slots] = num_accepted + 1
        elif self.drafter is not None:
            # No catch-up ran: the path's features queue up behind the pending ones (entries past
            # a row's accepted path land beyond its count and are overwritten later).
            num_pending = self.num_pending[slots]
            self.pending_features[slots[:, None], num_pending[:, None] + offsets] = features
            self.num_pending[slots] = num_pending + num_accepted + 1
        self.lengths[slots] = lengths + num_accepted + 1
        # log p(emitted token) at each path node, indexed directly (gathering the path's rows of
        # [B, k+1, V] first copied all of them: ~8% of a history step at B = 8, V = 49k).
        rows = torch.arange(len(slots), device=self.device)[:, None]
        logprobs = target_logprobs[rows, path.clamp(min=0), emitted]
        return emitted, logprobs, num_accepted + 1

    def _history_step(self, slots, lengths, sd: SDConfig, sampling_args: tuple):
        """Drafts from the history index (no model call), verified exactly whatever the engine's
        relaxed setting (a chain by point_chain_accept, a tree by tree_accept)."""
        if self.drafter is not None and int(self.num_pending[slots].max()) + sd.num_steps + 1 >= self.max_pending:
            self._drafter_catch_up(slots, keep_last=True)  # eager upkeep: room for the path's features
        started = time.perf_counter()
        cursors = [self.slots.running[slot].cursor for slot in slots.tolist()]
        if not sd.is_chain:
            draft = self.history.draft(cursors, sd.num_steps, sd.top_k, sd.num_draft_tokens)
            tree = DraftTree(*draft_tensors(draft, self.device))
            self._step_draft = (draft.num_drafted, time.perf_counter() - started)
            return self._verify_tree(slots, lengths, tree, sampling_args, relaxed=None)
        chains, num_drafted = self.history.draft_chains(cursors, sd.num_steps)
        drafts, num_drafts = chain_tensors(chains, num_drafted, self.device)
        self._step_draft = (num_drafted, time.perf_counter() - started)
        padding = len(num_drafted) * sd.num_steps - sum(num_drafted)
        return self._verify_chain(slots, lengths, drafts, sampling_args, lambda target_logprobs: point_chain_accept(
            drafts, num_drafts, target_logprobs, self.generator),
            num_real=num_drafts + 1 if padding >= self.min_packed_saving else None)

    def _chain_step(self, slots, lengths, logits, hidden, sd: SDConfig, sampling_args: tuple):
        drafts, draft_logprobs = [], []
        for step in range(sd.num_steps):
            q = sampling_logprobs(self.drafter.draft_logits_to_target(logits), *sampling_args)
            drafts.append(sample(q, self.generator))
            draft_logprobs.append(q)
            if step + 1 < sd.num_steps:
                # Entry L+step: the draft just made, with the drafter's own hidden.
                position = (lengths + step)[:, None]
                logits, hidden = self.drafter(drafts[-1][:, None], hidden[:, None], position, self.drafter_cache,
                                              slots, position)
                logits, hidden = logits[:, 0], hidden[:, 0]
        drafts = torch.stack(drafts, 1)
        return self._verify_chain(slots, lengths, drafts, sampling_args, lambda target_logprobs: chain_accept(
            drafts, torch.stack(draft_logprobs, 1), target_logprobs, self.generator, self.relaxed))

    def _verify_chain(self, slots, lengths, drafts: torch.Tensor, sampling_args: tuple, accept,
                      num_real: torch.Tensor | None = None):
        """One target forward over root + drafts [B, k] at L..L+k; accept(target_logprobs) gives
        (num_accepted, next_tokens) by the rule the drafts were made for. num_real (root + real
        drafts per row, the rest padding): a ragged batch, verified packed."""
        num_steps = drafts.shape[1]
        positions = lengths[:, None] + torch.arange(num_steps + 1, device=self.device)
        ids = torch.cat([self.tokens[slots, lengths][:, None], drafts], 1)
        out = self._target(ids, positions, slots, num_real=num_real)
        target_logprobs = sampling_logprobs(out.logits, *sampling_args)
        num_accepted, next_tokens = accept(target_logprobs)
        emitted = torch.cat([drafts, next_tokens[:, None]], 1)
        emitted[torch.arange(len(slots), device=self.device), num_accepted] = next_tokens
        path = torch.arange(num_steps + 1, device=self.device).expand(len(slots), -1)
        features = self._features(out.hidden) if self.feature_layers else None
        return emitted, num_accepted, path, target_logprobs, features

    def _tree_step(self, slots, lengths, root_logits, root_hidden, sd: SDConfig, sampling_args: tuple):
        """EAGLE-2 tree expansion by the drafter, then _verify_tree."""
        s, t = sd.num_steps, sd.top_k
        batch_size = len(slots)
        vocab_ids = self.drafter.draft_vocab_ids
        # EAGLE-2 expansion scored by the drafter's raw log-probs: the children are deterministic
        # picks, so the acceptance rule is exact whatever scores choose them.
        scores, draft_ids = torch.log_softmax(root_logits, -1).topk(t, dim=-1)
        tokens = vocab_ids[draft_ids]
        cand_tokens, cand_scores = [tokens], [scores]
        cand_parents = [torch.full_like(tokens, -1)]
        cand_depths = [torch.ones_like(tokens)]
        frontier = torch.arange(t, device=self.device).expand(batch_size, -1)
        hidden = root_hidden[:, None].expand(-1, t, -1)
        num_candidates = t
        width = int(lengths.max()) + (s - 1) * t
        columns = torch.arange(width, device=self.device)
        row_mask = (columns < lengths[:, None])[:, None, :].expand(-1, t, -1)
        for step in range(1, s):
            # The t frontier nodes go in as drafter entries at L + (step-1)t .. ; each sees the
            # prefix, its ancestors' entries and itself.
            cache_positions = lengths[:, None] + (step - 1) * t + torch.arange(t, device=self.device)
            row_mask = row_mask | (columns == cache_positions[:, :, None])
            positions = (lengths - 1 + step)[:, None].expand(-1, t)
            logits, out_hidden = self.drafter(tokens, hidden, positions, self.drafter_cache, slots, cache_positions,
                                              row_mask)
            child_scores, child_ids = torch.log_softmax(logits, -1).topk(t, dim=-1)  # [B, t, t]
            cumulative = (scores[:, :, None] + child_scores).flatten(1)
            children = vocab_ids[child_ids].flatten(1)
            cand_tokens.append(children)
            cand_scores.append(cumulative)
            cand_parents.append(frontier[:, :, None].expand(-1, -1, t).flatten(1))
            cand_depths.append(torch.full_like(children, step + 1))
            best = cumulative.topk(t, dim=-1).indices
            parent_rank = best // t
            frontier = num_candidates + best
            tokens, scores = children.gather(1, best), cumulative.gather(1, best)
            hidden = out_hidden.gather(1, parent_rank[:, :, None].expand(-1, -1, out_hidden.shape[-1]))
            row_mask = row_mask.gather(1, parent_rank[:, :, None].expand(-1, -1, width))
            num_candidates += t * t
        tree = select_tree(self.tokens[slots, lengths], torch.cat(cand_tokens, 1), torch.cat(cand_parents, 1),
                           torch.cat(cand_depths, 1), torch.cat(cand_scores, 1), sd.num_draft_tokens)
        return self._verify_tree(slots, lengths, tree, sampling_args, self.relaxed)

    def _verify_tree(self, slots, lengths, tree: DraftTree, sampling_args: tuple, relaxed: RelaxedAcceptance | None):
        """One target forward over every row's tree (written at L..L+n), exact acceptance, and the
        accepted path's K/V moved to L, L+1, ..."""
        batch_size, num_nodes = tree.tokens.shape
        cache_positions = lengths[:, None] + torch.arange(num_nodes, device=self.device)
        mask = tree_attention_mask(tree, lengths, int(lengths.max()) + num_nodes)
        out = self._target(tree.tokens, lengths[:, None] + tree.depths, slots, cache_positions=cache_positions,
                           mask=mask)
        target_logprobs = sampling_logprobs(out.logits, *sampling_args)
        path, num_accepted, next_tokens = tree_accept(tree, target_logprobs, self.generator, relaxed)

        # The accepted path's K/V sits at L + node index; move it to L, L+1, ... (past the path
        # end, copy each position onto itself).
        steps = torch.arange(path.shape[1], device=self.device)
        source = lengths[:, None] + torch.where(path >= 0, path, steps)
        destination = lengths[:, None] + steps
        rows = slots[:, None].expand_as(source)
        for buffer in (self.cache.k, self.cache.v):
            buffer[:, rows, :, destination] = buffer[:, rows, :, source]

        emitted = torch.cat([tree.tokens.gather(1, path[:, 1:].clamp(min=0)), next_tokens[:, None]], 1)
        emitted[torch.arange(batch_size, device=self.device), num_accepted] = next_tokens
        features = None
        if self.feature_layers:
            features = self._features(out.hidden)
            features = features.gather(1, path.clamp(min=0)[:, :, None].expand(-1, -1, features.shape[-1]))
        return emitted, num_accepted, path, target_logprobs, features

    # ---- bookkeeping ----------------------------------------------------------------------

    def _emit(self, slots: list[int], tokens: torch.Tensor, logprobs: torch.Tensor, num_tokens: torch.Tensor,
              sd: SDConfig | None, finished: list[Completion], prefill: bool = False) -> int:
        """Append each sequence's new tokens (host side), stop at a stop token, max_new_tokens or
        max_seq_len, and free the slots of finished sequences."""
        tokens, logprobs, num_tokens = tokens.tolist(), logprobs.tolist(), num_tokens.tolist()
        num_emitted = 0
        for row, slot in enumerate(slots):
            sequence = self.slots.running[slot]
            if not prefill:
                drafted = self._step_draft[0][row] if self._step_draft else (sd.num_draft_tokens if sd else 0)
                sequence.count_step(sd, drafted, num_tokens[row])
            new_tokens = tokens[row][:num_tokens[row]]
            num_new, reason = self.slots.append(sequence, new_tokens, logprobs[row][:num_tokens[row]])
            if sequence.cursor is not None:
                self.history.extend(sequence.cursor, new_tokens[:num_new])
            num_emitted += num_new
            if reason:
                finished.append(self._finish(sequence, reason))
        return num_emitted

    def _finish(self, sequence: Sequence, reason: str) -> Completion:
        if sequence.cursor is not None:
            self.history.close(sequence.cursor)
        return self.slots.finish(sequence, reason)
