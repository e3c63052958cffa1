"""The engine: ``LLM`` (the stable Python API) over scheduler, cache and model runner.

    LLM.generate / chat / next_token_logprobs
      -> add_request -> Scheduler.schedule(): admit (KVCacheManager: hits + blocks) | decode batch
         -> step(): Prefiller.start(ids, options, admission).advance(...) | ModelRunner.forward
         -> sample -> RequestOutput

A failure in one request (its prefill, sampling or detokenization) finishes that request alone
with ``finish_reason == "error"``; ``generate`` re-raises it to the caller.

This file holds the request lifecycle and the step loop; ``LLM`` also inherits the calls built on
them: ``RequestOutput`` and generate / chat / stream (engine_outputs.py), and the pinned-segment
API (engine_pins.py).
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from sparsex.cache.block_pool import BlockPool, blocks_for_budget
from sparsex.config import EngineConfig, available_memory_bytes
from sparsex.engine_outputs import Outputs
from sparsex.engine_outputs import RequestOutput as RequestOutput  # part of this module's API
from sparsex.engine_pins import PinnedSegments
from sparsex.kv_cache import KVCache
from sparsex.kv_manager import KVCacheManager
from sparsex.kvevents import KVEventRecorder, KVEventsConfig
from sparsex.model_runner import ModelRunner, SeqInput
from sparsex.models.base import ModelSpec
from sparsex.models.loader import load_model, resolve_model
from sparsex.request import DEFAULT_TENANT, Request
from sparsex.reuse.options import METHODS, ReuseOptions, resolve_reuse
from sparsex.reuse.planner import Planner
from sparsex.reuse.prefill import Prefiller, PrefillTask, RecalledPrefill
from sparsex.reuse.store import SegmentStore
from sparsex.reuse.tiers import TierCache, TierOptions
from sparsex.sampler import make_generator, sample
from sparsex.sampling_params import SamplingParams
from sparsex.scheduler import Scheduler
from sparsex.segments import Prompt
from sparsex.tokenizer import Tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class PromptTooLongError(ValueError):
    """The prompt (plus max_tokens) exceeds the model's context or the KV pool."""


