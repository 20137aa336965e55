"""The serving engine on tiny models: exactness against the full-sequence forward, batching,
preemption, poisoned pages, seeds, compile counts and bad input."""

import numpy as np
import pytest

import jinfer
from hf_reference import VOCAB, save_tiny_model
from jinfer import config as config_lib
from jinfer.config import EngineConfig
from jinfer.engine.engine import Engine
from jinfer.model import Model, init_params
from jinfer.sampling import SamplingParams
from jinfer.step import step as step_fn
from pallas_kernels.testing import assert_close

NAN = float("nan")
GREEDY = SamplingParams(temperature=0.0, max_tokens=10)
SMALL = EngineConfig(max_num_seqs=16, max_model_len=96, max_num_batched_tokens=64, page_size=8, kv_cache_memory="2MiB")


@pytest.fixture(scope="module", params=["llama", "gemma2"])
def tiny(request, tmp_path_factory):
    """Architectures whose attention differs (gemma2: windows, soft-caps), for the exactness tests."""
    directory = tmp_path_factory.mktemp(request.param)
    save_tiny_model(request.param, directory)
    return jinfer.load(directory)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """One architecture for the tests of scheduling and bookkeeping."""
    directory = tmp_path_factory.mktemp("llama")
    save_tiny_model("llama", directory)
    return jinfer.load(directory)


def _engine(model, config, **options):
    """Engines in these tests skip the up-front compile that measures step temporaries."""
    return Engine(model, config, measure_step_memory=False, **options)


def _prompts(count, seed=0, low=2, high=40):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, VOCAB, int(n)).tolist() for n in rng.integers(low, high, count)]


def _run(engine, prompts, params):
    params = params if isinstance(params, list) else [params] * len(prompts)
    requests = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    while engine.has_unfinished():
        engine.step()
    return [r.output_ids for r in requests]


def test_greedy_matches_the_full_sequence_forward(tiny):
    prompts = _prompts(3, seed=1)
    outputs = _run(_engine(tiny, SMALL, cache_fill=NAN), prompts, GREEDY)
    assert outputs == [tiny.greedy_continuation(p, GREEDY.max_tokens) for p in prompts]


def test_batch_invariance(llama):
    prompts = _prompts(16, seed=2)
    batched = _run(_engine(llama, SMALL, cache_fill=NAN), prompts, GREEDY)
    alone = [_run(_engine(llama, SMALL, cache_fill=NAN), [p], GREEDY)[0] for p in prompts[:2]]
    assert batched[:2] == alone


@pytest.mark.parametrize("chunk", [1, 7, 64])
@pytest.mark.parametrize("page_size", [8, 16])
def test_step_logits_equal_full_forward(tiny, chunk, page_size):
    config = EngineConfig(max_num_seqs=1, max_model_len=128, max_num_batched_tokens=chunk, page_size=page_size, kv_cache_memory="2MiB")
    engine = _engine(tiny, config, cache_fill=NAN)
    prompt = _prompts(1, seed=3, low=40, high=41)[0]
    request = engine.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=6))
    step_logits = {}
    while engine.has_unfinished():
        engine.step()
        last_position = request.num_computed - 1
        step_logits[last_position] = np.asarray(engine.last_output.logits)[0]
    full = tiny.logits(np.asarray([request.token_ids]))[0]
    positions = sorted(step_logits)
    assert len(positions) >= 6
    assert_close(np.stack([step_logits[p] for p in positions]), full[positions])


def test_preempted_requests_recompute_the_same_tokens(llama):
    prompts = _prompts(6, seed=4, low=20, high=30)
    params = SamplingParams(temperature=0.0, max_tokens=24)
    roomy = _run(_engine(llama, SMALL), prompts, params)
    cramped_config = EngineConfig(max_num_seqs=6, max_model_len=96, max_num_batched_tokens=64, page_size=8, kv_cache_memory="80KiB")
    cramped = _engine(llama, cramped_config, cache_fill=NAN, poison_freed_pages=True)
    requests = [cramped.add_request(p, params) for p in prompts]
    while cramped.has_unfinished():
        cramped.step()
    assert sum(r.num_preemptions for r in requests) > 0
    assert [r.output_ids for r in requests] == roomy
    assert cramped.allocator.num_free == cramped.plan.num_pages - 1


def test_freed_pages_poisoned_with_nan_never_reach_outputs(llama):
    engine = _engine(llama, SMALL, cache_fill=NAN, poison_freed_pages=True)
    first_wave = _prompts(8, seed=5)
    second_wave = _prompts(8, seed=6)
    _run(engine, first_wave, GREEDY)
    requests = [engine.add_request(p, SamplingParams(temperature=0.0, max_tokens=10, logprobs=3)) for p in second_wave]
    while engine.has_unfinished():
        engine.step()
        assert np.all(np.isfinite(np.asarray(engine.last_output.logits)[: len(engine.scheduler.running)]))
    assert [r.output_ids for r in requests] == [llama.greedy_continuation(p, 10) for p in second_wave]
    assert all(np.isfinite(r.logprobs).all() for r in requests)


