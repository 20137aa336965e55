"""Fused decode steps (`fused_decode_steps`): the same tokens and logprobs as single steps, for
greedy and seeded sampled rows, penalties, stops inside a fused run, and requests that arrive or
run out of room meanwhile."""

import dataclasses

import numpy as np
import pytest

import jinfer
from hf_reference import VOCAB, save_tiny_model
from jinfer.config import EngineConfig
from jinfer.engine.engine import Engine
from jinfer.sampling import SamplingParams

CONFIG = EngineConfig(max_num_seqs=4, max_model_len=48, max_num_batched_tokens=16, page_size=4, kv_cache_memory="256KiB")
PARAMS = [
    SamplingParams(temperature=0.0, max_tokens=13, logprobs=3),
    SamplingParams(temperature=0.9, top_k=40, seed=7, max_tokens=11),
    SamplingParams(temperature=0.7, top_p=0.8, repetition_penalty=1.3, frequency_penalty=0.5, seed=1, max_tokens=9),
    SamplingParams(temperature=0.0, presence_penalty=1.0, max_tokens=17),
]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama")
    save_tiny_model("llama", directory)
    return jinfer.load(directory)


def _prompts(count: int) -> list[list[int]]:
    rng = np.random.default_rng(5)
    return [rng.integers(0, VOCAB, int(n)).tolist() for n in rng.integers(3, 12, count)]


def _run(engine: Engine, prompts, params, late: int = 0):
    """Runs `prompts`, adding the last `late` of them after the first step; -> [(tokens, logprobs, top logprobs, reason)]."""
    requests = [engine.add_request(p, sp) for p, sp in zip(prompts[: len(prompts) - late], params)]
    engine.step()
    requests += [engine.add_request(p, sp) for p, sp in zip(prompts[len(prompts) - late :], params[len(prompts) - late :])]
    while engine.has_unfinished():
        engine.step()
    return [(r.output_ids, r.logprobs, r.top_logprobs, r.finish_reason) for r in requests]


def _engine(model, steps: int, **config) -> Engine:
    config = dataclasses.replace(CONFIG, fused_decode_steps=steps, **config)
    return Engine(model, config, measure_step_memory=False, cache_fill=float("nan"), poison_freed_pages=True)


@pytest.mark.parametrize("late", (0, 2))
def test_fused_steps_give_the_tokens_of_single_steps(llama, late):
    prompts = _prompts(len(PARAMS))
    expected = _run(_engine(llama, 1), prompts, PARAMS, late)
    fused = _engine(llama, 4)
    outputs = _run(fused, prompts, PARAMS, late)
    assert fused.decode_loop_shapes_used, "no fused decode ran"
    for (tokens, logprobs, top, reason), (tokens_1, logprobs_1, top_1, reason_1) in zip(outputs, expected):
        assert (tokens, reason) == (tokens_1, reason_1)
        np.testing.assert_allclose(logprobs, logprobs_1, rtol=1e-5, atol=1e-5)
        assert [list(t) for t in top] == [list(t) for t in top_1]


def test_a_stop_inside_a_fused_run_drops_the_tokens_after_it(llama):
    prompts = _prompts(2)
    free = [SamplingParams(temperature=0.0, max_tokens=16)] * 2
    reference = _run(_engine(llama, 1), prompts, free)
    stop_token = reference[0][0][5]  # the sixth greedy token: inside the second fused run of 4
    first = reference[0][0].index(stop_token)
    params = [dataclasses.replace(free[0], stop_token_ids=(stop_token,)), free[1]]
    fused = _engine(llama, 4)
    (tokens, *_, reason), (other, *_) = _run(fused, prompts, params)
    assert (tokens, reason) == (reference[0][0][: first + 1], "stop")
    assert other == reference[1][0]
    assert fused.allocator.num_free == fused.plan.num_pages - 1, "a fused run's reserved pages leaked"


def test_when_pages_run_out_single_steps_preempt_as_without_fusing(llama):
    """Two requests growing to 32 tokens need 16 four-token pages; the pool has 12 usable."""
    prompts = _prompts(2)
    params = [SamplingParams(temperature=0.0, max_tokens=32 - len(p)) for p in prompts]
    expected = [tokens for tokens, *_ in _run(_engine(llama, 1), prompts, params)]
    page_bytes = Engine(llama, CONFIG, measure_step_memory=False).plan.bytes_per_page
    small = _engine(llama, 4, kv_cache_memory=page_bytes * 13)
    assert small.plan.num_pages == 13
    requests = [small.add_request(p, sp) for p, sp in zip(prompts, params)]
    while small.has_unfinished():
        small.step()
    assert [r.output_ids for r in requests] == expected
    assert small.decode_loop_shapes_used and any(r.num_preemptions for r in requests)
