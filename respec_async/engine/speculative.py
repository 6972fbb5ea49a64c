"""Acceptance rules of speculative decoding: chain rejection sampling and tree verification.

Pure tensor math, batched over sequences, no model calls: the engine drafts, runs the target
once over the draft, and hands the distributions here. Every rule is exact — the emitted
tokens are distributed as plain sampling from the target's `sampling_logprobs` — unless a
`RelaxedAcceptance` with thresholds below 1 is passed explicitly.

Chain (top_k t = 1): drafts d_1..d_k sampled from the drafter's transformed distribution q.

    accept d_i with probability min(1, p_i(d_i) / q_i(d_i)), stop at the first rejection;
    on a rejection at i, emit a token from  norm(max(p_i - q_i, 0))     (the residual);
    if all k are accepted, emit a bonus token from p_{k+1}.

Tree (t > 1, EAGLE): the children of a node are the drafter's deterministic top-t picks, i.e.
point-mass proposals. Verifying point-mass proposals c_1..c_m one after another against the
residual target (accept c_j with probability p'(c_j); on rejection p'(c_j) := 0, renormalise)
accepts c_j with overall probability exactly p(c_j), and, if every child is rejected, emits a
token from p restricted to the non-children. That is inverse-CDF sampling from p with the
children listed first, so it is computed with one uniform per node:

    C_j = sum_{j' <= j} p(c_j')        accept the first child with u < C_j
    if none: emit from p with the children's tokens removed (renormalised)

then the walk descends into the accepted child and repeats with that child's target
distribution, until a node rejects all of its children or is a leaf (then the emitted token is
a plain sample from p: the bonus token).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from respec_async.engine.sampling import sample_probs, token_logprobs


@dataclass(frozen=True)
class RelaxedAcceptance:
    """Lossy acceptance, as SGLang's `threshold_single` / `threshold_acc`. NOT exact.

    A draft token is also accepted when its target probability is >= threshold_single, and the
    acceptance coin is compared against (accepted mass) / threshold_acc instead of the mass
    itself. With both thresholds at 1.0 this is the exact rule; below 1.0 the emitted tokens
    are no longer distributed as the target (more drafts pass), which is what ReSpec uses to
    show drafter-induced policy degradation. Behaviour log-probs stay the target's, so the
    trainer's off-policy correction does not see the bias.
    """

    threshold_single: float = 1.0
    threshold_acc: float = 1.0

    def __post_init__(self) -> None:
        if not (0 < self.threshold_single <= 1 and 0 < self.threshold_acc <= 1):
            raise ValueError(f"relaxed thresholds must lie in (0, 1], got {self}")


def chain_accept(draft_tokens: torch.Tensor, draft_logprobs: torch.Tensor, target_logprobs: torch.Tensor,
                 generator: torch.Generator | None = None, relaxed: RelaxedAcceptance | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rejection sampling of a batch of chain drafts.

    draft_tokens [B, k]: d_i ~ q_i. draft_logprobs [B, k, V]: log q_i (the distribution d_i was
    sampled from). target_logprobs [B, k+1, V]: log p_i for the k draft positions and the bonus.
    Returns num_accepted [B] (0..k) and next_tokens [B], the residual or bonus token that
    follows the accepted drafts.
    """
    batch_size, num_drafts = draft_tokens.shape
    p_draft = token_logprobs(target_logprobs[:, :num_drafts], draft_tokens).exp()
    q_draft = token_logprobs(draft_logprobs, draft_tokens).exp()
    # u < p/q, written as u*q < p so that p = 0 is never accepted and q = 0 needs no division.
    coins = torch.rand(p_draft.shape, generator=generator, device=p_draft.device)
    threshold_acc = 1.0 if relaxed is None else relaxed.threshold_acc
    accepted = coins * q_draft * threshold_acc < p_draft
    if relaxed is not None:
        accepted |= p_draft >= relaxed.threshold_single
    num_accepted = accepted.long().cumprod(-1).sum(-1)

    # The token after the accepted prefix comes from norm(max(p - q, 0)) at the first rejected
    # position, or from p at the bonus position; q = 0 there makes both one formula.
    rows = torch.arange(batch_size, device=draft_tokens.device)
    p_next = target_logprobs[rows, num_accepted].exp()
    q_padded = torch.cat([draft_logprobs.exp(), torch.zeros_like(p_next[:, None])], dim=1)
    residual = (p_next - q_padded[rows, num_accepted]).clamp(min=0.0)
    # p == q up to rounding leaves no residual mass; the rejection itself then had probability ~0.
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_next)
    return num_accepted, sample_probs(residual, generator)


