"""Exactness of the acceptance rules on synthetic Markov targets, without any model.

The target and the drafter are first-order Markov chains over V tokens (a table of next-token
logits per previous token), so the law of the first three emitted tokens under plain sampling
is known in closed form: p(x0 | s) p(x1 | x0) p(x2 | x1). Each test runs many independent
sequences through repeated draft / verify / accept rounds, fully batched, and compares the
observed triples with that law by a chi-square test (cells with expected count < 5 pooled;
a sample in a zero-probability cell fails outright).

False alarms: each chi-square check uses alpha = 1e-4, and this file runs 10 of them that must
pass, so the chance that a correct implementation fails any of them is < 1e-3 (Bonferroni).
The checks that must FAIL (wrong rules) are required to reach p < 1e-6; with the sample sizes
used their true p-values are astronomically smaller. Seeds are fixed, so the outcome is
deterministic anyway; the bounds say how unlucky a seed would have to be.
"""

import pytest
import torch

from respec_async.engine.sampling import sample, sampling_logprobs
from respec_async.engine.speculative import (
    RelaxedAcceptance, chain_accept, select_tree, tree_accept, tree_attention_mask)

V = 5
NUM_TOKENS = 3
START = 0
ALPHA = 1e-4


def chi_square_pvalue(observed: torch.Tensor, expected_probs: torch.Tensor) -> float:
    num = observed.sum()
    if observed[expected_probs == 0].sum() > 0:
        return 0.0
    expected = expected_probs * num
    big = expected >= 5
    obs = torch.cat([observed[big], observed[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    stat = ((obs - exp) ** 2 / exp).sum()
    dof = obs.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), stat / 2))


def markov_tables(seed: int, temperature: float, top_p: float):
    generator = torch.Generator().manual_seed(seed)
    target_logits = torch.randn(V, V, generator=generator) * 1.5
    draft_logits = target_logits + torch.randn(V, V, generator=generator)  # a decent, imperfect drafter
    target = sampling_logprobs(target_logits, temperature, top_p).double()
    draft = sampling_logprobs(draft_logits, temperature, top_p)
    return target, draft, torch.log_softmax(draft_logits, dim=-1)


def triple_law(target: torch.Tensor) -> torch.Tensor:
    p = target.exp()
    return (p[START][:, None, None] * p[:, :, None] * p[None, :, :]).reshape(-1)


def record(out, count, emitted, num_emitted):
    for i in range(emitted.shape[1]):
        valid = (i < num_emitted) & (count + i < NUM_TOKENS)
        rows = valid.nonzero()[:, 0]
        out[rows, (count + i)[rows]] = emitted[rows, i]
    return count + num_emitted


def run_chain(target, draft, num_seqs, num_drafts, generator, accept=chain_accept, relaxed=None):
    last = torch.full((num_seqs,), START)
    out = torch.full((num_seqs, NUM_TOKENS), -1)
    count = torch.zeros(num_seqs, dtype=torch.long)
    while bool((count < NUM_TOKENS).any()):
        drafts, draft_logprobs, state = [], [], last
        for _ in range(num_drafts):
            draft_logprobs.append(draft[state])
            state = sample(draft[state], generator)
            drafts.append(state)
        drafts = torch.stack(drafts, 1)
        states = torch.cat([last[:, None], drafts], 1)
        target_logprobs = target.float()[states]
        if relaxed is None:
            num_accepted, next_tokens = accept(drafts, torch.stack(draft_logprobs, 1), target_logprobs, generator)
        else:
            num_accepted, next_tokens = accept(drafts, torch.stack(draft_logprobs, 1), target_logprobs,
                                               generator, relaxed)
        emitted = torch.cat([drafts, next_tokens[:, None]], 1)
        emitted[torch.arange(num_seqs), num_accepted] = next_tokens
        count = record(out, count, emitted, num_accepted + 1)
        last = next_tokens
    return out


