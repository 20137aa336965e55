"""Serialized step programs: a second engine on the same directory neither traces the model nor
compiles (it loads the saved executables), and its tokens equal those of an engine that jits the step
in-process (single steps and fused decode loops)."""

import dataclasses

import jax
import numpy as np
import pytest

import jinfer
from hf_reference import VOCAB, save_tiny_model
from jinfer.cache import abstract_cache
from jinfer.config import EngineConfig
from jinfer.engine.batch import padding_batch
from jinfer.engine.engine import Engine
from jinfer.models.transformer import Transformer
from jinfer.sampling import SamplingParams
from jinfer.step_programs import FIRST_PROGRAM_FILE, StepPrograms

CONFIG = EngineConfig(max_num_seqs=2, max_model_len=32, max_num_batched_tokens=8, page_size=8, kv_cache_memory="512KiB", fused_decode_steps=2)
PARAMS = [SamplingParams(temperature=0.0, max_tokens=5), SamplingParams(temperature=0.8, top_p=0.9, seed=3, max_tokens=5)]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama")
    save_tiny_model("llama", directory)
    return jinfer.load(directory)


def generate(engine):
    prompts = [np.random.default_rng(i).integers(0, VOCAB, 3 + 4 * i).tolist() for i in range(len(PARAMS))]
    requests = [engine.add_request(prompt, params) for prompt, params in zip(prompts, PARAMS)]
    while engine.has_unfinished():
        engine.step()
    return [request.output_ids for request in requests]


def test_a_warm_engine_runs_the_saved_programs_without_tracing(llama, tmp_path, monkeypatch):
    config = dataclasses.replace(CONFIG, program_cache=str(tmp_path))
    expected = generate(Engine(llama, CONFIG, measure_step_memory=False))
    cold = Engine(llama, config)
    assert generate(cold) == expected
    saved = sorted(tmp_path.glob("step-*.jaxexport"))
    assert cold.decode_loop_shapes_used and len(saved) > len(cold.bucket_shapes_used)  # plain steps and a fused decode loop

    def no_tracing(*args, **kwargs):
        raise AssertionError("the model was traced although its step programs are saved")

    def no_compiling(*args, **kwargs):
        raise AssertionError("an exported program was compiled although its executable is saved")

    assert len(list(tmp_path.glob("step-*.executable"))) == len(saved)
    monkeypatch.setattr(Transformer, "__call__", no_tracing)
    monkeypatch.setattr(StepPrograms, "_program", no_compiling)
    warm = Engine(llama, config)
    first = (tmp_path / FIRST_PROGRAM_FILE).read_text()
    assert warm._step._prefetch.path == tmp_path / first  # the program the cold engine ran first, loading already
    assert warm.plan.step_temp_bytes == cold.plan.step_temp_bytes > 0
    donated = jax.tree.leaves(warm.kv_cache)
    assert generate(warm) == expected
    assert warm._step._prefetch is None  # taken by the first step
    assert all(leaf.is_deleted() for leaf in donated)
    assert sorted(tmp_path.glob("step-*.jaxexport")) == saved
    assert len(list(tmp_path.glob("step-*.temp_bytes.json"))) == 1


def test_each_model_config_gets_its_own_program(llama, tmp_path):
    batch = padding_batch(CONFIG, 1, 1, 4)
    for config in (llama.config, llama.config.replace(rms_norm_eps=1e-3)):
        programs = StepPrograms(tmp_path, config, llama.dtype)
        programs.temp_bytes(llama.params, abstract_cache(config, 8, CONFIG.page_size, llama.dtype), batch)
    assert len(list(tmp_path.glob("step-*.jaxexport"))) == 2


def test_an_unloadable_executable_is_compiled_again(llama, tmp_path):
    batch = padding_batch(CONFIG, 1, 1, 4)
    cache = abstract_cache(llama.config, 8, CONFIG.page_size, llama.dtype)
    expected = StepPrograms(tmp_path, llama.config, llama.dtype).temp_bytes(llama.params, cache, batch)
    (executable,) = tmp_path.glob("step-*.executable")
    executable.write_bytes(b"not an executable")
    for json_file in tmp_path.glob("step-*.temp_bytes.json"):
        json_file.unlink()
    assert StepPrograms(tmp_path, llama.config, llama.dtype).temp_bytes(llama.params, cache, batch) == expected
    assert executable.read_bytes() != b"not an executable"
