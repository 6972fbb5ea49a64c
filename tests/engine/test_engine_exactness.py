"""Statistical exactness of the engine: speculative decoding samples the target's distribution.

A tiny random target (vocabulary 8, 2 layers) and a random drafter. Many requests share one
prompt; the law of their first three output tokens under plain sampling is computed exactly
from full forwards (8^2 prefixes) and compared with the engine's samples by a chi-square test
(cells with expected count < 5 pooled; any sample in a zero-probability cell fails).

False alarms: every check that must pass uses alpha = 1e-4; this file has 14 of them, so a
correct engine fails the file with probability < 1.4e-3 (Bonferroni). The checks that must fail
(relaxed acceptance, which is not exact, and a chain rule with the classic bug of resampling a
rejection from p instead of norm(max(p - q, 0))) require p < 1e-6; at this sample size their
p-values come out below 1e-30. Seeds are fixed, so the outcome is deterministic.
"""

import pytest
import torch

from respec_async.engine.drafter import Eagle3Drafter
from respec_async.engine.engine import Engine
from respec_async.engine.requests import Request, SDConfig
from respec_async.engine import engine as engine_module
from respec_async.engine import fused
from respec_async.engine.sampling import SamplingParams, sample, sampling_logprobs, token_logprobs
from respec_async.engine.speculative import RelaxedAcceptance
from tests.engine.test_engine import tiny_models
from tests.engine.test_speculative import chi_square_pvalue

torch.set_num_threads(1)
V = 8
PROMPT = [1, 2, 3]
NUM_SAMPLES = 2000
ALPHA = 1e-4


@pytest.fixture(scope="module")
def models():
    return tiny_models(seed=3, vocab_size=V)


def exact_law(target, params: SamplingParams) -> torch.Tensor:
    """P(x0, x1, x2 | PROMPT) under plain sampling, flattened to V^3 cells."""
    prefixes = torch.cartesian_prod(torch.arange(V), torch.arange(V))
    ids = torch.cat([torch.tensor(PROMPT).expand(V * V, -1), prefixes], 1)
    with torch.no_grad(), fused.module_path(target):  # the reference: the module path, not the engine's
        logits = target(ids).logits[:, len(PROMPT) - 1:]
    p = sampling_logprobs(logits, params.temperature, params.top_p, params.top_k).double().exp()
    p0 = p[0, 0]  # [x0]
    p1 = p.view(V, V, 3, V)[:, 0, 1]  # [x0, x1]
    p2 = p.view(V, V, 3, V)[:, :, 2]  # [x0, x1, x2]
    return (p0[:, None, None] * p1[:, :, None] * p2).reshape(-1)


def sample_triples(target, drafter, params, policy, relaxed=None, seed=0, lazy_drafter=None):
    engine = Engine(target, drafter, max_batch_size=128, max_seq_len=32, seed=seed, relaxed=relaxed,
                    lazy_drafter=lazy_drafter)
    completions = engine.generate([Request(i, PROMPT, params) for i in range(NUM_SAMPLES)], policy)
    out = torch.tensor([c.output_ids for c in completions])
    return torch.bincount(out[:, 0] * V * V + out[:, 1] * V + out[:, 2], minlength=V ** 3).double(), completions


PARAMS = [SamplingParams(temperature=1.0, max_new_tokens=3),
          SamplingParams(temperature=0.7, max_new_tokens=3),
          SamplingParams(temperature=1.0, top_p=0.8, max_new_tokens=3),
          SamplingParams(temperature=0.7, top_p=0.9, top_k=5, max_new_tokens=3)]
SD = [SDConfig(3, 1, 3), SDConfig(3, 3, 7)]


@pytest.mark.parametrize("params", PARAMS, ids=lambda p: f"T{p.temperature}-p{p.top_p}-k{p.top_k}")
@pytest.mark.parametrize("sd", SD, ids=str)
def test_speculative_samples_match_the_target(models, sd, params):
    target, drafter = models
    counts, completions = sample_triples(target, drafter, params, sd, seed=PARAMS.index(params) + 10 * SD.index(sd))
    assert chi_square_pvalue(counts, exact_law(target, params)) > ALPHA
    assert sum(c.num_accepted for c in completions) > NUM_SAMPLES // 4  # drafts really were accepted


def test_plain_sampling_matches_the_target(models):
    target, drafter = models
    counts, _ = sample_triples(target, drafter, PARAMS[2], None, seed=11)
    assert chi_square_pvalue(counts, exact_law(target, PARAMS[2])) > ALPHA


@pytest.mark.parametrize("lazy", [True, False], ids=["lazy-drafter", "eager-drafter"])
def test_switching_mode_every_step_matches_the_target(models, lazy):
    target, drafter = models
    schedule = iter(range(10 ** 6))
    configs = [None, SD[1], SD[0], SDConfig(2, 2, 3)]
    counts, _ = sample_triples(target, drafter, PARAMS[3], lambda batch: configs[next(schedule) % 4], seed=12,
                               lazy_drafter=lazy)
    assert chi_square_pvalue(counts, exact_law(target, PARAMS[3])) > ALPHA


def test_relaxed_acceptance_is_detected(models):
    target, drafter = models
    lossy = RelaxedAcceptance(threshold_single=0.3, threshold_acc=0.3)
    for sd in SD:
        counts, _ = sample_triples(target, drafter, PARAMS[0], sd, relaxed=lossy, seed=13)
        assert chi_square_pvalue(counts, exact_law(target, PARAMS[0])) < 1e-6


@pytest.mark.parametrize("sd", SD, ids=str)
def test_reduced_draft_vocabulary_matches_the_target(models, sd):
    target, _ = models
    torch.manual_seed(21)
    drafter = Eagle3Drafter.from_target(target, draft_vocab_ids=torch.tensor([0, 1, 3, 4, 6]))
    for param in drafter.parameters():
        if param.dim() > 1:
            torch.nn.init.normal_(param, std=0.4)
    counts, _ = sample_triples(target, drafter, PARAMS[2], sd, seed=20 + SD.index(sd))
    assert chi_square_pvalue(counts, exact_law(target, PARAMS[2])) > ALPHA


def test_a_wrong_residual_is_detected(models, monkeypatch):
    target, drafter = models

    def resample_rejections_from_p(drafts, draft_logprobs, target_logprobs, generator=None, relaxed=None):
        num_drafts = drafts.shape[1]
        p_draft = token_logprobs(target_logprobs[:, :num_drafts], drafts).exp()
        q_draft = token_logprobs(draft_logprobs, drafts).exp()
        accepted = torch.rand(p_draft.shape, generator=generator) * q_draft < p_draft
        num_accepted = accepted.long().cumprod(-1).sum(-1)
        return num_accepted, sample(target_logprobs[torch.arange(len(drafts)), num_accepted], generator)

    monkeypatch.setattr(engine_module, "chain_accept", resample_rejections_from_p)
    counts, _ = sample_triples(target, drafter, PARAMS[2], SD[0], seed=14)
    assert chi_square_pvalue(counts, exact_law(target, PARAMS[2])) < 1e-6