def draft_tree(last, draft_scores, num_steps, top_k, num_draft_tokens):
    """EAGLE tree expansion against the drafter table: top-t children of the top-t frontier."""
    values, tokens = draft_scores[last].topk(top_k, dim=-1)
    cand_tokens, cand_parents, cand_depths, cand_scores = [tokens], [torch.full_like(tokens, -1)], \
        [torch.ones_like(tokens)], [values]
    frontier = torch.arange(top_k).expand(last.shape[0], -1)
    frontier_tokens, frontier_scores, num_candidates = tokens, values, top_k
    for step in range(1, num_steps):
        child_scores, child_tokens = draft_scores[frontier_tokens].topk(top_k, dim=-1)  # [B, t, t]
        cum = (frontier_scores[:, :, None] + child_scores).flatten(1)
        cand_tokens.append(child_tokens.flatten(1))
        cand_parents.append(frontier[:, :, None].expand(-1, -1, top_k).flatten(1))
        cand_depths.append(torch.full_like(cum, step + 1, dtype=torch.long))
        cand_scores.append(cum)
        best = cum.topk(top_k, dim=-1).indices
        frontier = num_candidates + best
        frontier_tokens, frontier_scores = child_tokens.flatten(1).gather(1, best), cum.gather(1, best)
        num_candidates += top_k * top_k
    return select_tree(last, torch.cat(cand_tokens, 1), torch.cat(cand_parents, 1), torch.cat(cand_depths, 1),
                       torch.cat(cand_scores, 1), num_draft_tokens)


def run_tree(target, draft_scores, num_seqs, num_steps, top_k, num_draft_tokens, generator, relaxed=None):
    last = torch.full((num_seqs,), START)
    out = torch.full((num_seqs, NUM_TOKENS), -1)
    count = torch.zeros(num_seqs, dtype=torch.long)
    while bool((count < NUM_TOKENS).any()):
        tree = draft_tree(last, draft_scores, num_steps, top_k, num_draft_tokens)
        path, num_accepted, next_tokens = tree_accept(tree, target.float()[tree.tokens], generator, relaxed)
        emitted = torch.cat([tree.tokens.gather(1, path[:, 1:].clamp(min=0)), next_tokens[:, None]], 1)
        emitted[torch.arange(num_seqs), num_accepted] = next_tokens
        count = record(out, count, emitted, num_accepted + 1)
        last = next_tokens
    return out


def triple_counts(out):
    index = out[:, 0] * V * V + out[:, 1] * V + out[:, 2]
    return torch.bincount(index, minlength=V ** 3).double()


CASES = [(1.0, 1.0), (0.7, 1.0), (1.0, 0.8), (0.7, 0.9)]


@pytest.mark.parametrize("temperature,top_p", CASES)
def test_chain_emits_the_target_distribution(temperature, top_p):
    target, draft, _ = markov_tables(1, temperature, top_p)
    generator = torch.Generator().manual_seed(2)
    out = run_chain(target, draft, 40_000, 3, generator)
    assert chi_square_pvalue(triple_counts(out), triple_law(target)) > ALPHA


@pytest.mark.parametrize("temperature,top_p", CASES)
def test_tree_emits_the_target_distribution(temperature, top_p):
    target, _, draft_scores = markov_tables(3, temperature, top_p)
    generator = torch.Generator().manual_seed(4)
    out = run_tree(target, draft_scores, 40_000, 3, 3, 6, generator)
    assert chi_square_pvalue(triple_counts(out), triple_law(target)) > ALPHA


def test_relaxed_with_unit_thresholds_is_exact():
    target, draft, draft_scores = markov_tables(5, 1.0, 1.0)
    generator = torch.Generator().manual_seed(6)
    exact = RelaxedAcceptance(1.0, 1.0)
    out = run_tree(target, draft_scores, 40_000, 2, 2, 4, generator, exact)
    assert chi_square_pvalue(triple_counts(out), triple_law(target)) > ALPHA
    out = run_chain(target, draft, 40_000, 2, generator, relaxed=exact)
    assert chi_square_pvalue(triple_counts(out), triple_law(target)) > ALPHA


