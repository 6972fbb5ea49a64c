"""Engine behaviour on a tiny random target and drafter: greedy equality of SD with plain
decoding, behaviour log-probs, continuous batching, mode switching, stopping, weight loading."""

from types import SimpleNamespace

import pytest
import torch

from respec_async.engine import fused
from respec_async.engine.drafter import Eagle3Drafter
from respec_async.engine import engine as engine_module
from respec_async.engine.engine import Engine
from respec_async.engine.requests import Completion, Request, SDConfig
from respec_async.engine.model import ModelConfig, Transformer
from respec_async.engine.sampling import SamplingParams, sampling_logprobs

torch.set_num_threads(1)
V = 16
CHAIN = SDConfig(3, 1, 3)
TREE = SDConfig(3, 3, 8)


def tiny_models(seed=0, vocab_size=V, num_layers=2):
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=None, rms_norm_eps=1e-6,
                         rope_theta=10000.0, max_position_embeddings=256, tie_word_embeddings=False,
                         attention_bias=False, model_type="llama")
    target = Transformer(config)
    for param in target.parameters():
        if param.dim() > 1:
            torch.nn.init.normal_(param, std=0.4)
    drafter = Eagle3Drafter.from_target(target)
    for param in drafter.parameters():
        if param.dim() > 1:
            torch.nn.init.normal_(param, std=0.4)
    return target.eval(), drafter.eval()


PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11], [3, 3, 5, 1, 2]]


def requests(params, prompts=PROMPTS):
    return [Request(i, prompt, params) for i, prompt in enumerate(prompts)]


def run(target, drafter, params, policy, max_batch_size=4, prompts=PROMPTS, seed=0, lazy_drafter=None):
    engine = Engine(target, drafter, max_batch_size=max_batch_size, max_seq_len=64, seed=seed,
                    lazy_drafter=lazy_drafter)
    return engine.generate(requests(params, prompts), policy), engine


def full_logprobs(target, completion: Completion, params: SamplingParams) -> torch.Tensor:
    ids = torch.tensor([completion.prompt_ids + completion.output_ids])
    with torch.no_grad(), fused.module_path(target):  # the reference: the module path, not the engine's
        logits = target(ids).logits[0]
    logprobs = sampling_logprobs(logits, params.temperature, params.top_p, params.top_k)
    start = len(completion.prompt_ids) - 1
    return logprobs[start:start + len(completion.output_ids)].gather(
        -1, torch.tensor(completion.output_ids)[:, None])[:, 0]


@pytest.fixture(scope="module")
def models():
    return tiny_models()


GREEDY = SamplingParams(temperature=0.0, max_new_tokens=20)


@pytest.mark.parametrize("sd", [CHAIN, TREE, SDConfig(4, 2, 6), SDConfig(1, 4, 4)], ids=str)
def test_greedy_speculative_equals_greedy_plain(models, sd):
    target, drafter = models
    plain, _ = run(target, drafter, GREEDY, None)
    speculative, engine = run(target, drafter, GREEDY, sd)
    for a, b in zip(plain, speculative):
        assert a.output_ids == b.output_ids
        assert len(a.output_ids) == 20
    assert all(c.num_verify_steps > 0 and c.acceptance_length >= 1.0 for c in speculative)
    assert any(stat.mode == "sd" for stat in engine.step_stats)


def test_greedy_matches_a_full_forward_argmax(models):
    target, _ = models
    plain, _ = run(target, None, GREEDY, None)
    for completion in plain:
        ids = list(completion.prompt_ids)
        for token in completion.output_ids:
            with torch.no_grad():
                assert int(target(torch.tensor([ids])).logits[0, -1].argmax()) == token
            ids.append(token)


@pytest.mark.parametrize("sd", [None, CHAIN, TREE], ids=str)
def test_behaviour_logprobs_equal_a_full_forward(models, sd):
    target, drafter = models
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=10, max_new_tokens=12)
    completions, _ = run(target, drafter, params, sd)
    for completion in completions:
        expected = full_logprobs(target, completion, params)
        torch.testing.assert_close(torch.tensor(completion.logprobs), expected, atol=1e-4, rtol=1e-4)
        assert torch.isfinite(expected).all()


