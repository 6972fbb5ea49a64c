"""Rollout-history drafter: drafts from earlier token sequences of the same prompt, no model call.

RL samples every prompt G times per step and again every epoch, so the likeliest continuation
of a row is often already written down: in a sibling rollout of its group that is further
ahead, in a finished rollout of the same prompt from an earlier step, or in the prompt itself.
A `HistoryIndex` keeps those sequences per prompt and drafts from them:

    index = HistoryIndex(max_bytes=64 * 2**20)
    cursor = index.open(prompt_ids)                      # a row starts (its prompt is its context)
    index.extend(cursor, [t1, t2])                       # the row emitted tokens
    chains, num_drafted = index.draft_chains([cursor, ...], 8)   # a chain of <= 8 drafts per row
    trees = index.draft([cursor, ...], 8, 2, 12)         # or trees: depth 8, <= 2 children, 12 nodes
    index.close(cursor)                                  # the row finished: it is history now

Layout, per prompt (a `_Group`): the prompt as one document, and every rollout (prompt +
completion, live or finished) as another. One hash table maps each `match_depth`-gram and each
`min_match`-gram to the positions that follow it, as ints `doc_id << 20 | position` in an
`array('q')`. A row's `Cursor` holds its own document and its *sources*: positions in other
documents (or earlier in its own) whose preceding tokens equal the end of the row's context.
Emitting tokens advances every source that predicted them and drops the rest; when none is
left, the next draft finds new ones through the table: the newest `max_sources` usable
positions of the long key, or of the short key if the long one has none.

A chain is the *leader*'s continuation: the best-ranked source that has a next token, chosen
when the sources change and kept while it predicts the row. A tree is the trie of the
sources' continuations, each node counted by the sources through it; the `num_draft_tokens`
most counted nodes are kept (at most `top_k` children a node), which is closed under ancestors
because a child never counts more than its parent.

The drafts are deterministic (point-mass) proposals, verified exactly by the engine
(`speculative.point_chain_accept` for chains, `tree_accept` for trees): emitted tokens are
distributed as the target's sampling distribution whatever the history holds; history only
moves acceptance. A past rollout stays a valid draft whatever the policy's weights.

In a run each generator keeps its own index of the rollouts it sampled: a group's samples all
go to one generator, so siblings are always there; a prompt's earlier epochs are there when
they went to the same generator (with N generators, about 1 in N). A restarted generator
starts empty.

Memory: `num_bytes` is an upper bound on what the index holds (checked against tracemalloc in
the tests), kept under `max_bytes` by evicting finished rollouts, least recently used prompt
first, and at most `max_rollouts_per_prompt` per prompt; live rows are never evicted. Table
entries of evicted documents are dropped lazily: a prompt's table is rebuilt once half of its
entries are dead.
"""

from __future__ import annotations

from array import array
from collections import Counter, OrderedDict
from dataclasses import dataclass
from functools import lru_cache

import torch

_POSITION_BITS = 20
_POSITION_MASK = (1 << _POSITION_BITS) - 1
# Upper bounds on CPython's memory per stored item (tests/engine/test_history.py checks them
# against tracemalloc): a token (a list slot and an int object for ids past the small-int
# cache), a table entry (8 bytes and the array's over-allocation), a distinct key (tuple, dict
# slot, array header), a document, a prompt.
TOKEN_BYTES = 48
ENTRY_BYTES = 12
KEY_BYTES = 320
DOC_BYTES = 200
GROUP_BYTES = 1200


@dataclass
class HistoryDraft:
    """A batch of history draft trees, speculative.DraftTree's fields as flat host buffers."""

    num_nodes: int  # n + 1 per row: the root (the row's last token) and n drafts or padding
    tokens: array  # int64 [B * (n + 1)]
    layout: array  # int64 [B * 2 * (n + 1)]: each row's parents (-1 for the root and for padding
    #                nodes, which are no one's child), then its depths
    ancestors: list[bytes]  # per row (n + 1)^2 bools: [i, j] = j is i or an ancestor of i
    num_drafted: list[int]  # real (non-padding) draft nodes per row


