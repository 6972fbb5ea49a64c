"""The rollout-history drafter: exact sampling whatever the history holds, greedy equality with
plain decoding, the incremental index against a rebuilt one, and the memory cap.

Exactness: as tests/engine/test_engine_exactness.py (2000 requests of one prompt, the law of the
first three output tokens against the exact one, chi-square). History is helpful (the index
holds plain samples of the same prompt) or adversarial (every draft is the continuation the
target is least likely to sample, often outside the top-p support). False alarms: 8 checks
that must pass at alpha = 1e-4 each, so a correct engine fails this file with probability
< 8e-4 (Bonferroni); seeds are fixed, so the outcome is deterministic.
"""

import random
import tracemalloc

import pytest
import torch

from respec_async.engine import fused
from respec_async.engine.engine import Engine
from respec_async.engine.requests import Request, SDConfig
from respec_async.engine.history import DOC_BYTES, HistoryIndex
from respec_async.engine.sampling import SamplingParams, sampling_logprobs
from tests.engine.test_engine import PROMPTS, V as ENGINE_V, tiny_models
from tests.engine.test_engine_exactness import NUM_SAMPLES, PROMPT, V, exact_law
from tests.engine.test_speculative import chi_square_pvalue

torch.set_num_threads(1)
ALPHA = 1e-4
CHAIN, TREE = SDConfig(3, 1, 3, "history"), SDConfig(3, 2, 5, "history")
PARAMS = [SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=3),
          SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=3)]


@pytest.fixture(scope="module")
def models():
    return tiny_models(seed=3, vocab_size=V)


class AdversarialIndex(HistoryIndex):
    """Every row's sources are continuations the target rarely samples: after the prompt and
    the row's tokens so far, the least likely next token (and for trees the second least)."""

    def __init__(self, target, params):
        super().__init__()
        self.target, self.params = target, params
        self.memo = {}

    def _worst(self, context: list[int], rank: int) -> list[int]:
        key = (tuple(context), rank)
        if key not in self.memo:
            self.memo[key] = self._worst_uncached(context, rank)
        return self.memo[key]

    def _worst_uncached(self, context: list[int], rank: int) -> list[int]:
        out = []
        for _ in range(3):
            with torch.no_grad(), fused.module_path(self.target):
                logits = self.target(torch.tensor([context + out])).logits[0, -1]
            p = sampling_logprobs(logits, self.params.temperature, self.params.top_p).exp()
            out.append(int(p.argsort()[rank if not out else 0]))
        return out

    def _match(self, cursor) -> None:
        context = list(cursor.doc.tokens)
        docs = []
        for rank in range(2):
            doc = self._add_doc(cursor.group, context + self._worst(context, rank), live=False)
            docs.append([doc, len(context)])
        cursor.sources, cursor.leader = docs, None


def sample_triples(target, index, params, sd, seed):
    engine = Engine(target, None, max_batch_size=128, max_seq_len=32, seed=seed, history=index)
    completions = engine.generate([Request(i, PROMPT, params) for i in range(NUM_SAMPLES)], sd)
    out = torch.tensor([c.output_ids for c in completions])
    counts = torch.bincount(out[:, 0] * V * V + out[:, 1] * V + out[:, 2], minlength=V ** 3).double()
    return counts, completions


@pytest.mark.parametrize("params", PARAMS, ids=lambda p: f"T{p.temperature}-p{p.top_p}")
@pytest.mark.parametrize("sd", [CHAIN, TREE], ids=["chain", "tree"])
def test_helpful_history_samples_the_target(models, sd, params):
    target, _ = models
    index = HistoryIndex()
    Engine(target, None, max_batch_size=64, max_seq_len=32, seed=99, history=index).generate(
        [Request(i, PROMPT, params) for i in range(64)], None)  # earlier rollouts of the prompt
    counts, completions = sample_triples(target, index, params, sd, seed=30 + PARAMS.index(params))
    assert chi_square_pvalue(counts, exact_law(target, params)) > ALPHA
    assert sum(c.num_accepted for c in completions) > NUM_SAMPLES // 2  # history drafts really were accepted


@pytest.mark.parametrize("params", PARAMS, ids=lambda p: f"T{p.temperature}-p{p.top_p}")
@pytest.mark.parametrize("sd", [CHAIN, TREE], ids=["chain", "tree"])
def test_adversarial_history_samples_the_target(models, sd, params):
    target, _ = models
    counts, completions = sample_triples(target, AdversarialIndex(target, params), params, sd,
                                         seed=40 + PARAMS.index(params))
    assert chi_square_pvalue(counts, exact_law(target, params)) > ALPHA
    assert sum(c.num_drafted for c in completions) >= NUM_SAMPLES  # every row was offered drafts