def test_more_requests_than_slots_match_running_each_alone(models):
    target, drafter = models
    work = [Request(i, [i % V, (3 * i) % V, (5 * i + 1) % V][: 1 + i % 3],
                    SamplingParams(temperature=0.0, max_new_tokens=5 + 4 * i)) for i in range(7)]
    alone = [Engine(target, drafter, max_batch_size=1, max_seq_len=64).generate([r], TREE)[0].output_ids
             for r in work]
    seen = []

    def policy(batch_size):
        seen.append(batch_size)
        return CHAIN if batch_size <= 2 else None

    engine = Engine(target, drafter, max_batch_size=3, max_seq_len=64)
    together = engine.generate(work, policy)
    assert [c.output_ids for c in together] == alone
    assert [len(c.output_ids) for c in together] == [5 + 4 * i for i in range(7)]
    assert set(seen) == {1, 2, 3}
    assert engine.num_active == 0 and sorted(engine.slots.free_slots) == [0, 1, 2]
    assert {stat.mode for stat in engine.step_stats} == {"sd", "plain"}


@pytest.mark.parametrize("sd", [None, CHAIN, TREE], ids=str)
def test_running_sequences_move_down_into_freed_slots_and_decode_on_unchanged(models, sd):
    """Once no request waits, sequences in high slots move into the slots finished ones free
    (engine._compact), K/V, drafter state and all: outputs equal running each alone, behaviour
    log-probs equal a full forward, and the running slots are always 0..n-1."""
    target, drafter = models
    lengths = [3, 6, 9, 12, 15]  # the lowest slots finish first
    work = [Request(i, PROMPTS[i % len(PROMPTS)], SamplingParams(temperature=0.0, max_new_tokens=n))
            for i, n in enumerate(lengths)]
    alone = [Engine(target, drafter, max_batch_size=1, max_seq_len=64).generate([r], sd)[0] for r in work]
    engine = Engine(target, drafter, max_batch_size=5, max_seq_len=64)
    for request in work:
        engine.add_request(request)
    done, moved = {}, False
    while engine.has_unfinished:
        before = {seq.request.request_id: slot for slot, seq in engine.slots.running.items()}
        for completion in engine.step(sd):
            done[completion.request_id] = completion
        after = {seq.request.request_id: slot for slot, seq in engine.slots.running.items()}
        moved |= any(before.get(rid, slot) != slot for rid, slot in after.items())
        assert sorted(engine.slots.running) == list(range(len(engine.slots.running)))  # nothing waits: no holes
    assert moved
    assert [done[i].output_ids for i in range(len(work))] == [c.output_ids for c in alone]
    # Greedy drafts are deterministic too: the moved drafter state drafts what it did alone.
    assert [done[i].num_accepted for i in range(len(work))] == [c.num_accepted for c in alone]

    sampled = SamplingParams(temperature=0.8, max_new_tokens=12)
    engine = Engine(target, drafter, max_batch_size=4, max_seq_len=64, seed=3)
    work = [Request(i, PROMPTS[i % len(PROMPTS)], SamplingParams(temperature=0.8, max_new_tokens=3 + 3 * i))
            for i in range(4)]
    for completion in engine.generate(work, sd):
        torch.testing.assert_close(torch.tensor(completion.logprobs), full_logprobs(target, completion, sampled),
                                   atol=1e-4, rtol=1e-4)


def test_a_compaction_move_carries_every_piece_of_a_sequences_state(models):
    target, drafter = models
    engine = Engine(target, drafter, max_batch_size=3, max_seq_len=64)
    for request in requests(SamplingParams(temperature=1.0, max_new_tokens=30), PROMPTS[:3]):
        engine.add_request(request)
    for _ in range(3):
        engine.step(CHAIN)
    engine._finish(engine.slots.running[0], "stop")  # free the lowest slot under a running sequence
    mover = engine.slots.running[2]
    length, num_pending = int(engine.lengths[2]), int(engine.num_pending[2])
    assert num_pending >= 1
    caches = (engine.cache.k, engine.cache.v, engine.drafter_cache.k, engine.drafter_cache.v)
    state = [buffer[:, 2, :, :length].clone() for buffer in caches] + [
        buffer[2].clone() for buffer in (engine.tokens, engine.lengths, engine.temperature, engine.num_pending)] + [
        engine.pending_features[2, :num_pending].clone()]  # the pending entries; the rest is stale anyway
    with torch.inference_mode():
        engine._compact()
    assert engine.slots.running[0] is mover and mover.slot == 0 and sorted(engine.slots.running) == [0, 1]
    assert engine.slots.free_slots == [2]
    moved = [buffer[:, 0, :, :length] for buffer in caches] + [
        buffer[0] for buffer in (engine.tokens, engine.lengths, engine.temperature, engine.num_pending)] + [
        engine.pending_features[0, :num_pending]]
    for before, after in zip(state, moved):
        assert torch.equal(before, after)