class _Doc:
    __slots__ = ("doc_id", "tokens", "live")

    def __init__(self, doc_id: int, tokens: list[int], live: bool):
        self.doc_id, self.tokens, self.live = doc_id, tokens, live


class _Group:
    __slots__ = ("prompt", "docs", "table", "next_id", "num_live", "num_entries", "num_dead", "num_bytes")

    def __init__(self, prompt: tuple[int, ...]):
        self.prompt = prompt
        self.docs: dict[int, _Doc] = {}
        self.table: dict[tuple[int, ...], array] = {}
        self.next_id = 0
        self.num_live = self.num_entries = self.num_dead = 0
        self.num_bytes = 0


class Cursor:
    """One live row: its document and the positions that currently predict its next token."""

    __slots__ = ("group", "doc", "sources", "leader", "shadow", "shadow_matched", "realigned")

    def __init__(self, group: _Group, doc: _Doc):
        self.group, self.doc = group, doc
        self.sources: list[list] | None = None  # [[doc, position], ...]; None: find them at the next draft
        # The source a chain drafts from: the one whose continuation the most sources shared
        # when it was chosen; kept while it predicts the row's tokens.
        self.leader: list | None = None
        self.shadow: list[int] | tuple | None = None  # a chain drafted but not verified (see shadow_chains)
        self.shadow_matched = 0
        self.realigned = False  # the sources were kept past a substitution (at most one in a row)