@pytest.mark.parametrize("lazy", [True, False], ids=["lazy-drafter", "eager-drafter"])
def test_greedy_history_decoding_equals_plain(lazy):
    target, drafter = tiny_models()
    params = SamplingParams(temperature=0.0, max_new_tokens=24)
    prompts = PROMPTS * 4  # each prompt recurs: there is history to draft from
    requests = [Request(i, p, params) for i, p in enumerate(prompts)]
    plain = Engine(target, None, max_batch_size=4, max_seq_len=64).generate(requests, None)
    # History chains and trees, EAGLE and plain steps in turn, through one engine with a drafter.
    schedule = iter(range(10 ** 6))
    configs = [CHAIN, None, SDConfig(4, 2, 6, "history"), SDConfig(3, 1, 3), SDConfig(8, 1, 8, "history"),
               SDConfig(3, 2, 4)]
    engine = Engine(target, drafter, max_batch_size=4, max_seq_len=64, history=HistoryIndex(), lazy_drafter=lazy)
    mixed = engine.generate(requests, lambda batch: configs[next(schedule) % len(configs)])
    assert [c.output_ids for c in mixed] == [c.output_ids for c in plain]
    for a, b in zip(mixed, plain):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4, rtol=0)
    assert sum(c.num_accepted for c in mixed) > 0
    # Without a drafter, history alone; ragged verifications packed whenever a row has padding.
    alone = Engine(target, None, max_batch_size=4, max_seq_len=64, history=HistoryIndex(),
                   min_packed_saving=1).generate(requests, SDConfig(6, 1, 6, "history"))
    assert [c.output_ids for c in alone] == [c.output_ids for c in plain]
    for a, b in zip(alone, plain):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4, rtol=0)
    later = alone[len(PROMPTS):]  # the second and later samples of each prompt find the first
    assert sum(c.num_accepted for c in later) / sum(len(c.output_ids) for c in later) > 0.5


def test_history_config_without_an_index_is_refused():
    target, _ = tiny_models()
    engine = Engine(target, None, max_batch_size=2, max_seq_len=32)
    engine.add_request(Request(0, [1, 2], SamplingParams(max_new_tokens=4)))
    with pytest.raises(ValueError, match="history"):
        engine.step(CHAIN)


def table_snapshot(index: HistoryIndex):
    return {prompt: {key: sorted(entries) for key, entries in group.table.items()}
            for prompt, group in index.groups.items()}


def test_incremental_index_equals_one_rebuilt_from_scratch():
    rng = random.Random(0)
    index = HistoryIndex(max_rollouts_per_prompt=1000)
    prompts = [[1, 2, 3], [4, 5]]
    live = {}
    for step in range(400):  # rows start, grow by 1-4 tokens, and finish, interleaved
        if len(live) < 5 and rng.random() < 0.3:
            live[step] = index.open(rng.choice(prompts))
        for key, cursor in list(live.items()):
            index.extend(cursor, [rng.randrange(6) for _ in range(rng.randint(1, 4))])
            if rng.random() < 0.05:
                index.close(live.pop(key))
    incremental = table_snapshot(index)
    # Every document again, whole, in the order they were opened.
    replay = HistoryIndex(max_rollouts_per_prompt=1000)
    for prompt, group in index.groups.items():
        for doc in list(group.docs.values())[1:]:
            cursor = replay.open(list(prompt))
            replay.extend(cursor, doc.tokens[len(prompt):])
            if not doc.live:
                replay.close(cursor)
    assert table_snapshot(replay) == incremental
    for group in index.groups.values():
        index._rebuild(group)
    assert table_snapshot(index) == incremental


@pytest.mark.slow  # ~3.5 s: out of the quick tier
def test_memory_cap_holds_under_a_stream_of_rollouts():
    """num_bytes bounds the index's real memory (tracemalloc) and stays under max_bytes."""
    rng = random.Random(1)
    max_bytes = 2 * 2**20
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        index = HistoryIndex(max_bytes=max_bytes)
        prompts = [[rng.randrange(50_000) for _ in range(rng.randint(4, 30))] for _ in range(400)]
        for i in range(3000):
            cursor = index.open(rng.choice(prompts))
            for _ in range(rng.randint(1, 20)):
                index.extend(cursor, [rng.randrange(50_000) for _ in range(rng.randint(1, 8))])
            index.close(cursor)
            assert index.num_bytes <= max_bytes
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert index.num_evicted_docs > 1000  # the cap was what bounded it
    assert held <= index.num_bytes, f"index holds {held} bytes, accounts {index.num_bytes}"
    assert held >= 0.3 * index.num_bytes  # and the bound is not vacuous


def test_live_rows_are_never_evicted():
    index = HistoryIndex(max_bytes=0)
    cursor = index.open([1, 2, 3])
    index.extend(cursor, [4, 5, 6])
    other = index.open([9, 9])
    index.extend(other, [1, 2, 3, 4, 5, 6, 7])
    assert cursor.doc.tokens == [1, 2, 3, 4, 5, 6]
    assert [1, 2, 3] in [list(p) for p in index.groups] and [9, 9] in [list(p) for p in index.groups]
    index.close(cursor)
    assert (1, 2, 3) not in index.groups  # finished and over the cap: evicted
    assert index.num_bytes >= DOC_BYTES


