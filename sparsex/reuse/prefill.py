"""A request's prefill with reuse: look up, load and align, plan, run, publish."""

from __future__ import annotations

import time
from collections import Counter
from typing import TYPE_CHECKING

import torch

from sparsex.cache import NoFreeBlocksError
from sparsex.model_runner import SeqInput, run_planned
from sparsex.request import Request
from sparsex.reuse.options import ReuseOptions
from sparsex.reuse.planner import ReuseSituation, compute_fraction, plan_prefill
from sparsex.reuse.store import Lookup, auto_spans
from sparsex.segments import SegmentSpan

if TYPE_CHECKING:
    from sparsex.engine import LLM


def prefill_request(llm: LLM, req: Request) -> torch.Tensor:
    """Run ``req``'s prompt with its reuse method; returns the last position's logits [V]."""
    t0 = time.perf_counter()
    opts: ReuseOptions = req.reuse
    ids, n = req.prompt_token_ids, len(req.prompt_token_ids)
    spans = list(req.spans)
    if opts.auto_segments:
        spans += auto_spans(n, ids, spans, opts.namespace)
    store = llm.store
    lookup = store.lookup(ids, spans, opts.namespace, prefix=opts.uses_prefix, segments=opts.reuses_segments)
    req.block_table = list(lookup.prefix_blocks)  # released with the request, even on failure
    try:
        _allocate_blocks(llm, req, lookup, n)
    except Exception:
        store.release(lookup)
        raise
    start = lookup.prefix_len
    runs = [(h.span.start, h.span.start + h.num_tokens) for h in lookup.hits]
    hit_sources: Counter[str] = Counter()
    for h in lookup.hits:
        hit_sources[h.span.source] += h.num_tokens
    reused = torch.zeros(n, dtype=torch.bool)
    reused[store.load(lookup, req.block_table)] = True
    req.metrics.reuse_overhead_s = time.perf_counter() - t0
    seq = SeqInput(ids[start:], list(range(start, n)), req.block_table, n)
    error = true_kv_error(llm, seq, reused) if opts.method == "oracle" and bool(reused.any()) else None
    plan = plan_prefill(opts, llm.spec, llm.kv, ReuseSituation(seq, start, reused, runs, error))
    logits, recomputed = run_planned(llm.runner, plan)
    req.num_computed_tokens = n

    m = req.metrics
    m.reuse = opts.method
    m.num_prefix_hit_tokens = start
    m.num_segment_hit_tokens = int(reused.sum())
    m.num_recomputed_tokens = int(recomputed.numel())
    if req.keep_first_logits:  # analysis runs (the quality harness) also want which positions ran
        req.recomputed_positions = recomputed.cpu()
    m.compute_fraction = compute_fraction(plan, llm.spec.num_layers, n, int(recomputed.numel()))
    m.segment_sources = dict(Counter(str(s.source) for s in spans))
    m.segment_hit_tokens_by_source = dict(hit_sources)

    if opts.register:
        first_reused = min((a for a, _ in runs), default=n)
        fresh = [
            s for s in spans
            if not bool(reused[s.start : s.end].any()) and (s.end <= first_reused or opts.register_after_reuse)
        ]
        store.publish(ids, req.block_table, opts.namespace, first_reused, fresh)
    return logits


def true_kv_error(llm: LLM, seq: SeqInput, reused: torch.Tensor) -> torch.Tensor:
    """[T] per-token L2 error of the loaded KV against a full prefill, summed over layers and K/V.

    Runs the full prefill (overwriting the request's KV), measures, then puts the loaded KV back.
    Analysis only (method ``oracle``): it costs a full prefill.
    """
    kv = llm.kv
    pos = torch.nonzero(reused).flatten()
    slots = kv.slots(seq.block_table, pos.to(kv.k.device))
    k_loaded, v_loaded = kv.k[:, slots].clone(), kv.v[:, slots].clone()  # [L, R, Hkv, D]
    llm.runner.forward([seq])
    err = (kv.k[:, slots].float() - k_loaded.float()).pow(2).sum(dim=(2, 3)).sqrt().sum(0)
    err += (kv.v[:, slots].float() - v_loaded.float()).pow(2).sum(dim=(2, 3)).sqrt().sum(0)
    kv.k[:, slots], kv.v[:, slots] = k_loaded, v_loaded
    out = torch.zeros(reused.numel())
    out[pos] = err.cpu()
    return out


def _allocate_blocks(llm: LLM, req: Request, lookup: Lookup, n: int) -> None:
    """Give ``req`` blocks for its ``n`` prompt tokens.

    The scheduler admitted the request against the pool's free blocks, but segment hits on cached
    free blocks took references and left the free list. If the pool comes up short, hand hits
    back (last first) until the allocation fits: the request then recomputes those segments.
    """
    while True:
        try:
            llm._ensure_blocks(req, n)
            return
        except NoFreeBlocksError:
            if not lookup.hits:
                raise
            llm.pool.release(lookup.hits.pop().src_blocks)


def pin_document(llm: LLM, doc: str | list[int], namespace: str, name: str | None) -> str:
    """Compute ``doc`` alone (after BOS where the model uses one) and pin it as a segment."""
    toks = llm.tokenizer.encode(doc) if isinstance(doc, str) else [int(t) for t in doc]
    if not toks:
        raise ValueError("cannot pin an empty document")
    ids = llm.tokenizer.with_bos(toks)
    if len(ids) > llm.spec.max_position:
        raise ValueError(f"document of {len(ids)} tokens exceeds the context of {llm.spec.max_position}")
    blocks = llm.pool.allocate(-(-len(ids) // llm.pool.block_size))
    try:
        llm.runner.forward([SeqInput(ids, list(range(len(ids))), blocks, len(ids))])
        span = SegmentSpan(len(ids) - len(toks), len(ids), "pinned", namespace)
        sids = llm.store.publish(ids, blocks, namespace, len(ids), [span], pinned=True, name=name)
    finally:
        llm.pool.release(blocks)
    if not sids:
        raise RuntimeError("the KV pool is full; could not pin the document")
    return sids[0]