class HistoryIndex:
    def __init__(self, *, max_bytes: int = 64 * 2**20, min_match: int = 2, match_depth: int = 5,
                 max_sources: int = 4, max_candidates: int = 16, max_rollouts_per_prompt: int = 64,
                 realign: bool = True):
        if min_match < 1 or match_depth < min_match or max_sources < 1 or max_candidates < 1 \
                or max_rollouts_per_prompt < 1 or max_bytes < 0:
            raise ValueError("HistoryIndex needs 1 <= min_match <= match_depth, max_sources, max_candidates, "
                             "max_rollouts_per_prompt >= 1 and max_bytes >= 0")
        self.max_bytes, self.min_match, self.match_depth = max_bytes, min_match, match_depth
        # Keys of both lengths share one table (tuples of different lengths never collide): a
        # long key's few entries are tried first, the short key's many only if none is usable.
        # Ranking a short key's entries by how far back they match instead (up to match_depth
        # tokens) accepted no more on the zoo task at 1.3x the drafting cost.
        self.orders = (min_match,) if match_depth == min_match else (match_depth, min_match)
        # Entries scanned per key, newest first, for max_sources usable ones.
        self.max_sources, self.max_candidates = max_sources, max_candidates
        self.max_rollouts_per_prompt = max_rollouts_per_prompt
        self.realign = realign
        self.groups: OrderedDict[tuple[int, ...], _Group] = OrderedDict()  # least recently used first
        self.num_bytes = 0
        self.num_evicted_docs = 0
        # Shadow acceptance, per draft position j: how many shadow drafts at j were compared with
        # the row's own token (tests[j]) and how many it matched (hits[j]), until the engine
        # reads them. Counted as each token arrives, not when a chain resolves: a chain of 8
        # resolves over up to 8 steps, and a new epoch's jump in history shows from the first.
        self.shadow_tests: list[int] = []
        self.shadow_hits: list[int] = []
        self._shadow_length = 0

    # ---- documents ------------------------------------------------------------------------

    def open(self, prompt_ids: list[int]) -> Cursor:
        """A row starts: its prompt's group (created with the prompt as its first document)."""
        key = tuple(prompt_ids)
        group = self.groups.get(key)
        if group is None:
            group = self.groups[key] = _Group(key)
            self._charge(group, GROUP_BYTES)
            prompt_doc = self._add_doc(group, list(key), live=False)
            # Positions inside the prompt: a completion that copies part of its prompt.
            self._index(group, prompt_doc, range(self.min_match, len(key)))
        else:
            self.groups.move_to_end(key)
        doc = self._add_doc(group, list(key), live=True)
        group.num_live += 1
        self._index(group, doc, range(len(key), len(key) + 1))
        self._evict()
        return Cursor(group, doc)

    def extend(self, cursor: Cursor, tokens: list[int]) -> None:
        """The row emitted `tokens`: index them and advance its sources."""
        if not tokens:
            return
        doc, group = cursor.doc, cursor.group
        start = len(doc.tokens)
        doc.tokens.extend(tokens)
        self._index(group, doc, range(start + 1, start + len(tokens) + 1))
        self._charge(group, TOKEN_BYTES * len(tokens))
        if cursor.shadow is not None:
            self._score_shadow(cursor, tokens)
        sources = cursor.sources
        if sources:
            m = len(tokens)
            survivors = [source for source in sources if source[0].tokens[source[1]:source[1] + m] == tokens]
            for source in survivors:
                source[1] += m
            if not survivors and self.realign:
                # Every source failed. Where one failed only at the last token (a row whose draft
                # was rejected emits a token the draft did not have there), take the row to have
                # substituted that token and keep following the source past it; the next tokens
                # confirm it or drop it, and a failed one is matched afresh from the table.
                last = m - 1
                survivors = [source for source in sources
                             if source[0].tokens[source[1]:source[1] + last] == tokens[:last]
                             and len(source[0].tokens) > source[1] + m]
                for source in survivors:
                    source[1] += m
                if survivors and not cursor.realigned:
                    cursor.sources, cursor.leader, cursor.realigned = survivors, None, True
                    survivors = None
                else:
                    survivors = []
            else:
                cursor.realigned = False
            if survivors is not None and len(survivors) < len(sources):
                cursor.sources = survivors or None
                leader = cursor.leader
                if leader is not None and not any(source is leader for source in survivors):
                    cursor.leader = None  # a leader that keeps predicting stays
        else:
            cursor.sources = None
        if self.num_bytes > self.max_bytes:
            self._evict()

    def shadow_chains(self, cursors: list[Cursor], length: int) -> int:
        """Draft a chain for each row that has none pending, without verifying it: the row's
        next tokens (sampled by plain or speculative steps) say how many of its drafts a
        history step would have accepted. A point-mass draft d is accepted with probability
        p(d), the chance that a sample from p is d, so the count is an unbiased sample of a
        chain's acceptance at no forward's cost. Results go to shadow_tests / shadow_hits;
        returns the number of shadows started."""
        started = 0
        self._shadow_length = length
        for cursor in cursors:
            if cursor.shadow is not None:
                continue
            chain = self._chain(cursor, length)
            if not chain:  # no draft: a miss at the first position
                self._record_shadow(0, hit=False)
                continue
            cursor.shadow, cursor.shadow_matched = chain, 0
            started += 1
        return started

    def take_shadow_counts(self) -> tuple[list[int], list[int]]:
        """(tests, hits) per draft position since the last call."""
        counts = self.shadow_tests, self.shadow_hits
        self.shadow_tests, self.shadow_hits = [], []
        return counts

    def _score_shadow(self, cursor: Cursor, tokens: list[int]) -> None:
        shadow, matched = cursor.shadow, cursor.shadow_matched
        for token in tokens:
            hit = shadow[matched] == token
            self._record_shadow(matched, hit)
            if not hit:
                break
            matched += 1
            if matched == len(shadow):
                if matched < self._shadow_length:  # a history step would draft no further
                    self._record_shadow(matched, hit=False)
                break
        else:
            cursor.shadow_matched = matched
            return
        cursor.shadow = None

    def _record_shadow(self, position: int, hit: bool) -> None:
        tests, hits = self.shadow_tests, self.shadow_hits
        while len(tests) <= position:
            tests.append(0)
            hits.append(0)
        tests[position] += 1
        hits[position] += hit

    def close(self, cursor: Cursor) -> None:
        """The row finished: its document stays as a rollout of its prompt."""
        group = cursor.group
        if not cursor.doc.live:
            return
        cursor.doc.live = False
        cursor.sources = cursor.leader = None
        cursor.shadow = None  # ended inside its shadow: the positions it reached were counted
        group.num_live -= 1
        finished = [d for d in group.docs.values() if not d.live and d.doc_id != 0]
        for doc in finished[:max(0, len(finished) - self.max_rollouts_per_prompt)]:
            self._drop_doc(group, doc)
        self._evict()

    def _add_doc(self, group: _Group, tokens: list[int], live: bool) -> _Doc:
        doc = _Doc(group.next_id, tokens, live)
        group.next_id += 1
        group.docs[doc.doc_id] = doc
        self._charge(group, DOC_BYTES + TOKEN_BYTES * len(tokens))
        return doc

    def _index(self, group: _Group, doc: _Doc, positions: range) -> None:
        """Table entries for the given positions p of doc: key = the min_match tokens before p."""
        tokens, table = doc.tokens, group.table
        base = doc.doc_id << _POSITION_BITS
        new_keys = num_entries = 0
        for k in self.orders:
            for p in positions:
                if p < k:
                    continue
                key = tuple(tokens[p - k:p])
                entries = table.get(key)
                if entries is None:
                    entries = table[key] = array("q")
                    new_keys += 1
                entries.append(base | p)
                num_entries += 1
        group.num_entries += num_entries
        self._charge(group, KEY_BYTES * new_keys + ENTRY_BYTES * num_entries)

    def _charge(self, group: _Group, num_bytes: int) -> None:
        group.num_bytes += num_bytes
        self.num_bytes += num_bytes

    def _drop_doc(self, group: _Group, doc: _Doc) -> None:
        del group.docs[doc.doc_id]
        group.num_dead += len(doc.tokens) * len(self.orders)  # its entries stay until a rebuild
        self._charge(group, -(DOC_BYTES + TOKEN_BYTES * len(doc.tokens)))
        self.num_evicted_docs += 1
        if group.num_dead * 2 > group.num_entries:
            self._rebuild(group)

    def _rebuild(self, group: _Group) -> None:
        self._charge(group, -KEY_BYTES * len(group.table) - ENTRY_BYTES * group.num_entries)
        group.table, group.num_entries, group.num_dead = {}, 0, 0
        for doc in group.docs.values():
            start = self.min_match if doc.doc_id == 0 else len(group.prompt)
            stop = len(doc.tokens) if doc.doc_id == 0 else len(doc.tokens) + 1
            self._index(group, doc, range(start, stop))

    def _evict(self) -> None:
        """Finished rollouts out, least recently used prompt first, until under max_bytes."""
        if self.num_bytes <= self.max_bytes:
            return
        for key in list(self.groups):
            group = self.groups[key]
            if group.num_live == 0:
                self.num_evicted_docs += len(group.docs) - 1
                self.num_bytes -= group.num_bytes
                del self.groups[key]
            else:
                for doc in [d for d in group.docs.values() if not d.live and d.doc_id != 0]:
                    self._drop_doc(group, doc)
                    if self.num_bytes <= self.max_bytes:
                        return
            if self.num_bytes <= self.max_bytes:
                return

    # ---- matching and drafting ------------------------------------------------------------

    def _match(self, cursor: Cursor) -> None:
        """New sources for the end of the row's context: the newest usable positions after the
        row's last match_depth tokens, else after its last min_match tokens."""
        context, group = cursor.doc.tokens, cursor.group
        length = len(context)
        for k in self.orders:
            entries = group.table.get(tuple(context[length - k:])) if length >= k else None
            if entries:
                # Each live row's end is one entry with nothing after it yet: those do not count.
                sources = _newest_sources(entries, group.docs, cursor.doc, length, self.max_sources,
                                          self.max_candidates + group.num_live)
                if sources:
                    cursor.sources, cursor.leader = sources, None
                    return
        cursor.sources, cursor.leader = [], None

    def draft(self, cursors: list[Cursor], num_steps: int, top_k: int, num_draft_tokens: int) -> HistoryDraft:
        """One draft tree per row, padded to num_draft_tokens with nodes that are no one's child.
        top_k = 1: a chain, the continuation most sources share; top_k > 1: the
        num_draft_tokens most counted nodes of the sources' trie (at most top_k children each)."""
        n = num_draft_tokens
        draft = HistoryDraft(n + 1, array("q"), array("q"), [], [])
        tokens, layouts, ancestors, num_drafted = draft.tokens, draft.layout, draft.ancestors, draft.num_drafted
        length = min(num_steps, n)
        chain_layouts = _chain_layouts(n)
        for cursor in cursors:
            if cursor.sources is None:
                self._match(cursor)
            sources = cursor.sources
            tokens.append(cursor.doc.tokens[-1])  # the root
            if top_k == 1 or len(sources) <= 1:
                chain = self._chain(cursor, length)
                k = len(chain)
                tokens.extend(chain)
                tokens.extend(_ZEROS[:n - k])
                layout, row_ancestors = chain_layouts[k]
                layouts.extend(layout)
                ancestors.append(row_ancestors)
                num_drafted.append(k)
            else:
                draft.num_drafted.append(_trie_tree(sources, num_steps, top_k, n, draft))
        return draft


    def _chain(self, cursor: Cursor, length: int) -> list[int] | tuple:
        if cursor.sources is None:
            self._match(cursor)
        leader = cursor.leader
        if leader is None and cursor.sources:
            leader = cursor.leader = _leader(cursor.sources)
        return leader[0].tokens[leader[1]:leader[1] + length] if leader is not None else ()

    def draft_chains(self, cursors: list[Cursor], length: int) -> tuple[array, list[int]]:
        """One chain per row, its leader's continuation: int64 [B * length] token ids (padded
        with 0) and the number of real drafts per row."""
        # The hot path of a history step: _chain inlined, one flat list filled in place (at
        # B = 64 drafting 3.7-3.9% of a plain step against 4.9-5.3% through _chain, A/B).
        chains = [0] * (len(cursors) * length)
        num_drafted = []
        match, start = self._match, 0
        for cursor in cursors:
            leader = cursor.leader
            if leader is None:
                if cursor.sources is None:
                    match(cursor)
                if cursor.sources:
                    leader = cursor.leader = _leader(cursor.sources)
            if leader is None:
                num_drafted.append(0)
            else:
                p = leader[1]
                chain = leader[0].tokens[p:p + length]
                chains[start:start + len(chain)] = chain
                num_drafted.append(len(chain))
            start += length
        return array("q", chains), num_drafted


