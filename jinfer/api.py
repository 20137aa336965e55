"""The Python API for research code: `LLM(model).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence

from tqdm import tqdm

from jinfer.config import SERVING_DEFAULTS, EngineConfig
from jinfer.defaults import default_model_path
from jinfer.engine import multihost
from jinfer.engine.engine import Engine
from jinfer.engine.request import Request
from jinfer.model import load
from jinfer.sampling import SamplingParams
from jinfer.speculative import SpeculativeConfig

Prompt = str | Sequence[int]


@dataclasses.dataclass(frozen=True)
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[float]  # log-probability of each generated token
    top_logprobs: list[dict[int, float]]  # per token, the top-n alternatives (when requested)
    finish_reason: str


@dataclasses.dataclass(frozen=True)
class RequestMetrics:
    arrival_time: float
    first_token_time: float
    finish_time: float
    num_preemptions: int

    @property
    def time_to_first_token(self) -> float:
        return self.first_token_time - self.arrival_time


@dataclasses.dataclass(frozen=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    metrics: list[RequestMetrics]


@dataclasses.dataclass(frozen=True)
class StreamChunk:
    token_id: int
    text: str  # the new text this token completes (may be empty mid-character)
    finish_reason: str | None


class LLM:
    """A model and its serving engine. `engine_options` are EngineConfig fields (SERVING_DEFAULTS where unset)."""

    def __init__(
        self,
        model: str | os.PathLike | None = None,
        *,
        dtype="float32",
        mesh=None,
        seed: int = 0,
        quantize: str | None = None,
        group_size: int | None = None,
        quantize_lm_head: bool = True,
        speculative: SpeculativeConfig | None = None,
        **engine_options,
    ):
        """`quantize` ("int8" / "int4" / "w4a8" / "w4a16" with `group_size`, "w8a8", "gguf"): quantization on load
        (jinfer.load), the LM head too unless `quantize_lm_head` is False.
        `speculative`: speculative decoding (n-gram lookup, self-drafting, a draft model loaded from
        `speculative.draft_model` like the target, or the draft heads saved at `speculative.draft_heads`
        by tools/train_draft_heads.py)."""
        path = model if model is not None else default_model_path()
        self.model = load(path, dtype=dtype, mesh=mesh, quantize=quantize, group_size=group_size, quantize_lm_head=quantize_lm_head)
        draft = None if speculative is None or speculative.draft_model is None else load(speculative.draft_model, dtype=dtype, mesh=mesh)
        self.engine = Engine(self.model, EngineConfig(**{**SERVING_DEFAULTS, **engine_options}), seed=seed, speculative=speculative, draft_model=draft)

    @property
    def tokenizer(self):
        return self.model.tokenizer

    def follow(self) -> int:
        """In a multi-process run (`jinfer.distributed`), on every process but 0: runs the steps
        process 0 sends until it calls `stop_followers()`; returns the number of steps."""
        return multihost.follow(self.engine)

    def stop_followers(self) -> None:
        """On process 0 of a multi-process run: lets the other processes return from `follow()`.
        Does nothing in a single-process run."""
        if self.engine.multihost is not None:
            self.engine.multihost.send_stop()

    def _token_ids(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass prompts as token id lists")
            return self.tokenizer.encode(prompt)
        return [int(t) for t in prompt]

    def _submit(self, prompts: Sequence[Prompt], params: Sequence[SamplingParams]) -> list[list[Request]]:
        """Validates every prompt first, so a bad one is reported before anything is queued."""
        ids = [self._token_ids(p) for p in prompts]
        for prompt_ids, p in zip(ids, params):
            self.engine.validate(prompt_ids, p)
        groups = []
        for prompt_ids, p in zip(ids, params):
            seeds = [None if p.seed is None else p.seed + i for i in range(p.n)]
            groups.append([self.engine.add_request(prompt_ids, dataclasses.replace(p, seed=s)) for s in seeds])
        return groups

    def generate(self, prompts: Prompt | Sequence[Prompt], sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, *, use_tqdm: bool = True) -> list[RequestOutput]:
        """Generates for every prompt (continuous batching); outputs in prompt order."""
        single = isinstance(prompts, str) or (len(prompts) > 0 and isinstance(prompts[0], int))
        prompts = [prompts] if single else list(prompts)
        params = _params_per_prompt(sampling_params, len(prompts))
        groups = self._submit(prompts, params)
        pending = {id(r) for group in groups for r in group}
        with tqdm(total=len(pending), desc="generating", unit="seq", disable=not use_tqdm) as bar:
            while pending:
                for event in self.engine.step():
                    if event.finished and id(event.request) in pending:
                        pending.discard(id(event.request))
                        bar.update(1)
        return [_request_output(prompt, group) for prompt, group in zip(prompts, groups)]

    def stream(self, prompt: Prompt, sampling_params: SamplingParams | None = None) -> Iterator[StreamChunk]:
        """Yields each token of one completion as it is produced (other requests keep running)."""
        params = sampling_params or SamplingParams()
        if params.n != 1:
            raise ValueError(f"stream() yields one completion; got n={params.n}")
        (request,) = self._submit([prompt], [params])[0]
        while not request.finished:
            for event in self.engine.step():
                if event.request is request:
                    yield StreamChunk(event.token_id, event.text_delta, request.finish_reason if event.finished else None)

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params=None, *, use_tqdm: bool = True) -> list[RequestOutput]:
        """Applies the model's chat template to each conversation, then generates."""
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer, so no chat template")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        texts = [self.tokenizer.apply_chat_template(c, add_generation_prompt=True) for c in conversations]
        prompts = [self.tokenizer.encode(t, add_special_tokens=False) for t in texts]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)


def _params_per_prompt(sampling_params, count: int) -> list[SamplingParams]:
    if sampling_params is None:
        return [SamplingParams()] * count
    if isinstance(sampling_params, SamplingParams):
        return [sampling_params] * count
    if len(sampling_params) != count:
        raise ValueError(f"got {len(sampling_params)} SamplingParams for {count} prompts")
    return list(sampling_params)


def _request_output(prompt: Prompt, group: list[Request]) -> RequestOutput:
    first = group[0]
    outputs = [
        CompletionOutput(i, r.text, list(r.output_ids), list(r.logprobs), list(r.top_logprobs), r.finish_reason) for i, r in enumerate(group)
    ]
    metrics = [RequestMetrics(r.arrival_time, r.first_token_time, r.finish_time, r.num_preemptions) for r in group]
    return RequestOutput(first.request_id, prompt if isinstance(prompt, str) else None, list(first.prompt_ids), outputs, metrics)