def test_a_sibling_ahead_is_drafted_from():
    index = HistoryIndex()
    ahead = index.open([7, 8])
    index.extend(ahead, [1, 2, 3, 4, 5, 6])
    behind = index.open([7, 8])
    index.extend(behind, [1, 2])
    chains, num_drafted = index.draft_chains([behind], 3)
    assert list(chains) == [3, 4, 5] and num_drafted == [3]
    draft = index.draft([behind], 3, 2, 4)
    assert draft.num_drafted == [3] and list(draft.tokens)[1:4] == [3, 4, 5]


def test_a_wrong_point_mass_residual_is_detected(models, monkeypatch):
    """The check can fail: resampling a rejected history draft from p (not p without the draft)
    over-samples the drafted continuations, and the chi-square test sees it (p < 1e-6)."""
    from respec_async.engine import engine as engine_module
    from respec_async.engine.sampling import sample

    def resample_from_p(drafts, num_drafts, target_logprobs, generator=None):
        k = drafts.shape[1]
        p_draft = target_logprobs[:, :k].exp().gather(-1, drafts[:, :, None])[:, :, 0]
        accepted = (torch.rand(p_draft.shape, generator=generator) < p_draft) & (torch.arange(k) < num_drafts[:, None])
        num_accepted = accepted.long().cumprod(-1).sum(-1)
        return num_accepted, sample(target_logprobs[torch.arange(len(drafts)), num_accepted], generator)

    monkeypatch.setattr(engine_module, "point_chain_accept", resample_from_p)
    target, _ = models
    params = PARAMS[0]
    index = HistoryIndex()
    Engine(target, None, max_batch_size=64, max_seq_len=32, seed=98, history=index).generate(
        [Request(i, PROMPT, params) for i in range(64)], None)
    counts, _ = sample_triples(target, index, params, CHAIN, seed=50)
    assert chi_square_pvalue(counts, exact_law(target, params)) < 1e-6


def test_a_row_that_substitutes_one_token_keeps_following_its_source():
    index = HistoryIndex()
    ahead = index.open([7, 8])
    index.extend(ahead, [1, 2, 3, 4, 5, 6, 7, 8])
    row = index.open([7, 8])
    index.extend(row, [1, 2])
    assert list(index.draft_chains([row], 3)[0]) == [3, 4, 5]
    index.extend(row, [3, 9])  # accepted 3, then sampled 9 where the source has 4
    assert list(index.draft_chains([row], 3)[0]) == [5, 6, 7]  # past the substitution
    index.extend(row, [1])  # the source said 5: dropped, and no other position follows (9, 1)
    assert index.draft_chains([row], 3)[1] == [0]


def test_greedy_equality_holds_at_the_sequence_length_limit_under_eviction_and_shadows():
    """Drafts that would run past max_seq_len, stop tokens inside drafts, an index evicting
    under a 2 kB cap and shadow chains every step: greedy output is still plain's."""
    target, drafter = tiny_models()
    rng = random.Random(0)
    for trial in range(4):
        prompts = [[rng.randrange(ENGINE_V) for _ in range(rng.randint(1, 12))] for _ in range(6)] * 3
        params = SamplingParams(temperature=0.0, max_new_tokens=rng.randint(1, 20), stop_token_ids=(3,))
        requests = [Request(i, p, params) for i, p in enumerate(prompts)]
        plain = Engine(target, None, max_batch_size=3, max_seq_len=16).generate(requests, None)
        configs = [SDConfig(8, 1, 8, "history"), None, SDConfig(3, 1, 3), SDConfig(6, 2, 9, "history")]
        turn = iter(range(10 ** 6))
        engine = Engine(target, drafter, max_batch_size=3, max_seq_len=16, history=HistoryIndex(max_bytes=2000),
                        shadow_length=8)
        mixed = engine.generate(requests, lambda batch: configs[next(turn) % len(configs)])
        assert [c.output_ids for c in mixed] == [c.output_ids for c in plain], trial
        assert engine.history.num_bytes <= 2000 and engine.history.num_evicted_docs > 0


def test_the_chain_follows_the_newest_source_with_a_next_token():
    index = HistoryIndex()
    for tail in ([3, 7], [3, 9], [4, 8]):
        sibling = index.open([5])
        index.extend(sibling, [1, 2, *tail])
    level = index.open([5])
    index.extend(level, [1, 2])  # a sibling exactly as far as the row: no next token yet
    row = index.open([5])
    index.extend(row, [1, 2])
    chain, _ = index.draft_chains([row], 2)
    assert list(chain) == [4, 8]  # the newest source leads, although two older ones say 3
    index.extend(row, [3])  # the leader failed: the sources that said 3 remain, the newer leads
    assert list(index.draft_chains([row], 2)[0]) == [9, 0]

