"""The engine core: the step loop over one model, its paged KV and its caches.

    add(request) ─▶ Scheduler ─▶ step():  schedule  ─▶  run  ─▶  postprocess
                                          admit        a prefill chunk     sample, stop,
                                          (hits,       (Prefiller: load,   detokenize,
                                          blocks)      plan, run layers)   finish
                                                       | a decode batch
                                                       (ModelRunner)

Everything a request carries through its life (its prefill task, sampling generator, kept
distributions, error) lives on the request; the scheduler keeps its own bookkeeping behind its
methods. A failure in one request (its prefill, sampling or detokenization) finishes that request
alone with ``finish_reason == "error"`` and the error kept on it (``error_of``).
``sparsex.llm.LLM`` is the public API over this.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from sparsex.cache.block_pool import BlockPool, blocks_for_budget
from sparsex.config import KV_DTYPES, EngineConfig, available_memory_bytes
from sparsex.core.prefill import Prefiller
from sparsex.core.request import DEFAULT_TENANT, KeptLogits, Request
from sparsex.core.sampler import make_generator, sample
from sparsex.core.scheduler import Scheduler
from sparsex.kv.admission import KVCacheManager
from sparsex.kv.paged import KVCache
from sparsex.kv.segment_store import SegmentStore
from sparsex.kv.tiers import TierCache, TierOptions
from sparsex.kvevents import KVEventRecorder, KVEventsConfig
from sparsex.models.base import ModelSpec
from sparsex.models.loader import load_model, resolve_model
from sparsex.reuse.options import MethodOptions, ReuseOptions, resolve_reuse
from sparsex.reuse.planner import PLANNERS, Method
from sparsex.runtime.model_runner import ModelRunner, SeqInput
from sparsex.sampling_params import SamplingParams
from sparsex.segments import SegmentSpan
from sparsex.tokenizer import Tokenizer

DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in KV_DTYPES}

ReuseArg = str | ReuseOptions | Mapping[str, Any] | None
"""A request's reuse: a method name, options, a flat dict of overrides, or None (the engine's)."""


STOP_MARGIN = 8
"""Characters before the new text searched for a stop string too: a half-decoded character (U+FFFD)
at the end of the old text may have become the stop string's first characters."""


class PromptTooLongError(ValueError):
    """The prompt (plus max_tokens) exceeds the model's context or the KV pool."""