class LLM(Outputs, PinnedSegments):
    """A loaded model with its KV cache, serving prompts.

    >>> llm = LLM()  # default model (SmolLM2-135M-Instruct) on CPU
    >>> llm.generate(["Hello"], SamplingParams(max_tokens=8, temperature=0))[0].text
    """

    def __init__(
        self,
        model: str | None = None,
        device: str = "cpu",
        reuse: str | ReuseOptions | dict[str, Any] | None = None,
        planners: Mapping[str, Planner] | None = None,
        **kwargs: Any,
    ) -> None:
        """``planners`` adds reuse methods by name (the evaluation lab's analysis-only ones)."""
        self.config = EngineConfig(model=model, device=device, **kwargs)
        self.methods: tuple[str, ...] = (*METHODS, *(m for m in (planners or {}) if m not in METHODS))
        self.reuse = resolve_reuse(ReuseOptions(), reuse, self.methods)
        mpt = self.config.max_prefill_tokens
        if mpt is not None and (isinstance(mpt, bool) or not isinstance(mpt, int) or mpt < 1):
            raise ValueError(f"max_prefill_tokens must be a positive int or None (unbounded), got {mpt!r}")
        if self.config.kv_dtype not in DTYPES:
            raise ValueError(f"kv_dtype must be one of {sorted(DTYPES)}, got {self.config.kv_dtype!r}")
        self.device = torch.device(device)
        self.model_path = resolve_model(model, self.config.revision)
        self.model, self.hf_config = load_model(self.model_path, self.device)
        self.spec: ModelSpec = self.model.spec  # type: ignore[assignment]
        self.model_name = model or "smollm2"
        self.tokenizer = Tokenizer(self.model_path)
        kv_dtype = DTYPES[self.config.kv_dtype]
        bs = self.config.block_size
        per_block = KVCache.bytes_per_block(self.spec, bs, kv_dtype)
        budget = self.config.kv_cache_memory
        avail = available_memory_bytes(device)
        if isinstance(budget, float):
            avail = min(avail, int(self.config.max_kv_cache_bytes / budget))
        num_blocks = blocks_for_budget(per_block, budget, avail)
        self.pool = BlockPool(num_blocks, bs, high_water=self.config.high_water)
        self.kv = KVCache(self.spec, num_blocks, bs, kv_dtype, self.device)
        self.runner = ModelRunner(self.model, self.kv, self.device)  # type: ignore[arg-type]
        self.kv_events = None if self.config.kv_events is None else KVEventRecorder(
            KVEventsConfig.of(self.config.kv_events), bs)  # binds its socket: a busy endpoint fails here
        self.cache = KVCacheManager(self.pool, f"{self.model_path.name}", listener=self.kv_events)
        self.scheduler = Scheduler(self.cache, self.config.max_num_seqs)
        self.store = SegmentStore(self.cache, self.kv, self.spec)
        self.prefiller = Prefiller(self.store, self.runner, self.spec, planners)
        try:
            self.tiers = self._open_tiers()
        except BaseException:
            if self.kv_events is not None:  # give the endpoint back
                self.kv_events.close()
            raise
        self.eos_token_ids = self.tokenizer.eos_token_ids
        self._ids = itertools.count()
        self._generators: dict[str, torch.Generator | None] = {}
        self._keep_first: dict[str, int] = {}  # id -> how many generated tokens' distributions to keep
        self._steps: dict[str, list[torch.Tensor]] = {}  # id -> kept log-probabilities, one per token
        self._first: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # id -> (first logits, recomputed)
        self._errors: dict[str, Exception] = {}
        self._tasks: dict[str, PrefillTask | RecalledPrefill] = {}  # requests whose prefill is under way

    # ----- request lifecycle -------------------------------------------------------------

    def add_request(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        reuse: str | ReuseOptions | dict[str, Any] | None = None,
        keep_first_logits: bool | int = False,
        tenant: str = DEFAULT_TENANT,
    ) -> Request:
        """Queue ``prompt``; ``keep_first_logits`` keeps the first token's distribution and the
        recomputed positions for ``output_of`` (analysis); an int ``n`` also keeps the distributions
        of the first ``n`` generated tokens (``RequestOutput.step_logprobs``). ``tenant``: who it is
        served for; tenants share prefill turns fairly (``sparsex.scheduler``)."""
        params = params or SamplingParams()
        ids, spans = self.tokenizer.encode_prompt(prompt)
        return self.add_tokenized(ids, params, spans, request_id, reuse, keep_first_logits, tenant)

    def add_tokenized(
        self,
        ids: list[int],
        params: SamplingParams,
        spans: Sequence[Any] = (),
        request_id: str | None = None,
        reuse: str | ReuseOptions | dict[str, Any] | None = None,
        keep_first_logits: bool | int = False,
        tenant: str = DEFAULT_TENANT,
    ) -> Request:
        req = self._new_request(ids, params, spans, request_id, reuse, tenant)
        self._generators[req.request_id] = make_generator(params, self.device)
        if keep_first_logits:
            self._keep_first[req.request_id] = int(keep_first_logits)
        self.scheduler.add(req)
        return req

    def _new_request(
        self, ids: list[int], params: SamplingParams, spans: Sequence[Any], request_id: str | None,
        reuse: str | ReuseOptions | dict[str, Any] | None, tenant: str,
    ) -> Request:
        """A validated request (not queued)."""
        opts = resolve_reuse(self.reuse, reuse, self.methods)
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
        return req

    def add_choices(
        self,
        ids: list[int],
        params: Sequence[SamplingParams],
        spans: Sequence[Any] = (),
        request_ids: Sequence[str] | None = None,
        reuse: str | ReuseOptions | dict[str, Any] | None = None,
        tenant: str = DEFAULT_TENANT,
    ) -> list[Request]:
        """``len(params)`` choices of one prompt that share one prefill: the first is prefilled, the
        others copy its prompt KV and sample their first token from the same logits, each with its
        own sampling parameters (seed). Aborting the first before its prefill aborts them all."""
        if not params:
            raise ValueError("at least one choice is needed")
        ids_of = list(request_ids) if request_ids is not None else [None] * len(params)
        leader = self._new_request(ids, params[0], spans, ids_of[0], reuse, tenant)
        leader.followers = [self._new_request(ids, p, spans, rid, reuse, tenant)
                            for p, rid in zip(params[1:], ids_of[1:], strict=True)]
        for r in (leader, *leader.followers):
            self._generators[r.request_id] = make_generator(r.params, self.device)
        total = sum(r.blocks_needed(self.pool.block_size) for r in (leader, *leader.followers))
        if total > self.pool.num_blocks:
            raise PromptTooLongError(f"{len(params)} choices of this prompt need {total} KV blocks but the pool "
                                     f"holds {self.pool.num_blocks}; raise kv_cache_memory or lower n")
        self.scheduler.add(leader)
        return [leader, *leader.followers]

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

    def step(self) -> list[Request]:
        """Run one engine step: start the prefill of what was admitted, then one prefill chunk or one
        decode batch. Returns every request that got a new token, finished or failed in it
        (followers that got their first token and finished pins included)."""
        if self.tiers is not None:  # stored segments the waiting prompts can use -> into the pool
            self.tiers.prefetch(self.scheduler.admission_order())
        out = self.scheduler.schedule()
        touched: list[Request] = []
        for req, adm in out.admitted:
            try:
                task = self.prefiller.start(req.prompt_token_ids, req.reuse, adm)
                self._tasks[req.request_id] = task
                req.num_computed_tokens = len(req.prompt_token_ids) - task.num_remaining  # its work left
            except Exception as e:
                self._fail(req, e)
                touched += [req, *self._fail_followers(req, e)]
        if out.prefill is not None and out.prefill.request_id in self._tasks:
            touched += self._prefill_chunk(out.prefill)
        elif out.decode:
            touched += self._decode(out.decode)
        return touched

    # ----- tiers below the pool --------------------------------------------------------------

    def _open_tiers(self) -> TierCache | None:
        """The disk / Redis tiers of ``kv_disk`` / ``kv_store`` (restores pinned entries), or None."""
        c = self.config
        if c.kv_store is None and c.kv_disk is None:
            return None
        if c.kv_store_dtype not in DTYPES:
            raise ValueError(f"kv_store_dtype must be one of {sorted(DTYPES)}, got {c.kv_store_dtype!r}")
        options = TierOptions(c.kv_store, c.kv_disk, c.kv_disk_bytes, c.kv_store_dtype)  # type: ignore[arg-type]
        return TierCache.open(self.store, self.model_path, c.kv_dtype, options, self.kv_events)

    def close(self) -> None:
        """Flush pending store writes and close the tiers, then publish the last KV events and close
        their socket (also at process exit); idempotent."""
        if self.tiers is not None:
            self.tiers.close()
        if self.kv_events is not None:
            self.kv_events.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def cache_entries(self, namespace: str | None = None) -> list[dict[str, Any]]:
        """Store entries this replica's pool holds (for placement by cache affinity); [] without tiers."""
        return [] if self.tiers is None else self.tiers.entries(namespace)

    def cache_events(self, since: int = 0) -> list[dict[str, Any]]:
        """Store events after sequence number ``since`` (published, promoted, pinned, unpinned)."""
        return [] if self.tiers is None else [dataclasses.asdict(e) for e in self.tiers.events_since(since)]

    # ----- internals -----------------------------------------------------------------------

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
            self._append_token_or_fail(r, row)
        return batch

    def _prefill_chunk(self, req: Request) -> list[Request]:
        """The next chunk of ``req``'s prefill; when its prompt is done, its first token (and its
        followers' first tokens, from the same logits over a copy of its prompt KV)."""
        task = self._tasks[req.request_id]
        try:
            res = task.advance(self.config.max_prefill_tokens)
            if res is not None and req.pin is not None:
                req.pinned_segment_id = self.prefiller.pin_prefilled(req.prompt_token_ids, req.block_table, req.pin)
        except Exception as e:
            self._fail(req, e)
            return [req, *self._fail_followers(req, e)]
        # the scheduler reads what is left from the request (a reuse prefill: its work left, in tokens)
        req.num_computed_tokens = len(req.prompt_token_ids) - task.num_remaining
        if res is None:
            return []
        del self._tasks[req.request_id]
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
        if req.request_id in self._keep_first:
            self._first[req.request_id] = (res.logits.detach().clone(), res.recomputed.cpu())
        forks = self._fork(req)
        self._append_token_or_fail(req, res.logits)
        for f in forks:
            self._append_token_or_fail(f, res.logits)
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

    def _fail_followers(self, leader: Request, error: Exception) -> list[Request]:
        live = [f for f in leader.followers if not f.finished]
        for f in live:
            self._fail(f, error)
        return live

    def _append_token_or_fail(self, req: Request, logits: torch.Tensor) -> None:
        try:
            self._append_token(req, logits)
        except Exception as e:
            self._fail(req, e)

    def _fail(self, req: Request, error: Exception) -> None:
        """Finish ``req`` alone with ``finish_reason="error"``, keeping the error for ``generate``."""
        self._errors[req.request_id] = error
        req.finish_reason = "error"
        if not req.finished:
            self._finish(req)

    def error_of(self, req: Request) -> Exception | None:
        """The exception that failed ``req`` (``finish_reason == "error"``), if any; forgets it.

        ``generate``, ``chat``, ``stream`` and ``run_to_completion`` collect it; a caller driving
        ``add_tokenized`` + ``step`` itself should call this for each failed request."""
        return self._errors.pop(req.request_id, None)

    def _append_token(self, req: Request, logits: torch.Tensor) -> None:
        now = time.perf_counter()
        if req.first_token_time is None:
            req.first_token_time = now
            req.metrics.ttft_s = now - req.arrival_time
        if len(req.output_token_ids) < self._keep_first.get(req.request_id, 0):
            self._steps.setdefault(req.request_id, []).append(torch.log_softmax(logits.float(), dim=-1).cpu())
        tok, lp = sample(logits, req.params, self._generators.get(req.request_id), len(req.output_token_ids))
        req.output_token_ids.append(tok)
        req.output_logprobs.append(lp)
        p = req.params
        stop_ids = set(p.stop_token_ids) | (set() if p.ignore_eos else self.eos_token_ids)
        if tok in stop_ids:
            if tok not in p.stop_token_ids or tok in self.eos_token_ids:  # EOS is not part of the output
                req.output_token_ids.pop()
                req.output_logprobs.pop()
            req.finish_reason = "stop"
        req.text = self.tokenizer.decode(req.output_token_ids)
        for s in p.stop:
            at = req.text.find(s)
            if at >= 0:
                req.text = req.text[:at]
                req.finish_reason = "stop"
        if req.finish_reason is None and len(req.output_token_ids) >= p.max_tokens:
            req.finish_reason = "length"
        if req.finish_reason is not None:
            self._finish(req)

    def _finish(self, req: Request) -> None:
        self._tasks.pop(req.request_id, None)
        req.metrics.latency_s = time.perf_counter() - req.arrival_time
        req.metrics.num_generated_tokens = len(req.output_token_ids)
        self.scheduler.finish(req)
        if req.block_table:
            self.pool.release(req.block_table)
            req.block_table = []
        self._generators.pop(req.request_id, None)
        self._keep_first.pop(req.request_id, None)
