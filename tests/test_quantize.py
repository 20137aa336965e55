"""Weight-only quantization on load: the quantized model computes exactly what the float model computes
with the dequantized weights, stays close to the float model, and refuses bad settings by name."""

import jax
import numpy as np
import pytest

import jinfer
from hf_reference import VOCAB, save_tiny_model
from jinfer.config import EngineConfig
from jinfer.engine.engine import Engine
from jinfer.quantize import quantize_params
from jinfer.sampling import SamplingParams
from pallas_kernels.quantized_matmul import Int4Weights, Int8Weights, dequantize
from pallas_kernels.testing import assert_close

TOKENS = np.random.default_rng(0).integers(0, VOCAB, (2, 12))
MODES = [("int8", None, Int8Weights), ("int8", 32, Int8Weights), ("int4", 32, Int4Weights)]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama")
    save_tiny_model("llama", directory, overrides={"intermediate_size": 96})
    return directory


@pytest.fixture(scope="module")
def float_model(tiny_dir):
    return jinfer.load(tiny_dir)


def with_dequantized_kernels(float_model, quantized_params):
    """The float model whose kernels are replaced by the dequantized quantized ones, reshaped back."""

    def restore(float_leaf, quantized_leaf):
        if isinstance(quantized_leaf, (Int8Weights, Int4Weights)):
            return dequantize(quantized_leaf).reshape(float_leaf.shape)
        return float_leaf

    is_quantized = lambda leaf: isinstance(leaf, (Int8Weights, Int4Weights))  # noqa: E731
    params = jax.tree.map(restore, float_model.params, quantized_params, is_leaf=is_quantized)
    return jinfer.Model(float_model.config, params, None, float_model.dtype)


@pytest.mark.parametrize("mode, group_size, layout", MODES)
def test_quantized_model_equals_the_float_model_on_dequantized_weights(tiny_dir, float_model, mode, group_size, layout):
    quantized = jinfer.load(tiny_dir, quantize=mode, group_size=group_size)
    kernels = [leaf for leaf in jax.tree.leaves(quantized.params, is_leaf=lambda x: isinstance(x, layout)) if isinstance(leaf, layout)]
    untied_head = not float_model.config.tie_word_embeddings
    assert len(kernels) == 7 * float_model.config.num_layers + untied_head  # q, k, v, o, gate, up, down (+ lm_head)
    logits = quantized.logits(TOKENS)
    assert_close(logits, with_dequantized_kernels(float_model, quantized.params).logits(TOKENS))
    assert_close(logits, float_model.logits(TOKENS), atol=0.05 if mode == "int8" else 0.5)


def test_the_engine_serves_a_quantized_model(tiny_dir):
    model = jinfer.load(tiny_dir, quantize="int8")
    engine = Engine(model, EngineConfig(max_num_seqs=2, max_model_len=32, max_num_batched_tokens=8, page_size=8, kv_cache_memory="512KiB"), measure_step_memory=False)
    prompt = TOKENS[0, :5].tolist()
    request = engine.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=6))
    while engine.has_unfinished():
        engine.step()
    assert request.output_ids == model.greedy_continuation(prompt, 6)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"quantize": "int3"}, "int3"),
        ({"quantize": "int4"}, "group_size"),
        ({"quantize": "int8", "group_size": 48}, "group_size=48"),
    ],
)
def test_bad_settings_are_named(tiny_dir, options, message):
    with pytest.raises(ValueError, match=message):
        jinfer.load(tiny_dir, **options)


def test_a_group_size_that_does_not_fit_a_layer_names_it(float_model):
    with pytest.raises(ValueError, match="_proj/kernel: group_size=128 does not divide its 64 input features"):
        quantize_params(float_model.params, "int8", 128)
