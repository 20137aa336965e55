"""Smoke test of the serving benchmark on a tiny random model: structure and sanity, never speed."""

import json
import math

import pytest

from hf_reference import save_tiny_model
from jinfer.bench import BenchmarkOptions, format_table, run_benchmark, write_json

MEASUREMENTS = ("prefill_32", "decode_b1", "decode_b2")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny_llama")
    save_tiny_model("llama", directory)
    return str(directory)


@pytest.fixture(scope="module")
def results(tiny_model):
    options = BenchmarkOptions(
        model=tiny_model,
        num_prompts=4,
        prompt_lens=(4, 12),
        output_lens=(2, 6),
        prefill_tokens=32,
        batch_sizes=(1, 2),
        decode_steps=3,
        repeats=1,
        kv_cache_memory="4MiB",
        progress=False,
    )
    return run_benchmark(options)


def _positive(value) -> bool:
    return math.isfinite(value) and value > 0


def test_every_measurement_has_a_positive_rate(results):
    for key in MEASUREMENTS:
        assert _positive(results[key]["tokens_per_s"]), key
        assert _positive(results["baseline"][key]["tokens_per_s"]), key
    assert results["decode_b2"]["batch_size"] == 2
    assert results["decode_b2"]["steps"] == 3


def test_offline_counts_every_prompt(results):
    offline = results["offline"]
    assert offline["num_prompts"] == 4
    assert 4 * 2 <= offline["output_tokens"] <= 4 * 6
    for field in ("input_tokens_per_s", "output_tokens_per_s", "ttft_ms_p50", "ttft_ms_p99", "tpot_ms_p50", "tpot_ms_p99"):
        assert _positive(offline[field]), field
    assert offline["ttft_ms_p50"] <= offline["ttft_ms_p99"]


def test_config_and_compile_time(results):
    config = results["config"]
    assert config["dtype"] == "float32"
    assert config["engine"]["max_num_batched_tokens"] >= 32
    assert config["baseline"]["torch_threads"] >= 1
    assert results["compile_s"] >= 0


def test_table_and_json(results, tmp_path):
    table = format_table(results)
    for label in ("prefill 32 tokens", "decode batch 1", "decode batch 2", "offline TTFT p99"):
        assert label in table
    path = tmp_path / "bench.json"
    write_json(results, path)
    assert json.loads(path.read_text())["decode_b1"] == results["decode_b1"]


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="batch_sizes"):
        BenchmarkOptions(batch_sizes=(0,))
    with pytest.raises(ValueError, match="prompt_lens"):
        BenchmarkOptions(prompt_lens=(50, 10))


def test_a_kv_pool_too_small_for_the_decode_batch_is_named(tiny_model):
    options = BenchmarkOptions(model=tiny_model, batch_sizes=(64,), prefill_tokens=64, kv_cache_memory="100KiB", progress=False)
    with pytest.raises(ValueError, match="kv_cache_memory='100KiB'"):
        run_benchmark(options)