class EngineCore:
    """One model's step loop: requests in, tokens out, one engine step at a time (not thread-safe:
    one thread drives it). ``reuse``: the requests' default reuse; ``methods`` adds reuse methods by
    name (the lab's analysis-only ones)."""

    def __init__(self, config: EngineConfig, reuse: ReuseArg = None, methods: Mapping[str, Method[Any]] | None = None) -> None:
        self.config = config
        self.methods: dict[str, Method[Any]] = {**PLANNERS, **(methods or {})}
        self.method_options: dict[str, type[MethodOptions]] = {n: m.options for n, m in self.methods.items()}
        self.reuse = resolve_reuse(ReuseOptions(), reuse, self.method_options)
        self.device = torch.device(config.device)
        self.model_path = resolve_model(config.model, config.revision)
        self.model, self.hf_config = load_model(self.model_path, self.device)
        self.spec: ModelSpec = self.model.spec  # type: ignore[assignment]
        self.tokenizer = Tokenizer(self.model_path)
        self.eos_token_ids = self.tokenizer.eos_token_ids
        kv_dtype, bs = DTYPES[config.kv_dtype], config.block_size
        budget, avail = config.kv_cache_memory, available_memory_bytes(config.device)
        if isinstance(budget, float):
            avail = min(avail, int(config.max_kv_cache_bytes / budget))
        num_blocks = blocks_for_budget(KVCache.bytes_per_block(self.spec, bs, kv_dtype), budget, avail)
        self.pool = BlockPool(num_blocks, bs, high_water=config.high_water)
        self.kv = KVCache(self.spec, num_blocks, bs, kv_dtype, self.device)
        self.runner = ModelRunner(self.model, self.kv, self.device)  # type: ignore[arg-type]
        self.kv_events = None if config.kv_events is None else KVEventRecorder(
            KVEventsConfig.of(config.kv_events), bs)  # binds its socket: a busy endpoint fails here
        self.cache = KVCacheManager(self.pool, f"{self.model_path.name}", listener=self.kv_events)
        self.scheduler = Scheduler(self.cache, config.max_num_seqs)
        self.store = SegmentStore(self.cache, self.kv, self.spec)
        self.prefiller = Prefiller(self.store, self.runner, self.spec, self.methods)
        try:
            self.tiers = self._open_tiers()
        except BaseException:
            if self.kv_events is not None:  # give the endpoint back
                self.kv_events.close()
            raise
        self._ids = itertools.count()

    # ----- requests in ---------------------------------------------------------------------------

    def new_request(
        self, ids: list[int], params: SamplingParams, spans: Sequence[SegmentSpan] = (), request_id: str | None = None,
        reuse: ReuseArg = None, tenant: str = DEFAULT_TENANT, keep_logits: int = 0,
    ) -> Request:
        """A validated request (not queued). ``keep_logits``: keep the first token's distribution
        and the recomputed positions, and the distributions of the first ``keep_logits`` tokens."""
        opts = resolve_reuse(self.reuse, reuse, self.method_options)
        if not ids:
            raise ValueError("the prompt is empty")
        if any((not isinstance(t, int)) or t < 0 or t >= self.spec.vocab_size for t in ids):
            raise ValueError(f"token ids must be integers in [0, {self.spec.vocab_size})")
        total = len(ids) + params.max_tokens
        if total > self.spec.max_position:
            raise PromptTooLongError(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the model's "
                f"context of {self.spec.max_position} tokens"
            )
        if not isinstance(tenant, str):
            raise TypeError(f"tenant must be a string, got {type(tenant).__name__}")
        req = Request(request_id or f"req-{next(self._ids)}", ids, params, list(spans), tenant=tenant, reuse=opts)
        if req.blocks_needed(self.pool.block_size) > self.pool.num_blocks:
            raise PromptTooLongError(
                f"prompt + max_tokens needs {total} tokens of KV but the pool holds "
                f"{self.pool.num_blocks * self.pool.block_size}; raise kv_cache_memory"
            )
        req.metrics.num_prompt_tokens = len(ids)
        req.generator = make_generator(params, self.device)
        req.kept = KeptLogits(keep_logits) if keep_logits else None
        return req

    def add(self, req: Request) -> Request:
        """Queue ``req`` (and its followers, the other choices of its prompt)."""
        total = sum(r.blocks_needed(self.pool.block_size) for r in (req, *req.followers))
        if total > self.pool.num_blocks:
            raise PromptTooLongError(f"{1 + len(req.followers)} choices of this prompt need {total} KV blocks but "
                                     f"the pool holds {self.pool.num_blocks}; raise kv_cache_memory or lower n")
        self.scheduler.add(req)
        return req

    def abort(self, req: Request) -> None:
        """Stop a request and return its blocks at once."""
        if not req.finished:
            req.finish_reason = req.finish_reason or "abort"
            self._finish(req)
        for f in req.followers:  # those that have no prompt KV yet cannot be served without it
            if not f.finished and f.num_computed_tokens == 0:
                f.finish_reason = "abort"
                self._finish(f)

    def has_unfinished(self) -> bool:
        return self.scheduler.num_unfinished > 0

    @staticmethod
    def error_of(req: Request) -> Exception | None:
        """The exception that failed ``req`` (``finish_reason == "error"``), if any; forgets it."""
        error, req.error = req.error, None
        return error

    # ----- the step ------------------------------------------------------------------------------

    def step(self) -> list[Request]:
        """One engine step: schedule (admit, then one prefill chunk or one decode batch), run it,
        postprocess. Returns every request that got a new token, finished or failed in it
        (followers that got their first token and finished pins included)."""
        if self.tiers is not None:  # stored segments the waiting prompts can use -> into the pool
            self.tiers.prefetch(self.scheduler.admission_order())
        out = self.scheduler.schedule()
        touched: list[Request] = []
        for req, adm in out.admitted:
            try:
                req.prefill = self.prefiller.start(req.prompt_token_ids, req.reuse, adm)
                req.num_computed_tokens = len(req.prompt_token_ids) - req.prefill.num_remaining  # its work left
            except Exception as e:
                touched += self._fail_with_followers(req, e)
        if out.prefill is not None and out.prefill.prefill is not None:
            touched += self._prefill_chunk(out.prefill)
        elif out.decode:
            touched += self._decode(out.decode)
        return touched

    def _decode(self, batch: list[Request]) -> list[Request]:
        seqs = []
        for r in batch:
            pos = r.num_tokens - 1
            r.block_table.extend(self.cache.grow(r.block_table, pos + 1))
            seqs.append(SeqInput([r.output_token_ids[-1]], [pos], r.block_table, pos + 1))
        try:
            logits = self.runner.forward(seqs)
        except Exception as e:  # the batch's state is unknown: fail each request in it
            for r in batch:
                self._fail(r, e)
            return batch
        for r, row in zip(batch, logits, strict=True):
            r.num_computed_tokens += 1
            self._postprocess(r, row)
        return batch

    def _prefill_chunk(self, req: Request) -> list[Request]:
        """The next chunk of ``req``'s prefill; when its prompt is done, its first token (and its
        followers' first tokens, from the same logits over a copy of its prompt KV)."""
        task = req.prefill
        assert task is not None
        try:
            res = task.advance(self.config.max_prefill_tokens)
            if res is not None and req.pin is not None:
                req.pinned_segment_id = self.prefiller.pin_prefilled(req.prompt_token_ids, req.block_table, req.pin)
        except Exception as e:
            return self._fail_with_followers(req, e)
        # the scheduler reads what is left from the request (a reuse prefill: its work left, in tokens)
        req.num_computed_tokens = len(req.prompt_token_ids) - task.num_remaining
        if res is None:
            return []
        req.prefill = None
        self.scheduler.prefilled(req)
        m = req.metrics
        m.reuse = req.reuse.method
        m.num_prefix_hit_tokens = res.num_prefix_hit_tokens
        m.num_segment_hit_tokens = res.num_segment_hit_tokens
        m.num_recomputed_tokens = int(res.recomputed.numel())
        m.compute_fraction = res.compute_fraction
        m.lookup_s, m.load_s = task.adm.lookup_s, res.load_s
        m.segment_sources = res.segment_sources
        m.segment_hit_tokens_by_source = res.hit_tokens_by_source
        m.num_reused_runs = len(task.adm.hits)
        m.num_seam_lost_tokens = task.adm.num_seam_lost_tokens
        if req.pin is not None:  # a pin computes KV only
            req.finish_reason = "stop"
            self._finish(req)
            return [req]
        if req.kept is not None:
            req.kept.first = (res.logits.detach().clone(), res.recomputed.cpu())
        forks = self._fork(req)
        for r in (req, *forks):
            self._postprocess(r, res.logits)
        return [req, *forks]

    def _fork(self, leader: Request) -> list[Request]:
        """Give every live follower a copy of ``leader``'s prompt KV and its prefill metrics."""
        live = [f for f in leader.followers if not f.finished]
        n = len(leader.prompt_token_ids)
        if live:
            pos = torch.arange(n, device=self.kv.k.device)
            src = self.kv.slots(leader.block_table, pos)
            for f in live:
                self.kv.copy_slots(src, self.kv.slots(f.block_table, pos))
                f.num_computed_tokens = n
                f.metrics = dataclasses.replace(leader.metrics, ttft_s=0.0, latency_s=0.0)
        return live

    # ----- postprocess ---------------------------------------------------------------------------

    def _postprocess(self, req: Request, logits: torch.Tensor) -> None:
        """Sample the next token from ``logits``, detokenize it, end the request where it stops."""
        try:
            self._append_token(req, logits)
        except Exception as e:
            self._fail(req, e)

    def _append_token(self, req: Request, logits: torch.Tensor) -> None:
        now = time.perf_counter()
        if req.first_token_time is None:
            req.first_token_time = now
            req.metrics.ttft_s = now - req.arrival_time
        if req.kept is not None and len(req.output_token_ids) < req.kept.steps_wanted:
            req.kept.steps.append(torch.log_softmax(logits.float(), dim=-1).cpu())
        tok, lp = sample(logits, req.params, req.generator, len(req.output_token_ids))
        p = req.params
        stop_ids = set(p.stop_token_ids) | (set() if p.ignore_eos else self.eos_token_ids)
        if tok in stop_ids:
            req.finish_reason = "stop"
        if tok not in stop_ids or (tok in p.stop_token_ids and tok not in self.eos_token_ids):  # EOS is no output
            req.output_token_ids.append(tok)
            req.output_logprobs.append(lp)
            before = len(req.text)
            req.text = req.detokenizer.text_of(req.output_token_ids, self.tokenizer.decode)
            for s in p.stop:  # only where the new text (or a character it completed) can hold it
                at = req.text.find(s, max(0, before - len(s) - STOP_MARGIN))
                if at >= 0:
                    req.text = req.text[:at]
                    req.finish_reason = "stop"
        if req.finish_reason is None and len(req.output_token_ids) >= p.max_tokens:
            req.finish_reason = "length"
        if req.finish_reason is not None:
            self._finish(req)

    def _fail_with_followers(self, leader: Request, error: Exception) -> list[Request]:
        live = [leader, *(f for f in leader.followers if not f.finished)]
        for r in live:
            self._fail(r, error)
        return live

    def _fail(self, req: Request, error: Exception) -> None:
        """Finish ``req`` alone with ``finish_reason="error"``, keeping the error on it."""
        req.error = error
        req.finish_reason = "error"
        if not req.finished:
            self._finish(req)

    def _finish(self, req: Request) -> None:
        req.prefill = None
        req.metrics.latency_s = time.perf_counter() - req.arrival_time
        req.metrics.num_generated_tokens = len(req.output_token_ids)
        self.scheduler.finish(req)
        if req.block_table:
            self.pool.release(req.block_table)
            req.block_table = []
        req.generator = None

    # ----- tiers below the pool ------------------------------------------------------------------

    def _open_tiers(self) -> TierCache | None:
        """The disk / Redis tiers of ``kv_disk`` / ``kv_store`` (restores pinned entries), or None."""
        c = self.config
        if c.kv_store is None and c.kv_disk is None:
            return None
        options = TierOptions(c.kv_store, c.kv_disk, c.kv_disk_bytes, c.kv_store_dtype)  # type: ignore[arg-type]
        return TierCache.open(self.store, self.model_path, c.kv_dtype, options, self.kv_events)

    def cache_entries(self, namespace: str | None = None) -> list[dict[str, Any]]:
        """Store entries this replica's pool holds (for placement by cache affinity); [] without tiers."""
        return [] if self.tiers is None else self.tiers.entries(namespace)

    def cache_events(self, since: int = 0) -> list[dict[str, Any]]:
        """Store events after sequence number ``since`` (published, promoted, pinned, unpinned)."""
        return [] if self.tiers is None else [dataclasses.asdict(e) for e in self.tiers.events_since(since)]

    def close(self) -> None:
        """Flush pending store writes and close the tiers, then publish the last KV events and close
        their socket (also at process exit); idempotent."""
        if self.tiers is not None:
            self.tiers.close()
        if self.kv_events is not None:
            self.kv_events.close()