def test_the_statistic_detects_an_always_accept_rule():
    target, draft, _ = markov_tables(1, 1.0, 1.0)
    generator = torch.Generator().manual_seed(2)

    def always_accept(drafts, draft_logprobs, target_logprobs, generator):
        num_seqs, k = drafts.shape
        return torch.full((num_seqs,), k), sample(target_logprobs[:, k], generator)

    out = run_chain(target, draft, 40_000, 3, generator, accept=always_accept)
    assert chi_square_pvalue(triple_counts(out), triple_law(target)) < 1e-6


def test_the_statistic_detects_relaxed_acceptance():
    target, draft, draft_scores = markov_tables(3, 1.0, 1.0)
    generator = torch.Generator().manual_seed(4)
    lossy = RelaxedAcceptance(threshold_single=0.3, threshold_acc=0.5)
    out = run_tree(target, draft_scores, 40_000, 3, 3, 6, generator, lossy)
    assert chi_square_pvalue(triple_counts(out), triple_law(target)) < 1e-6
    out = run_chain(target, draft, 40_000, 3, generator, relaxed=lossy)
    assert chi_square_pvalue(triple_counts(out), triple_law(target)) < 1e-6


def test_greedy_chain_and_tree_follow_the_argmax_chain():
    target, draft, draft_scores = markov_tables(7, 0.0, 1.0)
    generator = torch.Generator().manual_seed(0)
    expected = [START]
    for _ in range(NUM_TOKENS):
        expected.append(int(target[expected[-1]].argmax()))
    expected = torch.tensor(expected[1:])
    assert torch.equal(run_chain(target, draft, 8, 3, generator), expected.expand(8, -1))
    assert torch.equal(run_tree(target, draft_scores, 8, 3, 3, 6, generator), expected.expand(8, -1))


def test_chain_counts_accepted_drafts_per_sequence():
    target_logprobs = torch.log_softmax(torch.randn(3, 4, V), -1)
    drafts = target_logprobs[:, :3].argmax(-1)
    # the drafter proposed exactly the target's point masses for rows 0 and 1; row 2 proposes an
    # impossible first token
    point = torch.full((3, 3, V), float("-inf")).scatter(2, drafts[:, :, None], 0.0)
    target = point.clone()
    target[2, 0] = torch.full((V,), float("-inf")).scatter(0, (drafts[2, 0] + 1) % V, 0.0)
    target = torch.cat([target, target_logprobs[:, 3:]], 1)
    num_accepted, next_tokens = chain_accept(drafts, point, target, torch.Generator().manual_seed(0))
    assert num_accepted.tolist() == [3, 3, 0]
    assert int(next_tokens[2]) == int((drafts[2, 0] + 1) % V)


def test_select_tree_keeps_best_nodes_closed_under_ancestors():
    # candidates: 0,1 children of root; 2,3 children of 0; 4 child of 3
    tokens = torch.tensor([[10, 11, 12, 13, 14]])
    parents = torch.tensor([[-1, -1, 0, 0, 3]])
    depths = torch.tensor([[1, 1, 2, 2, 3]])
    scores = torch.tensor([[-0.1, -3.0, -2.0, -0.5, -0.5]])  # 4 ties with its parent 3
    tree = select_tree(torch.tensor([9]), tokens, parents, depths, scores, num_draft_tokens=3)
    assert tree.tokens.tolist() == [[9, 10, 13, 14]]
    assert tree.parents.tolist() == [[-1, 0, 1, 2]]
    assert tree.depths.tolist() == [[0, 1, 2, 3]]
    assert tree.ancestors[0, 3].tolist() == [True, True, True, True]
    assert tree.ancestors[0, 1].tolist() == [True, True, False, False]
    mask = tree_attention_mask(tree, torch.tensor([2]), cache_len=8)
    assert mask[0, 2].tolist() == [True, True, True, True, True, False, False, False]
    assert mask[0, 0].tolist() == [True, True, True, False, False, False, False, False]