UPKEEP = pytest.mark.parametrize("lazy", [True, False], ids=["lazy", "eager"])


@UPKEEP
def test_switching_modes_every_few_steps_keeps_greedy_equality(models, lazy):
    target, drafter = models
    plain, _ = run(target, drafter, SamplingParams(temperature=0.0, max_new_tokens=40), None)
    schedule = [None, CHAIN, CHAIN, TREE, None, None, SDConfig(2, 4, 5), TREE, None, CHAIN]
    counter = iter(range(10_000))

    def policy(batch_size):
        return schedule[next(counter) // 2 % len(schedule)]

    switched, engine = run(target, drafter, SamplingParams(temperature=0.0, max_new_tokens=40), policy,
                           lazy_drafter=lazy)
    assert engine.lazy_drafter is lazy
    assert [c.output_ids for c in switched] == [c.output_ids for c in plain]
    assert {stat.mode for stat in engine.step_stats} == {"sd", "plain"}


@UPKEEP
def test_long_plain_stretch_then_sd_catches_the_drafter_up(models, lazy):
    target, drafter = models
    params = SamplingParams(temperature=0.0, max_new_tokens=50)
    plain, _ = run(target, drafter, params, None)
    counter = iter(range(10_000))
    switched, _ = run(target, drafter, params, lambda batch: None if next(counter) < 40 else TREE, lazy_drafter=lazy)
    assert [c.output_ids for c in switched] == [c.output_ids for c in plain]


def count_forwards(module) -> list:
    calls = []
    module.register_forward_hook(lambda *args: calls.append(1))
    return calls


def test_a_lazy_drafter_costs_nothing_until_sd_is_chosen(models):
    """Lazy upkeep: plain decoding runs no drafter forward at all (prompt prefill and catch-ups
    wait for SD), the eager engine runs them every MAX_PENDING_FEATURES steps, and the first SD
    step of the lazy engine catches every sequence up in one forward."""
    target, drafter = tiny_models()
    calls = count_forwards(drafter)
    params = SamplingParams(temperature=1.0, max_new_tokens=60)
    lazy, _ = run(target, drafter, params, None, lazy_drafter=True)
    assert calls == []
    eager, _ = run(target, drafter, params, None, lazy_drafter=False)
    assert len(calls) >= 2  # the prefill and at least one catch-up (60 steps > MAX_PENDING_FEATURES)
    assert [c.output_ids for c in lazy] == [c.output_ids for c in eager]  # the drafter never touches plain output
    calls.clear()
    engine = Engine(target, drafter, max_batch_size=4, max_seq_len=64, lazy_drafter=True)
    for request in requests(params):
        engine.add_request(request)
    for _ in range(20):
        engine.step(None)
    running = sorted(engine.slots.running)
    assert calls == [] and int(engine.num_pending[running].min()) > 20  # prompt + 20 steps of features
    engine.step(CHAIN)
    assert len(calls) == 1 + CHAIN.num_steps - 1  # one catch-up, then the chain's drafts
    assert int(engine.num_pending[running].max()) <= CHAIN.num_steps + 1  # the backlog is consumed


def test_a_lazy_engine_prefills_the_drafter_for_requests_an_sd_step_admits():
    """Left pending, a new prompt would make the step's catch-up pad every row to its length
    (B x prompt-length drafter entries at every refill): a step that runs SD prefills it now."""
    target, drafter = tiny_models()
    widths = []
    drafter.register_forward_hook(lambda module, args, output: widths.append(args[0].shape[1]))
    engine = Engine(target, drafter, max_batch_size=5, max_seq_len=64, lazy_drafter=True)
    for request in requests(SamplingParams(max_new_tokens=8), [list(range(1, 13)) * 2] * 4):
        engine.add_request(request)
    engine.step(CHAIN)
    assert widths == [23, 1] + [1] * (CHAIN.num_steps - 1)  # prefill, a one-entry catch-up, drafts
    widths.clear()
    engine.add_request(Request("late", list(range(1, 13)) * 2, SamplingParams(max_new_tokens=8)))
    engine.step(None)  # admitted by a plain step: nothing for the drafter
    assert widths == [] and len(engine.slots.running) == 5


def test_the_engine_buffers_whole_sequences_only_where_that_is_small(models, monkeypatch):
    target, drafter = models
    assert Engine(target, drafter, max_batch_size=4, max_seq_len=64).lazy_drafter
    assert not Engine(target, None, max_batch_size=4, max_seq_len=64).lazy_drafter
    monkeypatch.setattr(engine_module, "LAZY_PENDING_BYTES", 4 * 65 * 3 * 32 * 4 - 1)  # one byte short
    eager = Engine(target, drafter, max_batch_size=4, max_seq_len=64)
    assert not eager.lazy_drafter and eager.pending_features.shape[1] == engine_module.MAX_PENDING_FEATURES


def test_stop_tokens_and_max_new_tokens(models):
    target, drafter = models
    plain, _ = run(target, drafter, SamplingParams(temperature=0.0, max_new_tokens=30), None)
    stop = plain[1].output_ids[5]
    params = SamplingParams(temperature=0.0, max_new_tokens=30, stop_token_ids=(stop,))
    for sd in (None, TREE):
        completions, _ = run(target, drafter, params, sd)
        for full, completion in zip(plain, completions):
            if stop in full.output_ids:
                cut = full.output_ids.index(stop) + 1
                assert completion.output_ids == full.output_ids[:cut] and completion.finish_reason == "stop"
            else:
                assert completion.output_ids == full.output_ids and completion.finish_reason == "length"
            assert len(completion.logprobs) == len(completion.output_ids)


def test_max_seq_len_ends_sequences(models):
    target, drafter = models
    engine = Engine(target, drafter, max_batch_size=2, max_seq_len=12, seed=0)
    [completion] = engine.generate([Request("a", [1, 2, 3, 4], SamplingParams(max_new_tokens=100))], TREE)
    assert len(completion.output_ids) == 8 and completion.finish_reason == "length"
    with pytest.raises(ValueError):
        engine.add_request(Request("b", list(range(12)), SamplingParams()))


def test_step_reports_active_batch_and_finished(models):
    target, drafter = models
    engine = Engine(target, drafter, max_batch_size=2, max_seq_len=64, seed=0)
    for request in requests(SamplingParams(temperature=1.0, max_new_tokens=3)):
        engine.add_request(request)
    assert engine.num_active == 2
    finished = []
    while engine.has_unfinished:
        finished += engine.step(CHAIN)
    assert sorted(c.request_id for c in finished) == [0, 1, 2, 3]
    assert [stat.num_active for stat in engine.step_stats][0] == 2
    assert all(stat.duration_s > 0 for stat in engine.step_stats)


def test_load_target_state_copies_in_place(models):
    target, drafter = tiny_models(seed=1)
    other, other_drafter = tiny_models(seed=2)
    engine = Engine(target, drafter, max_batch_size=2, max_seq_len=64)
    before = {name: param.data_ptr() for name, param in target.named_parameters()}
    engine.load_target_state(other.state_dict())
    engine.load_drafter_state(other_drafter.state_dict())
    assert {name: param.data_ptr() for name, param in target.named_parameters()} == before
    expected, _ = run(other, other_drafter, GREEDY, None)
    got = engine.generate(requests(GREEDY), TREE)
    assert [c.output_ids for c in got] == [c.output_ids for c in expected]


def test_reduced_draft_vocabulary_keeps_greedy_equality_and_logprobs():
    target, _ = tiny_models(seed=4)
    torch.manual_seed(5)
    drafter = Eagle3Drafter.from_target(target, draft_vocab_ids=torch.tensor([0, 2, 3, 5, 7, 8, 11, 12, 13, 15]))
    for param in drafter.parameters():
        if param.dim() > 1:
            torch.nn.init.normal_(param, std=0.4)
    plain, _ = run(target, drafter, GREEDY, None)
    params = SamplingParams(temperature=0.9, top_p=0.95, max_new_tokens=12)
    for sd in (CHAIN, TREE):
        speculative, _ = run(target, drafter, GREEDY, sd)
        assert [c.output_ids for c in speculative] == [c.output_ids for c in plain]
        sampled, _ = run(target, drafter, params, sd)
        for completion in sampled:
            torch.testing.assert_close(torch.tensor(completion.logprobs), full_logprobs(target, completion, params),
                                       atol=1e-4, rtol=1e-4)


def test_sd_config_is_hashable_and_validated():
    assert SDConfig(4, 1, 8) == SDConfig(4, 1, 4) and len({SDConfig(4, 1, 8), SDConfig(4, 1, 4)}) == 1
    assert SDConfig(3, 4).num_draft_tokens == 12
    for bad in [(0, 1, 1), (4, 1, 3), (2, 2, 7)]:
        with pytest.raises(ValueError):
            SDConfig(*bad)
    target, _ = tiny_models()
    with pytest.raises(ValueError, match="no drafter"):
        Engine(target, None, max_batch_size=1, max_seq_len=16).generate(requests(GREEDY)[:1], CHAIN)


def assert_drafter_cache_is_a_fresh_pass(engine, target, drafter, slots) -> list[int]:
    """Each slot's drafter K/V for every consumed position equals a from-scratch drafter pass over
    its sequence with the target's features; returns the consumed counts."""
    consumed_counts = []
    for slot in slots:
        length = int(engine.lengths[slot])
        consumed = length - int(engine.num_pending[slot])
        ids = engine.tokens[slot, :length + 1][None]
        with torch.no_grad():
            features = torch.cat(target(ids[:, :length], hidden_layers=engine.feature_layers).hidden, -1)
            cache = SimpleNamespace(k=torch.zeros_like(engine.drafter_cache.k[:, :1]),
                                    v=torch.zeros_like(engine.drafter_cache.v[:, :1]))
            drafter(ids[:, 1:consumed + 1], features[:, :consumed], None, cache, torch.tensor([0]))
        torch.testing.assert_close(engine.drafter_cache.k[0, slot, :, :consumed], cache.k[0, 0, :, :consumed],
                                   atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(engine.drafter_cache.v[0, slot, :, :consumed], cache.v[0, 0, :, :consumed],
                                   atol=1e-4, rtol=1e-4)
        consumed_counts.append(consumed)
    return consumed_counts


@UPKEEP
def test_drafter_cache_matches_a_fresh_drafter_pass_after_switching(models, lazy):
    """EAGLE's re-run on accepted tokens, whatever mix of plain, chain and tree steps produced
    the sequence."""
    target, drafter = models
    engine = Engine(target, drafter, max_batch_size=2, max_seq_len=96, seed=1, lazy_drafter=lazy)
    for request in requests(SamplingParams(temperature=1.0, max_new_tokens=80), PROMPTS[:2]):
        engine.add_request(request)
    schedule = [CHAIN, None, TREE, TREE] + [None] * 35 + [CHAIN, TREE, None, CHAIN]
    for sd in schedule:
        engine.step(sd)
    assert min(assert_drafter_cache_is_a_fresh_pass(engine, target, drafter, (0, 1))) > 30


def test_a_long_lazy_catch_up_beside_a_short_one_stays_inside_the_cache(models):
    """One slot far into its sequence with one pending feature, another just admitted with a long
    prompt pending: the catch-up pads the first slot past its length by the second's backlog,
    beyond the cache's end unless clamped."""
    target, drafter = models
    engine = Engine(target, drafter, max_batch_size=2, max_seq_len=96, max_draft_tokens=8, seed=2, lazy_drafter=True)
    engine.add_request(Request("long", [1, 2, 3], SamplingParams(temperature=1.0, max_new_tokens=92)))
    while int(engine.lengths[0]) < 80:
        engine.step(CHAIN)
    engine.add_request(Request("late", [(7 * i) % V for i in range(85)], SamplingParams(max_new_tokens=8)))
    engine.step(CHAIN)  # catch-up entries: 1-4 for slot 0, 85 for slot 1
    assert int(engine.lengths[0]) - 1 + 85 > engine.cache_len - 2  # the padding did reach past the cache
    assert min(assert_drafter_cache_is_a_fresh_pass(engine, target, drafter, (0, 1))) >= 80


def count_prefills(engine, monkeypatch) -> list[int]:
    """Sequences each _prefill call of the engine ran the target over."""
    counts = []
    prefill = engine._prefill

    def counted(admitted, *args):
        counts.append(len(admitted))
        return prefill(admitted, *args)

    monkeypatch.setattr(engine, "_prefill", counted)
    return counts


@UPKEEP
@pytest.mark.parametrize("sd", [None, CHAIN, TREE, SDConfig(4, 1, 4, "history")], ids=str)
def test_samples_of_one_prompt_share_its_prefill_and_decode_as_if_prefilled(models, sd, lazy, monkeypatch):
    """Three samples each of two prompts (7 and 5 tokens, interleaved) through 4 slots: a sample
    admitted beside a sibling (in its admission or while one runs) takes the sibling's prompt
    K/V and drafter state instead of a prefill; greedy tokens and log-probs equal those of
    prefilling every sample (its drafter state: the test below)."""
    from respec_async.engine.history import HistoryIndex
    target, drafter = models
    prompts = [PROMPTS[1], PROMPTS[3]] * 3
    results = {}
    for share in (False, True):
        engine = Engine(target, drafter, max_batch_size=4, max_seq_len=64, seed=0, share_prompts=share,
                        history=HistoryIndex(), lazy_drafter=lazy)
        counts = count_prefills(engine, monkeypatch)
        results[share] = engine.generate(requests(GREEDY, prompts), sd), counts, engine.step_stats
    (alone, alone_counts, _), (shared, shared_counts, stats) = results[False], results[True]
    assert sum(alone_counts) == 6
    # the first admission: two of each prompt, 2 prefills and a copy batch of both lengths; the
    # last two share one prefill, or none if a sibling still runs when they are admitted
    assert shared_counts[0] == 2 and sum(shared_counts) <= 4
    assert (stats[0].num_admitted, stats[0].num_prefilled) == (4, 2)
    for a, b in zip(alone, shared):
        assert a.output_ids == b.output_ids and len(b.output_ids) == 20
        torch.testing.assert_close(torch.tensor(b.logprobs), torch.tensor(a.logprobs), atol=1e-5, rtol=1e-5)


def test_a_sibling_that_finishes_in_its_prefill_still_shares_and_new_weights_stop_sharing(models, monkeypatch):
    """max_new_tokens = 1: the prefilled sample finishes (its slot freed) in the admission its
    siblings copy it in; and a sample admitted after load_target_state is prefilled afresh
    (the running sibling's prompt K/V are the old weights')."""
    target, drafter = models
    params = SamplingParams(temperature=0.0, max_new_tokens=1)
    outputs = {}
    for share in (False, True):
        engine = Engine(target, drafter, max_batch_size=4, max_seq_len=64, share_prompts=share)
        outputs[share] = [c.output_ids for c in engine.generate(requests(params, [PROMPTS[1]] * 4))]
    assert outputs[True] == outputs[False] and all(len(ids) == 1 for ids in outputs[True])
    engine = Engine(target, drafter, max_batch_size=4, max_seq_len=64)
    counts = count_prefills(engine, monkeypatch)
    long = SamplingParams(temperature=1.0, max_new_tokens=30)
    engine.add_request(Request("a", PROMPTS[1], long))
    engine.step(None)
    engine.add_request(Request("b", PROMPTS[1], long))
    engine.step(None)
    assert counts == [1]  # b shared a's prompt
    engine.load_target_state(target.state_dict())
    engine.add_request(Request("c", PROMPTS[1], long))
    engine.step(None)
    assert counts == [1, 1]  # c did not: a's and b's prompt K/V predate the update


@UPKEEP
def test_a_sample_admitted_beside_a_running_sibling_gets_a_consistent_drafter_state(models, lazy, monkeypatch):
    """Siblings admitted while one runs, after plain steps (lazy: its prompt's features still
    pending; eager: its drafter entries written) and after SD steps: every drafter cache equals a
    fresh pass once SD has caught them up, and the shared ones were never prefilled."""
    target, drafter = models
    engine = Engine(target, drafter, max_batch_size=4, max_seq_len=96, seed=3, lazy_drafter=lazy)
    counts = count_prefills(engine, monkeypatch)
    params = SamplingParams(temperature=1.0, max_new_tokens=60)
    prompt = PROMPTS[1]
    engine.add_request(Request("first", prompt, params))
    for step in range(12):
        if step in (3, 8):
            engine.add_request(Request(f"sibling-{step}", prompt, params))
        engine.step(None if step < 6 else CHAIN)
    engine.add_request(Request("late", prompt, params))
    for sd in [None, None, TREE, CHAIN, CHAIN]:
        engine.step(sd)
    slots = sorted(engine.slots.running)
    assert len(slots) == 4 and counts == [1]
    assert min(assert_drafter_cache_is_a_fresh_pass(engine, target, drafter, slots)) >= len(prompt) - 1