def test_seeded_sampling_reproduces_whatever_shares_the_batch(llama):
    prompt = _prompts(1, seed=7)[0]
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=12)
    alone = _run(_engine(llama, SMALL), [prompt], params)[0]
    crowd = _prompts(5, seed=8)
    mixed = _run(_engine(llama, SMALL), crowd[:2] + [prompt] + crowd[2:], [SamplingParams(temperature=0.7, max_tokens=12)] * 2 + [params] + [GREEDY] * 3)
    assert mixed[2] == alone
    other_seed = _run(_engine(llama, SMALL), [prompt], SamplingParams(temperature=1.0, top_p=0.9, seed=99, max_tokens=12))[0]
    assert other_seed != alone


def test_abort_returns_pages(llama):
    engine = _engine(llama, SMALL)
    request = engine.add_request(_prompts(1, seed=9, low=30, high=31)[0], GREEDY)
    engine.step()
    assert engine.allocator.num_free < engine.plan.num_pages - 1
    engine.abort(request.request_id)
    assert request.finish_reason == "abort"
    assert engine.allocator.num_free == engine.plan.num_pages - 1


@pytest.mark.parametrize(
    "prompt, params, message",
    [
        ([], GREEDY, "empty"),
        ([1] * 96, GREEDY, "96 tokens"),
        ([1, VOCAB + 5], GREEDY, str(VOCAB + 5)),
    ],
)
def test_bad_requests_are_named_and_others_finish(llama, prompt, params, message):
    engine = _engine(llama, SMALL, cache_fill=NAN)
    good = _prompts(3, seed=10)
    requests = [engine.add_request(p, GREEDY) for p in good]
    engine.step()
    with pytest.raises(ValueError, match=message):
        engine.add_request(prompt, params)
    while engine.has_unfinished():
        engine.step()
    assert [r.output_ids for r in requests] == [llama.greedy_continuation(p, GREEDY.max_tokens) for p in good]


@pytest.mark.parametrize(
    "field, value",
    [("max_tokens", 0), ("temperature", -0.5), ("top_p", 0.0), ("top_p", 1.5)],
)
def test_invalid_sampling_values_are_named(field, value):
    with pytest.raises(ValueError, match=f"{field}.*{value}"):
        SamplingParams(**{field: value})


def test_out_of_pages_request_is_named(llama):
    engine = _engine(llama, EngineConfig(max_num_seqs=2, max_model_len=96, max_num_batched_tokens=64, page_size=8, kv_cache_memory="24KiB"))
    with pytest.raises(ValueError, match="pages"):
        engine.add_request([1] * 60, SamplingParams(max_tokens=30))


def test_mixed_workload_compiles_once_per_bucket():
    config, _ = config_lib.read_preset("smollm2-135m")
    config = config.replace(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8, layer_windows=(0,))
    model = Model(config, init_params(config, seed=3), None, np.dtype(np.float32))
    engine_config = EngineConfig(max_num_seqs=8, max_model_len=64, max_num_batched_tokens=32, page_size=8, kv_cache_memory="1MiB")
    engine = _engine(model, engine_config)
    rng = np.random.default_rng(11)
    compiled_before = step_fn._cache_size()
    for i in range(200):
        prompt = rng.integers(0, VOCAB, int(rng.integers(1, 40))).tolist()
        params = SamplingParams(temperature=float(rng.choice([0.0, 0.8])), top_k=int(rng.choice([0, 5])), top_p=float(rng.choice([1.0, 0.9])), seed=i, max_tokens=int(rng.integers(1, 24)))
        engine.add_request(prompt, params)
        if i % 3 == 0:
            engine.step()
    while engine.has_unfinished():
        engine.step()
    all_buckets = len(engine_config.token_buckets) * len(engine_config.seq_buckets) * len(engine_config.page_buckets)
    compiled = step_fn._cache_size() - compiled_before
    assert compiled == len(engine.bucket_shapes_used) <= all_buckets


def test_memory_plan_reports_pages_and_step_temporaries(llama):
    engine = Engine(llama, SMALL)
    per_page = llama.config.num_layers * 2 * SMALL.page_size * llama.config.num_kv_heads * llama.config.head_dim * 4
    assert engine.plan.num_pages == 2 * 2**20 // per_page
    assert engine.plan.step_temp_bytes > 0
    assert "step temporaries" in engine.plan.table() and str(engine.plan.num_pages) in engine.plan.table()