def _newest_sources(entries: array, docs: dict, own: _Doc, length: int, max_sources: int, budget: int) -> list[list]:
    """The newest usable positions among a key's entries (newest last), at most budget scanned:
    a source must have a token after it (a live row's end has none yet) and not be the row's
    own end."""
    sources = []
    get_doc = docs.get
    for i in range(len(entries) - 1, max(-1, len(entries) - 1 - budget), -1):
        code = entries[i]
        doc = get_doc(code >> _POSITION_BITS)
        p = code & _POSITION_MASK
        if doc is None or p >= len(doc.tokens) or (doc is own and p >= length):
            continue
        sources.append([doc, p])
        if len(sources) == max_sources:
            break
    return sources


_ZEROS = (0,) * 64


def _layout(parents: list[int], depths: list[int], n: int) -> tuple[array, bytes]:
    """A row's tree padded to n drafts: its parents and depths, and its ancestor matrix."""
    k = len(parents) - 1
    layout = array("q", parents + [-1] * (n - k) + depths + [1] * (n - k))
    ancestors = bytearray((n + 1) * (n + 1))
    for i in range(n + 1):
        j = i
        while j >= 0:
            ancestors[i * (n + 1) + j] = 1
            j = parents[j] if i <= k else -1
    return layout, bytes(ancestors)


