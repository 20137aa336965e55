"""The engine: requests in, tokens out. Host-side bookkeeping around the one jitted step."""

from __future__ import annotations

import dataclasses
import itertools
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jinfer.cache import abstract_cache, allocate_cache, fill_pages, kv_budget_bytes, kv_dtype, page_bytes, plan_memory, pool_sharding
from jinfer.config import EngineConfig
from jinfer.draft_heads import DraftHeads, check_heads, load_heads
from jinfer.decode_loop import DecodeLoopBatch
from jinfer.engine.batch import build_batch, decode_loop_batch, padding_batch, speculative_batch
from jinfer.engine.multihost import StepBroadcast
from jinfer.engine.page_allocator import PageAllocator
from jinfer.engine.request import Request
from jinfer.engine.scheduler import Schedule, Scheduler
from jinfer.engine.speculation import Speculator
from jinfer.model import Model
from jinfer.ops import backend as kernel_backend
from jinfer.sampling import SampleResult, SamplingParams
from jinfer.speculative import SpeculativeConfig
from jinfer.speculative_step import SpeculativeBatch, SpeculativeOutput
from jinfer.step import StepBatch, StepOutput
from jinfer.step_programs import JitStep, StepPrograms
from jinfer.tokenizer import IncrementalDetokenizer


@dataclasses.dataclass(frozen=True)
class TokenEvent:
    """One sampled token of one request, with the text it completes."""

    request: Request
    token_id: int
    text_delta: str
    finished: bool


