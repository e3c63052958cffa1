"""RunMatcher: every cached token run of a prompt, at any offset of the prompt and of the entry.

A segment entry's chain hash restarts at the entry's own start, so :meth:`SegmentIndex.match` only
finds an entry from its first token. This index instead finds any run of at least ``min_run``
prompt tokens equal to a contiguous run of a cached entry's tokens, whatever boundaries either was
cut at (rsync's design: look every prompt window up in an index of the cached blocks' anchors,
then extend each hit token by token in both directions). The index is a dict per namespace keyed
by the anchor's own token ids: Python's tuple hash picks the bucket and tuple equality confirms
it, so a hash collision is never a match, and the window lookups run in C (no rolling hash or
digest in the scan)::

    B = 4, anchor length a = 2; entry E = e0..e9 in blocks 11, 4, 9 (computed at positions 6, 10, 14)

    entry     | e0 e1 e2 e3 | e4 e5 e6 e7 | e8 e9 |
    blocks    |  block 11   |   block 4   | blk 9 |           the last block may be partial
    anchors   [e0 e1][e2 e3][e4 e5][e6 e7][e8 e9]             at entry offsets 0, 2, 4, 6, 8

    prompt    x0 x1 x2 x3 x4 e3 e4 e5 e6 e7 e8 y0 ...
    windows      every a-token window is looked up; the window at 6 = (e4, e5) is anchor (block 4,
                 offset 0); it is extended left to e3 (block 11, offset 3) across the parent link
                 and right to e8 (block 9) across the child link:

    TokenRun(prompt_start=5, num_tokens=6, block_ids=(11, 4, 9), first_offset=3, positions=(6, 10, 14))
    (the per-token arithmetic is drawn in token_runs.py)

Why anchors are shorter than a block: a run covering entry offsets ``[e, e + L)`` contains the
anchor at the first multiple of ``a`` at or after ``e`` whenever ``L >= 2a - 1``; ``a`` divides
``B`` so no anchor crosses a block. With ``a = 8`` for ``B = 16`` every run of 15 or more tokens
is found, wherever it starts inside the entry; whole-block anchors would miss runs shorter than
``2B - 1`` that start mid-block. A tail shorter than ``a`` is no anchor but is reached by extension.

Entries form a forest: a block's parent (the block before it in its entry) is unique, since its
chain hash covers the parent's; several entries sharing leading blocks give a block several
children. Extension goes up parents and down the child that matches longest.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

from sparsex.cache.hashing import BlockHash
from sparsex.cache.token_runs import TokenRun, select_runs

WORK_PER_TOKEN = 4
"""Lookup work allowed per prompt token before the search stops being exhaustive (see find): a
prompt whose every token is cached once or twice uses 1 to 3."""
ANCHORS_PAST_BUDGET = 4
"""Past the work budget, anchors examined per prompt window."""
_WORK_FLOOR = 4096
_EXTEND_COST = 8  # work units of one extension besides its tokens (its fixed overhead)

_Item = TypeVar("_Item")
_Key = TypeVar("_Key")


@dataclass(frozen=True)
class _Node:
    """One indexed block."""

    block_id: int
    chain_hash: BlockHash
    parent_hash: BlockHash | None
    tokens: tuple[int, ...]
    position: int
    namespace: str
    anchors: tuple[tuple[tuple[int, ...], int], ...]
    """``(token ids, offset in block)`` of each anchor, to undo the index."""


class RunMatcher:
    """Index of cached segment blocks by anchor content, and the any-offset run search over it.

    Invariants:
    - A block is indexed iff it is published in the pool as a segment block (the owner adds it
      after :meth:`BlockPool.register` and the pool's evict hook drops it), so every indexed block
      holds exactly ``tokens``; nothing here takes a pool reference.
    - Anchors are keyed by their token ids in one dict per namespace: a hit is equal content by
      dict equality (a hash collision never makes a run), and a run never leaves its namespace
      (parents and children are checked too).
    - Every block but an entry's last is full, so run arithmetic is ``k // B`` and ``k % B``.
    - Within the work budget (see :meth:`_candidates`) results depend only on the indexed content
      and block ids, never on dict or scan order.
    """

    def __init__(self, block_size: int, anchor_len: int | None = None) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if anchor_len is None:  # the largest divisor of B with 2a - 1 <= B: every B-token run is found
            anchor_len = max(
                a for a in range(1, block_size + 1) if block_size % a == 0 and 2 * a - 1 <= block_size
            )
        if anchor_len < 1 or block_size % anchor_len:
            raise ValueError(f"anchor_len must divide block_size {block_size}, got {anchor_len}")
        self._block_size = block_size
        self._anchor_len = anchor_len
        self._nodes: dict[int, _Node] = {}
        self._by_chain: dict[BlockHash, int] = {}
        self._children: dict[BlockHash, dict[int, None]] = {}  # parent chain hash -> child ids
        # namespace -> anchor token ids -> (block id, offset) in registration order
        self._anchors: dict[str, dict[tuple[int, ...], dict[tuple[int, int], None]]] = {}

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def anchor_len(self) -> int:
        return self._anchor_len

    @property
    def min_findable_run(self) -> int:
        """Shortest ``min_run`` accepted: every run this long contains an anchor."""
        return 2 * self._anchor_len - 1

    @property
    def num_blocks(self) -> int:
        """Number of blocks indexed."""
        return len(self._nodes)

    def __contains__(self, block_id: object) -> bool:
        return block_id in self._nodes

    # ----- index maintenance -------------------------------------------------------------------

    def add_block(
        self,
        block_id: int,
        chain_hash: BlockHash,
        parent_hash: BlockHash | None,
        tokens: Sequence[int],
        position: int,
        namespace: str,
    ) -> None:
        """Index a newly published segment block (``parent_hash``: its entry's previous block's
        chain hash, None for an entry's first block). Adding the same block again is a no-op."""
        known = self._nodes.get(block_id)
        if known is not None:
            if known.chain_hash != chain_hash:
                raise ValueError(f"block {block_id} is indexed under another chain hash; drop it first")
            return
        if chain_hash in self._by_chain:
            raise ValueError(f"chain hash already indexed for block {self._by_chain[chain_hash]}")
        if not 1 <= len(tokens) <= self._block_size:
            raise ValueError(f"a block holds 1..{self._block_size} tokens, got {len(tokens)}")
        a = self._anchor_len
        token_tuple = tuple(tokens)
        anchors = tuple((token_tuple[o : o + a], o) for o in range(0, len(token_tuple) - a + 1, a))
        self._nodes[block_id] = _Node(
            block_id, chain_hash, parent_hash, token_tuple, position, namespace, anchors
        )
        self._by_chain[chain_hash] = block_id
        if parent_hash is not None:
            self._children.setdefault(parent_hash, {})[block_id] = None
        for window, offset in anchors:  # a tail shorter than an anchor has none
            self._anchors.setdefault(namespace, {}).setdefault(window, {})[(block_id, offset)] = None

    def drop_block(self, block_id: int) -> None:
        """Forget a block (the pool's evict hook); unknown ids (prefix blocks, ...) are ignored."""
        node = self._nodes.pop(block_id, None)
        if node is None:
            return
        del self._by_chain[node.chain_hash]
        if node.parent_hash is not None:
            _discard(self._children, node.parent_hash, block_id)
        if node.anchors:  # a short tail has none
            by_window = self._anchors[node.namespace]  # present: it holds this block's anchors
            for window, offset in node.anchors:
                _discard(by_window, window, (block_id, offset))
            if not by_window:
                del self._anchors[node.namespace]

    # ----- lookup ------------------------------------------------------------------------------

    def find(
        self, token_ids: Sequence[int], namespace: str, min_run: int | None = None
    ) -> tuple[TokenRun, ...]:
        """Disjoint runs of at least ``min_run`` tokens (default: one block), sorted by prompt start.

        Every maximal match of ``token_ids`` against an entry of ``namespace`` is a candidate; they
        are chosen by :func:`select_runs` (longest first). Takes no references."""
        min_run = self._block_size if min_run is None else min_run
        if min_run < self.min_findable_run:
            raise ValueError(
                f"min_run must be >= {self.min_findable_run} (anchor length {self._anchor_len}), got {min_run}"
            )
        tokens = tuple(token_ids)
        by_window = self._anchors.get(namespace)
        if by_window is None or len(tokens) < min_run:
            return ()
        return tuple(select_runs(self._candidates(tokens, by_window, min_run), min_run, self._block_size))

    def _candidates(
        self, tokens: tuple[int, ...], by_window: dict[tuple[int, ...], dict[tuple[int, int], None]], min_run: int
    ) -> list[TokenRun]:
        """The maximal run through every verified anchor hit, each diagonal extended once.

        Exact while the work (anchor pairs examined + extensions and their tokens) stays within
        ``WORK_PER_TOKEN`` per prompt token. Past that, which takes content cached many times over
        (one token repeated, boilerplate), hits inside a run of ``min_run`` tokens already found
        are skipped and a window's anchors are examined ``ANCHORS_PAST_BUDGET`` at most (in
        registration order): runs stay verified and disjoint, but some alternatives are missed."""
        a = self._anchor_len
        budget = WORK_PER_TOKEN * len(tokens) + _WORK_FLOOR
        work, reach = 0, 0  # every run kept so far starts at or before i and ends at or before reach
        found: list[TokenRun] = []
        passed: set[tuple[int, int, int]] = set()  # (prompt position, block id, offset) already in a run
        passed_at: dict[int, int] = {}  # prompt position -> how many of those it has
        # Every a-token window of the prompt, looked up in C (zip builds the tuples).
        hits = map(by_window.get, zip(*(tokens[k:] for k in range(a)), strict=False))
        for i, anchors in enumerate(hits):
            if anchors is None or (work > budget and i + a <= reach):
                continue
            if passed_at.get(i, 0) >= len(anchors):  # every anchor of this window already lies in a run
                continue
            for examined, (block_id, offset) in enumerate(anchors):
                if work > budget and (i + a <= reach or examined >= ANCHORS_PAST_BUDGET):
                    break
                work += 1
                if (i, block_id, offset) in passed:
                    continue
                run = self._extend(tokens, i, self._nodes[block_id], offset)
                work += _EXTEND_COST + run.num_tokens
                self._mark_anchors(run, passed, passed_at)
                if run.num_tokens >= min_run:
                    found.append(run)
                    reach = max(reach, run.prompt_end)
        return found

    def _extend(self, tokens: tuple[int, ...], i: int, node: _Node, offset: int) -> TokenRun:
        """Grow the verified match of prompt position ``i`` <-> (``node``, ``offset``) both ways."""
        start, first, first_offset, before = i, node, offset, []
        while True:
            k = _common_suffix(tokens, start, first.tokens, first_offset)
            start, first_offset = start - k, first_offset - k
            if first_offset > 0 or start == 0:
                break
            parent = self._parent(first)
            if parent is None or parent.tokens[-1] != tokens[start - 1]:
                break
            before.append(parent)
            first, first_offset = parent, len(parent.tokens)
        end, last, last_offset, after = i, node, offset, []
        while True:
            k = _common_prefix(tokens, end, last.tokens, last_offset)
            end, last_offset = end + k, last_offset + k
            if last_offset < len(last.tokens) or end == len(tokens):
                break
            child = self._best_child(last, tokens, end)
            if child is None:
                break
            after.append(child)
            last, last_offset = child, 0
        path = [*reversed(before), node, *after]
        return TokenRun(
            start, end - start, tuple(n.block_id for n in path), first_offset, tuple(n.position for n in path)
        )

    def _parent(self, node: _Node) -> _Node | None:
        parent_id = None if node.parent_hash is None else self._by_chain.get(node.parent_hash)
        parent = None if parent_id is None else self._nodes[parent_id]
        if parent is None or parent.namespace != node.namespace or len(parent.tokens) != self._block_size:
            return None
        return parent

    def _best_child(self, node: _Node, tokens: tuple[int, ...], start: int) -> _Node | None:
        """The child matching most tokens from ``start`` (ties: the smallest block id), or None."""
        best: _Node | None = None
        best_len = 0
        for child_id in sorted(self._children.get(node.chain_hash, {})):
            child = self._nodes[child_id]
            if child.namespace == node.namespace:
                length = _common_prefix(tokens, start, child.tokens, 0)
                if length > best_len:
                    best, best_len = child, length
        return best

    def _mark_anchors(self, run: TokenRun, passed: set[tuple[int, int, int]], passed_at: dict[int, int]) -> None:
        """Record every anchor the run passes through: a hit there would extend to this same run.
        ``passed_at`` counts them per prompt position, so a position whose every anchor is already
        passed is skipped without looking at them."""
        a, block_size = self._anchor_len, self._block_size
        for index, block_id in enumerate(run.block_ids):
            block_start = run.prompt_start + index * block_size - run.first_offset  # prompt pos of slot 0
            for offset in range(0, len(self._nodes[block_id].tokens) - a + 1, a):
                at = block_start + offset
                if run.prompt_start <= at and at + a <= run.prompt_end and (at, block_id, offset) not in passed:
                    passed.add((at, block_id, offset))
                    passed_at[at] = passed_at.get(at, 0) + 1


def _common_prefix(a: tuple[int, ...], a_start: int, b: tuple[int, ...], b_start: int) -> int:
    """How many tokens ``a[a_start:]`` and ``b[b_start:]`` share from their starts."""
    limit = min(len(a) - a_start, len(b) - b_start)
    if a[a_start : a_start + limit] == b[b_start : b_start + limit]:  # the common case, in C
        return limit
    k = 0
    while a[a_start + k] == b[b_start + k]:
        k += 1
    return k


def _common_suffix(a: tuple[int, ...], a_end: int, b: tuple[int, ...], b_end: int) -> int:
    """How many tokens ``a[:a_end]`` and ``b[:b_end]`` share from their ends."""
    limit = min(a_end, b_end)
    if a[a_end - limit : a_end] == b[b_end - limit : b_end]:
        return limit
    k = 0
    while a[a_end - 1 - k] == b[b_end - 1 - k]:
        k += 1
    return k


def _discard(index: dict[_Key, dict[_Item, None]], key: _Key, item: _Item) -> None:
    """Remove ``item`` from the ordered set ``index[key]``, and the set once it is empty."""
    members = index[key]
    del members[item]
    if not members:
        del index[key]