@lru_cache(maxsize=64)
def _chain_layouts(n: int) -> list[tuple[array, bytes]]:
    """_layout of a chain of k = 0..n drafts padded to n, indexed by k."""
    return [_layout([-1] + list(range(k)), list(range(k + 1)), n) for k in range(n + 1)]


def _leader(sources: list[list]) -> list:
    """The best-ranked source with a next token (a live sibling level with the row has none
    yet). Voting for the next token most sources predict accepted as much on the zoo task
    (5.60-5.68 against 5.62-5.64 tokens per step, epoch 2) at 1.3x the drafting cost."""
    for source in sources:
        if source[1] < len(source[0].tokens):
            return source
    return sources[0]


def _trie_tree(sources: list[list], num_steps: int, top_k: int, n: int, draft: HistoryDraft) -> int:
    """Append one row's tree (the n most counted trie nodes, <= top_k children each) to draft;
    returns its number of real draft nodes."""
    continuations = Counter(tuple(d.tokens[p:p + num_steps]) for d, p in sources)
    # The trie: creation order is topological.
    trie_tokens, trie_parents, trie_depths, counts = [0], [-1], [0], [0]
    children: dict[tuple[int, int], int] = {}
    for chain, count in continuations.items():
        node = 0
        for token in chain:
            child = children.get((node, token))
            if child is None:
                child = children[node, token] = len(trie_tokens)
                trie_tokens.append(token)
                trie_parents.append(node)
                trie_depths.append(trie_depths[node] + 1)
                counts.append(0)
            counts[child] += count
            node = child
    order = sorted(range(1, len(trie_tokens)), key=lambda i: (-counts[i], trie_depths[i], i))
    kept = {0}
    num_children: Counter = Counter()
    picked = []
    for i in order:
        parent = trie_parents[i]
        if parent in kept and num_children[parent] < top_k:
            num_children[parent] += 1
            kept.add(i)
            picked.append(i)
            if len(picked) == n:
                break
    node_of = {0: 0}
    parents, depths = [-1], [0]
    for i in sorted(picked):  # creation order keeps parents first
        node_of[i] = len(parents)
        parents.append(node_of[trie_parents[i]])
        depths.append(trie_depths[i])
        draft.tokens.append(trie_tokens[i])
    k = len(picked)
    draft.tokens.extend(_ZEROS[:n - k])
    layout, ancestors = _layout(parents, depths, n)
    draft.layout.extend(layout)
    draft.ancestors.append(ancestors)
    return k