def point_chain_accept(draft_tokens: torch.Tensor, num_drafts: torch.Tensor, target_logprobs: torch.Tensor,
                       generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Verification of deterministic chains (a history draft: q is a point mass on each draft).

    draft_tokens [B, k], of which the first num_drafts [B] are drafts (the rest padding, never
    accepted); target_logprobs [B, k+1, V]. Accept d_i with probability p_i(d_i) (min(1, p/q)
    with q = 1); on a rejection emit from p_i with d_i removed (norm(max(p - q, 0)) for a point
    mass q), after the last draft from p. The tree rule with one child per node, in chain form.
    Returns num_accepted [B] and next_tokens [B].
    """
    batch_size, k = draft_tokens.shape
    device = draft_tokens.device
    # exp of the entries used only (p at each draft, then one row per sequence), not of [B, k+1, V].
    p_draft = target_logprobs[:, :k].gather(-1, draft_tokens[:, :, None])[:, :, 0].exp()
    coins = torch.rand(p_draft.shape, generator=generator, device=device)
    accepted = (coins < p_draft) & (torch.arange(k, device=device) < num_drafts[:, None])
    num_accepted = accepted.long().cumprod(-1).sum(-1)
    rows = torch.arange(batch_size, device=device)
    p_next = target_logprobs[rows, num_accepted].exp()
    rejected = draft_tokens[rows, num_accepted.clamp(max=k - 1)]
    residual = p_next.scatter(-1, rejected[:, None], torch.where(
        num_accepted < num_drafts, 0.0, p_next.gather(-1, rejected[:, None])[:, 0])[:, None])
    # A draft holding all of p's mass was accepted unless the coin hit p = 1 - rounding.
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_next)
    return num_accepted, sample_probs(residual, generator)


@dataclass
class DraftTree:
    """A batch of draft trees in topological order; node 0 of every tree is the root (the last
    emitted token, not yet in the target's cache), nodes 1..n are drafts."""

    tokens: torch.Tensor  # [B, n+1] target token ids
    parents: torch.Tensor  # [B, n+1] index of the parent node; -1 for the root
    depths: torch.Tensor  # [B, n+1] root = 0
    ancestors: torch.Tensor  # [B, n+1, n+1] bool: ancestors[b, i, j] = j is i or an ancestor of i


def select_tree(root_tokens: torch.Tensor, node_tokens: torch.Tensor, node_parents: torch.Tensor,
                node_depths: torch.Tensor, node_scores: torch.Tensor, num_draft_tokens: int) -> DraftTree:
    """Keep the `num_draft_tokens` best candidates by cumulative draft log-prob (EAGLE-2).

    node_* [B, N]: every candidate drafted, in creation order (a parent is created before its
    children); node_parents index into the candidates, -1 for children of the root. A child's
    score never exceeds its parent's (log q <= 0) and the sort is stable in creation order, so
    the kept set is closed under ancestors: it is a tree.
    """
    batch_size, num_candidates = node_tokens.shape
    n = num_draft_tokens
    device = node_tokens.device
    order = node_scores.sort(dim=-1, descending=True, stable=True).indices[:, :n]
    kept = order.sort(dim=-1).values  # creation order = topological order

    # Renumber: candidate index -> tree node index (1..n; the root is 0).
    node_of = torch.zeros(batch_size, num_candidates + 1, dtype=torch.long, device=device)
    node_of[:, 1:].scatter_(1, kept, torch.arange(1, n + 1, device=device).expand(batch_size, n))
    parents = node_of.gather(1, node_parents.gather(1, kept) + 1)  # candidate -1 -> root 0

    root_parent = torch.full((batch_size, 1), -1, dtype=torch.long, device=device)
    parents = torch.cat([root_parent, parents], dim=1)
    tokens = torch.cat([root_tokens[:, None], node_tokens.gather(1, kept)], dim=1)
    depths = torch.cat([torch.zeros_like(root_parent), node_depths.gather(1, kept)], dim=1)

    # ancestors(i) = {i} | ancestors(parent(i)); depth(i) rounds of the recurrence settle it.
    eye = torch.eye(n + 1, dtype=torch.bool, device=device).expand(batch_size, n + 1, n + 1)
    ancestors = eye.clone()
    parent_rows = parents.clamp(min=0)[:, :, None].expand(-1, -1, n + 1)
    for _ in range(int(depths.max())):
        ancestors = eye | (ancestors.gather(1, parent_rows) & (parents >= 0)[:, :, None])
    return DraftTree(tokens, parents, depths, ancestors)


def tree_attention_mask(tree: DraftTree, prefix_lengths: torch.Tensor, cache_len: int) -> torch.Tensor:
    """Bool [B, n+1, cache_len] for verifying a tree written at cache indices L..L+n: every node
    sees the prefix [0, L) and its own ancestors (itself included)."""
    batch_size, num_nodes = tree.tokens.shape
    device = tree.tokens.device
    columns = torch.arange(cache_len, device=device)
    mask = (columns < prefix_lengths[:, None]).unsqueeze(1).expand(batch_size, num_nodes, cache_len).clone()
    tree_columns = (prefix_lengths[:, None] + torch.arange(num_nodes, device=device))[:, None, :]
    mask.scatter_(2, tree_columns.expand(-1, num_nodes, -1), tree.ancestors)
    return mask


def tree_accept(tree: DraftTree, target_logprobs: torch.Tensor, generator: torch.Generator | None = None,
                relaxed: RelaxedAcceptance | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Walk a batch of verified draft trees (rule in the module docstring).

    target_logprobs [B, n+1, V]: the target's sampling distribution at every tree node.
    Returns path [B, D+1] (node indices from the root, -1 past the last accepted node; D is the
    tree's depth), num_accepted [B] (drafts accepted = path length - 1) and next_tokens [B]
    (the token emitted after the accepted drafts).
    """
    batch_size, num_nodes = tree.tokens.shape
    device = tree.tokens.device
    nodes = torch.arange(num_nodes, device=device)
    probs = target_logprobs.exp()

    # children[b, i, j]: node j is a child of node i; p_child: p_i(token_j) on those entries.
    children = tree.parents[:, None, :] == nodes[None, :, None]
    p_child = probs.gather(2, tree.tokens[:, None, :].expand(-1, num_nodes, -1)) * children
    mass = p_child.cumsum(-1)  # C_j: children in node order
    coins = torch.rand(batch_size, num_nodes, 1, generator=generator, device=device)
    threshold_acc = 1.0 if relaxed is None else relaxed.threshold_acc
    accept = children & (coins * threshold_acc < mass)
    if relaxed is not None:
        accept |= children & (p_child >= relaxed.threshold_single)

    # Emitted when every child is rejected: p with the children's tokens removed.
    is_child_token = torch.zeros(probs.shape, dtype=torch.long, device=device).scatter_add(
        2, tree.tokens[:, None, :].expand(-1, num_nodes, -1), children.long()) > 0
    residual = probs.masked_fill(is_child_token, 0.0)
    # Children covering the whole support leave no residual; u < C_m = 1 - rounding then failed
    # only by rounding, so the last child takes it.
    empty = residual.sum(-1) <= 0
    last_child = children & (children.long().cumsum(-1) == children.sum(-1, keepdim=True))
    accept |= last_child & empty[:, :, None]
    residual_tokens = sample_probs(residual, generator)

    has_next = accept.any(-1)
    next_node = torch.where(has_next, accept.long().argmax(-1), -1)  # first accepted child
    depth = int(tree.depths.max())
    path = torch.full((batch_size, depth + 1), -1, dtype=torch.long, device=device)
    path[:, 0] = 0
    for d in range(depth):
        current = path[:, d]
        path[:, d + 1] = torch.where(current >= 0, next_node.gather(1, current.clamp(min=0)[:, None])[:, 0], -1)
    num_accepted = (path >= 0).sum(-1) - 1
    last = path.gather(1, num_accepted[:, None])[:, 0]
    return path, num_accepted, residual_tokens.gather(1, last[:, None])[:, 0]