class Engine:
    def __init__(
        self,
        model: Model,
        config: EngineConfig = EngineConfig(),
        *,
        measure_step_memory: bool = True,
        cache_fill: float = 0.0,
        poison_freed_pages: bool = False,
        seed: int = 0,
        speculative: SpeculativeConfig | None = None,
        draft_model: Model | None = None,
    ):
        """`measure_step_memory` compiles the largest bucket up front to report its temporaries;
        `cache_fill` and `poison_freed_pages` (NaN in tests) make stray reads of unused cache visible.
        `speculative` turns on speculative decoding (`draft_model`: the loaded model of method "draft";
        method "heads" loads its draft heads from `speculative.draft_heads`)."""
        config = dataclasses.replace(config, kernels=kernel_backend.for_mesh(config.kernels, model.mesh))
        self.model = model
        self.config = config
        self.multihost = StepBroadcast(config, model.mesh) if jax.process_count() > 1 else None
        if self.multihost is not None and poison_freed_pages:
            raise ValueError("poison_freed_pages is not supported in a multi-process run (only process 0 knows the freed pages)")
        self.speculative = speculative
        self.draft_model = draft_model
        self._draft_layers = self._check_speculative()
        self.draft_heads = self._load_draft_heads()
        self._step = StepPrograms(config.program_cache, model.config, model.dtype) if config.program_cache else JitStep(model.config, model.dtype)
        self.pool_sharding = pool_sharding(model.config, model.mesh)
        self.kv_dtype = kv_dtype(model.dtype, config.kv_cache_dtype)
        budget = kv_budget_bytes(config.kv_cache_memory, jax.local_devices()[0])
        if draft_model is not None:  # both pools share the page ids: split the budget by bytes per page
            target_bytes = page_bytes(model.config, config.page_size, self.kv_dtype, self.pool_sharding)
            budget = budget * target_bytes // (target_bytes + page_bytes(draft_model.config, config.page_size, draft_model.dtype))
        self.plan = plan_memory(model.config, model.params, config.page_size, budget, self.kv_dtype, kv_sharding=self.pool_sharding)
        if measure_step_memory:
            self.plan = dataclasses.replace(self.plan, step_temp_bytes=self._largest_step_temp_bytes())
        logging.info("%s", self.plan.table())
        self.kv_cache = allocate_cache(model.config, self.plan.num_pages, config.page_size, self.kv_dtype, cache_fill, self.pool_sharding)
        self.draft_cache = None
        if draft_model is not None:
            self.draft_cache = allocate_cache(draft_model.config, self.plan.num_pages, config.page_size, draft_model.dtype, cache_fill)
        self.allocator = PageAllocator(self.plan.num_pages)
        self.speculator = Speculator(speculative) if speculative is not None else None
        self.scheduler = Scheduler(config, self.allocator, self.speculator)
        self._requests: dict[str, Request] = {}
        self._detokenizers: dict[str, IncrementalDetokenizer] = {}
        self._arrivals = itertools.count()
        self._seeds = np.random.default_rng(seed)
        self._bucket_shapes: set[tuple[int, ...]] = set()
        self._speculative_shapes: set[tuple[int, ...]] = set()
        self._loop_shapes: set[tuple[int, ...]] = set()
        self._poison_value = cache_fill if poison_freed_pages else None
        self.last_output = None  # the last program's StepOutput, SpeculativeOutput or (fused decode) SampleResult [N, R]: for tests and debugging

    def _largest_step_temp_bytes(self) -> int | None:
        """Temporaries of the step at its largest bucket, from XLA's memory analysis (None if unavailable)."""
        largest = padding_batch(self.config, self.config.token_buckets[-1], self.config.seq_buckets[-1], self.config.page_buckets[-1])
        cache = abstract_cache(self.model.config, self.plan.num_pages, self.config.page_size, self.kv_dtype, self.pool_sharding)
        return self._step.temp_bytes(self.model.params, cache, largest)

    def _check_speculative(self) -> int:
        """Raises ValueError naming what does not fit; returns the self drafter's layer count (0 if none)."""
        spec, draft = self.speculative, self.draft_model
        if spec is None:
            if draft is not None:
                raise ValueError("a draft_model was given without speculative=SpeculativeConfig(method='draft', ...)")
            return 0
        if self.multihost is not None:
            raise ValueError(f"speculative decoding (method {spec.method!r}) is not supported in a multi-process run")
        if (spec.method == "draft") != (draft is not None):
            raise ValueError(f"speculative method {spec.method!r} {'needs a' if spec.method == 'draft' else 'takes no'} draft_model")
        if draft is not None:
            if draft.config.vocab_size != self.model.config.vocab_size:
                raise ValueError(
                    f"the draft model's vocabulary size {draft.config.vocab_size} differs from the target's {self.model.config.vocab_size}"
                )
            if draft.mesh is not None or self.model.mesh is not None:
                raise ValueError("speculative decoding with a draft model runs on one device (mesh=None)")
        return spec.draft_layers(self.model.config.num_layers) if spec.method == "self" else 0

    def _load_draft_heads(self) -> DraftHeads | None:
        """Method "heads": the heads checked against the target and k, placed beside the target's
        parameters (replicated over its mesh)."""
        spec = self.speculative
        if spec is None or spec.method != "heads":
            return None
        heads = load_heads(spec.draft_heads, self.model.dtype)
        check_heads(heads, self.model.config, spec.num_tokens, spec.draft_heads)
        mesh = self.model.mesh
        device = jax.devices()[0] if mesh is None else jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        return DraftHeads(jax.device_put(heads.params, device), heads.vocab_size)

    @property
    def bucket_shapes_used(self) -> set[tuple[int, ...]]:
        """(tokens, rows, pages per row, history width) of every plain step run so far."""
        return set(self._bucket_shapes)

    @property
    def speculative_shapes_used(self) -> set[tuple[int, ...]]:
        """(tokens, rows, pages per row, history width, draft slots K) of every speculative step run so far."""
        return set(self._speculative_shapes)

    @property
    def decode_loop_shapes_used(self) -> set[tuple[int, ...]]:
        """(tokens, rows, pages per row, history width, steps N) of every fused decode run so far."""
        return set(self._loop_shapes)

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raises ValueError naming the problem if the request could never run."""
        if not prompt_ids:
            raise ValueError("the prompt is empty: at least one token is needed")
        vocab = self.model.config.vocab_size
        bad = [t for t in prompt_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is out of the vocabulary (size {vocab})")
        if len(prompt_ids) >= self.config.max_model_len:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens does not fit max_model_len={self.config.max_model_len} (it needs room for one generated token)")
        longest = min(len(prompt_ids) + params.max_tokens, self.config.max_model_len)
        needed = self.scheduler.pages_needed(longest)
        if needed > self.plan.num_pages - 1:
            raise ValueError(
                f"a request of up to {longest} tokens needs {needed} KV pages but the pool has only {self.plan.num_pages - 1}; "
                "raise kv_cache_memory or lower max_tokens"
            )

    def add_request(self, prompt_ids: list[int], params: SamplingParams = SamplingParams(), request_id: str | None = None) -> Request:
        self.validate(prompt_ids, params)
        arrival = next(self._arrivals)
        request_id = request_id if request_id is not None else f"req-{arrival}"
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        seed = params.seed if params.seed is not None else int(self._seeds.integers(2**31))
        request = Request(request_id, list(prompt_ids), params, seed, arrival)
        self._requests[request_id] = request
        if self.model.tokenizer is not None:
            self._detokenizers[request_id] = self.model.tokenizer.detokenizer()
        self.scheduler.add(request)
        return request

    def abort(self, request_id: str) -> None:
        request = self._requests.pop(request_id, None)
        if request is None:
            raise KeyError(f"no request {request_id!r} in flight")
        self._detokenizers.pop(request_id, None)
        if self.speculator is not None:
            self.speculator.forget(request)
        self.scheduler.finish(request, "abort")

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[TokenEvent]:
        """Schedules, runs one jitted step, and applies the sampled tokens."""
        schedule = self.scheduler.schedule()
        self._poison_freed_pages()
        if self.speculator is not None:
            for request in schedule.preempted:  # recomputed later: that pass drafts afresh
                self.speculator.drop_drafts(request)
        if not schedule.rows:
            return []
        if self._fuses_decode_steps(schedule):
            return self._run_decode_loop(schedule)
        batch = build_batch(schedule, self.config)
        if self.speculator is not None and (self.speculative.method in ("draft", "heads") or schedule.speculates):
            width = self.speculative.num_tokens
            draft_config = None if self.draft_model is None else self.draft_model.config
            batch = speculative_batch(schedule, batch, width, self.speculative.method, self._draft_layers, draft_config)
            return self._apply_speculative(schedule, jax.device_get(self.run_batch(batch)))
        if self.multihost is not None:
            self.multihost.send(batch)
        self.run_batch(batch)
        return self._apply(schedule, jax.device_get(self.last_output.sampled))

    def _fuses_decode_steps(self, schedule: Schedule) -> bool:
        """Whether the schedule's rows run `fused_decode_steps` decode steps in one program: only when
        every running request decodes (nothing waits for its prefill), each has room for that many
        tokens, and their pages can be reserved without preempting anyone."""
        steps = self.config.fused_decode_steps
        if steps == 1 or self.speculator is not None or self.multihost is not None or self.scheduler.waiting:
            return False
        requests = [row.request for row in schedule.rows]
        if len(requests) != len(self.scheduler.running) or any(not row.samples or row.num_tokens != 1 for row in schedule.rows):
            return False
        room = min(min(r.params.max_tokens - len(r.output_ids), self.config.max_model_len - r.num_tokens) for r in requests)
        return room >= steps and self.scheduler.reserve_ahead(requests, steps - 1)

    def _run_decode_loop(self, schedule: Schedule) -> list[TokenEvent]:
        """Runs the fused decode steps, then applies each row's tokens in order until it finishes."""
        steps = self.config.fused_decode_steps
        batch = decode_loop_batch(schedule, build_batch(schedule, self.config), steps, self.config.page_size)
        sampled = jax.device_get(self.run_batch(batch))
        now = time.perf_counter()
        events = []
        for i, row in enumerate(schedule.rows):
            row.request.num_computed = row.start + steps  # the fed tokens; a request that stops early is done with them
            events += self._append_run(row.request, sampled.tokens[:, i], sampled.logprob[:, i], sampled.top_ids[:, i], sampled.top_logprobs[:, i], now)
        return events

    def run_batch(self, batch: StepBatch | SpeculativeBatch | DecodeLoopBatch) -> StepOutput | SpeculativeOutput | SampleResult:
        """Runs the step on a host batch and keeps the updated pool(s); in a multi-process run every
        process calls this with the same (plain) batch (see `engine.multihost`)."""
        device_batch = jax.tree.map(jnp.asarray, batch)
        if isinstance(batch, SpeculativeBatch):
            self._speculative_shapes.add((*_bucket_shape(batch.step), batch.draft_tokens.shape[1]))
            if self.draft_model is None:
                params = self.model.params if self.draft_heads is None else (self.model.params, self.draft_heads.params)
                self.kv_cache, self.last_output = self._step(params, self.kv_cache, device_batch)
            else:
                params = (self.model.params, self.draft_model.params)
                (self.kv_cache, self.draft_cache), self.last_output = self._step(params, (self.kv_cache, self.draft_cache), device_batch)
            return self.last_output
        if isinstance(batch, DecodeLoopBatch):
            self._loop_shapes.add((*_bucket_shape(batch.step), batch.keys.shape[0]))
        else:
            self._bucket_shapes.add(_bucket_shape(batch))
        self.kv_cache, self.last_output = self._step(self.model.params, self.kv_cache, device_batch)
        return self.last_output

    def _poison_freed_pages(self) -> None:
        """Fills pages freed since the last step before anything is written to them again."""
        freed, self.scheduler.freed_pages = self.scheduler.freed_pages, []
        if self._poison_value is not None and freed:
            pages = jnp.asarray(freed, jnp.int32)
            self.kv_cache = fill_pages(self.kv_cache, pages, self._poison_value)
            if self.draft_cache is not None:
                self.draft_cache = fill_pages(self.draft_cache, pages, self._poison_value)

    def _apply(self, schedule: Schedule, sampled) -> list[TokenEvent]:
        now = time.perf_counter()
        events = []
        for i, row in enumerate(schedule.rows):
            request = row.request
            request.num_computed = row.start + row.num_tokens
            if row.samples:
                events.append(self._append(request, int(sampled.tokens[i]), float(sampled.logprob[i]), sampled.top_ids[i], sampled.top_logprobs[i], now))
        return events

    def _apply_speculative(self, schedule: Schedule, output: SpeculativeOutput) -> list[TokenEvent]:
        """Commits each row's last token and its accepted drafts, then appends the new tokens one by
        one through the stop logic; a request that finishes drops the rest of its run. With draft
        heads, a row that goes on keeps the pass's drafts for its next pass."""
        now = time.perf_counter()
        events = []
        for i, row in enumerate(schedule.rows):
            request = row.request
            accepted = int(output.num_accepted[i])
            request.num_computed = row.start + row.num_tokens + accepted
            if not row.samples:
                continue
            if row.num_drafts:
                self.speculator.record(request, row.num_drafts, accepted)
            run = slice(0, accepted + 1)
            events += self._append_run(request, output.tokens[i, run], output.logprob[i, run], output.top_ids[i, run], output.top_logprobs[i, run], now)
            if self.draft_heads is not None and not request.finished:
                self.speculator.store_drafts(request, output.next_drafts[i].tolist())
        return events

    def _append_run(self, request: Request, tokens, logprobs, top_ids, top_logprobs, now: float) -> list[TokenEvent]:
        """Appends a run of generated tokens ([n], with logprobs [n] and alternatives [n, k]) until one
        finishes the request; the rest are dropped."""
        events = []
        for j, token in enumerate(tokens):
            events.append(self._append(request, int(token), float(logprobs[j]), top_ids[j], top_logprobs[j], now))
            if events[-1].finished:
                break
        return events

    def _append(self, request: Request, token: int, logprob: float, top_ids, top_logprobs, now: float) -> TokenEvent:
        """Appends one generated token (top_ids, top_logprobs: [n] alternatives) and applies the stop rules."""
        request.output_ids.append(token)
        request.logprobs.append(logprob)
        if request.params.logprobs:
            count = request.params.logprobs
            request.top_logprobs.append(dict(zip(top_ids[:count].tolist(), top_logprobs[:count].tolist())))
        if request.first_token_time is None:
            request.first_token_time = now
        reason = self._extend_text(request, token)
        if reason:
            self.scheduler.finish(request, reason)
            self._requests.pop(request.request_id, None)
            self._detokenizers.pop(request.request_id, None)
            if self.speculator is not None:
                self.speculator.forget(request)
        return TokenEvent(request, token, self._new_text(request), reason is not None)

    def _extend_text(self, request: Request, token: int) -> str | None:
        """Appends the token's text; returns the finish reason if the request is done."""
        detokenizer = self._detokenizers.get(request.request_id)
        if detokenizer is not None:
            request.text += detokenizer.add(token)
        params = request.params
        eos_ids = () if params.ignore_eos or self.model.tokenizer is None else self.model.tokenizer.eos_token_ids
        if token in params.stop_token_ids or token in eos_ids:
            reason = "stop"
        elif len(request.output_ids) >= params.max_tokens or request.num_tokens >= self.config.max_model_len:
            reason = "length"
        else:
            reason = None
        if reason and detokenizer is not None:
            request.text += detokenizer.flush()
        cuts = [cut for cut in (request.text.find(stop) for stop in params.stop) if cut >= 0]
        if cuts:
            request.text = request.text[: min(cuts)]
            return "stop"
        return reason

    def _new_text(self, request: Request) -> str:
        """Text not yet emitted; while running, holds back what could be the start of a stop string."""
        holdback = 0 if request.finished or not request.params.stop else max(map(len, request.params.stop)) - 1
        end = max(request.emitted_chars, len(request.text) - holdback)
        delta = request.text[request.emitted_chars : end]
        request.emitted_chars = end
        return delta


def _bucket_shape(batch: StepBatch) -> tuple[int, ...]:
    """(tokens, rows, pages per row, history width) of a built batch."""
    return (batch.tokens.shape[0], *batch.page_table.shape, batch.history.shape[1])