def chain_tensors(chains: array, num_drafted: list[int], device: torch.device | str = "cpu"):
    """draft_chains' output as tensors: drafts int64 [B, length] and drafts per row int64 [B]
    (from buffers: torch.tensor on a list of ints costs 3-6x more)."""
    drafts = torch.frombuffer(chains, dtype=torch.int64).view(len(num_drafted), -1)
    num_drafts = torch.frombuffer(array("q", num_drafted), dtype=torch.int64)
    if str(device) != "cpu":
        drafts, num_drafts = drafts.to(device), num_drafts.to(device)
    return drafts, num_drafts


def draft_tensors(draft: HistoryDraft, device: torch.device | str = "cpu"):
    """(tokens, parents, depths, ancestors) tensors for speculative.DraftTree."""
    batch_size, num_nodes = len(draft.num_drafted), draft.num_nodes
    tokens = torch.frombuffer(draft.tokens, dtype=torch.int64).view(batch_size, num_nodes)
    layout = torch.frombuffer(draft.layout, dtype=torch.int64).view(batch_size, 2, num_nodes)
    ancestors = torch.frombuffer(bytearray(b"".join(draft.ancestors)), dtype=torch.bool)
    ancestors = ancestors.view(batch_size, num_nodes, num_nodes)
    if str(device) != "cpu":
        tokens, layout, ancestors = tokens.to(device), layout.to(device), ancestors.to(device)
    return tokens, layout[:, 0], layout[:, 1], ancestors
