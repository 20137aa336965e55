"""Quantized SmolLM2-135M-Instruct against its float32 self: perplexity on real English text and greedy text."""

import dataclasses

import numpy as np
import pytest
from flax import traverse_util
from pydoc_data.topics import topics

import jinfer
from jinfer.eval.perplexity import perplexity
from jinfer.quantize import quantize_params
from pallas_kernels.quantized_matmul import Int4Weights, dequantize

pytestmark = pytest.mark.slow

TEXT_TOKENS = 512  # of "The standard type hierarchy" (pydoc_data, part of every CPython); tools/perplexity.py runs it all
# Prompts whose float32 greedy continuation never has its top two logits within DECISIVE of each
# other: closer calls flip under any perturbation (transformers and llama.cpp part there too), e.g.
# "The capital of France is" has a 0.067 gap at its 9th token, and int8 takes the other token.
PROMPTS = ("Write a haiku about the sea.", "def quicksort(items):", "What is 2+2?")
GREEDY_TOKENS = 16
DECISIVE = 0.1


@pytest.fixture(scope="module")
def f32(smollm2):
    return smollm2


@pytest.fixture(scope="module")
def token_ids(f32):
    return f32.tokenizer.encode(topics["types"])[:TEXT_TOKENS]


def quantized(model, mode, group_size=None):
    return dataclasses.replace(model, params=quantize_params(model.params, mode, group_size))


@pytest.fixture(scope="module")
def reference_perplexity(f32, token_ids):
    return perplexity(f32, token_ids, window=512, stride=256).perplexity


@pytest.mark.parametrize(
    "mode, group_size, kv_cache_dtype, allowed",
    [("int8", None, "auto", 0.01), ("int4", 32, "auto", 0.05), ("w4a8", 32, "auto", 0.05), ("w4a16", 32, "auto", 0.05), (None, None, "int8", 0.01)],
    ids=["int8_weights", "int4_g32_weights", "w4a8_g32", "w4a16_g32", "int8_kv"],
)
def test_perplexity_stays_close(f32, token_ids, reference_perplexity, mode, group_size, kv_cache_dtype, allowed):
    model = f32 if mode is None else quantized(f32, mode, group_size)
    ours = perplexity(model, token_ids, window=512, stride=256, kv_cache_dtype=kv_cache_dtype).perplexity
    assert abs(ours / reference_perplexity - 1) <= allowed, (ours, reference_perplexity)
    assert ours != reference_perplexity


@pytest.fixture(scope="module")
def f32_continuations(f32):
    """prompt -> (its chat-template token ids, the float32 model's GREEDY_TOKENS greedy tokens), checked decisive."""
    continuations = {}
    for prompt in PROMPTS:
        ids = f32.tokenizer.encode(f32.tokenizer.apply_chat_template([{"role": "user", "content": prompt}]))
        expected = f32.greedy_continuation(ids, GREEDY_TOKENS)
        logits = np.sort(f32.logits([ids + expected])[0, len(ids) - 1 : -1], axis=-1)
        assert np.min(logits[:, -1] - logits[:, -2]) >= DECISIVE, f"{prompt!r} is not a decisive prompt"
        continuations[prompt] = ids, expected
    return continuations


def greedy_tokens_along(model, ids: list[int], continuation: list[int]) -> list[int]:
    """The model's argmax after `ids` + each prefix of `continuation`, from one forward: equal to
    `continuation` exactly when the model's own greedy decoding would produce it."""
    logits = model.logits([ids + continuation])[0, len(ids) - 1 : -1]
    return np.argmax(logits, axis=-1).tolist()


def test_int8_greedy_text_matches_float32(f32, f32_continuations):
    int8 = quantized(f32, "int8")
    for prompt, (ids, expected) in f32_continuations.items():
        assert greedy_tokens_along(int8, ids, expected) == expected, prompt


@pytest.fixture(scope="module")
def as_shipped(smollm2_gguf):
    return jinfer.load(smollm2_gguf, quantize="gguf")


def test_the_gguf_file_runs_with_its_4_bit_weights_as_shipped(f32, f32_continuations, as_shipped):
    """Every linear weight stays Q4_1 (int4, asymmetric, groups of 32) and dequantizes bit for bit
    to the float model's weights, which are gguf's own dequantization of the file."""
    flat = traverse_util.flatten_dict(as_shipped.params)
    kernels = {path: leaf for path, leaf in flat.items() if isinstance(leaf, Int4Weights)}
    assert len(kernels) == 7 * 30 and all(not w.symmetric and w.group_size == 32 for w in kernels.values())
    float_params = traverse_util.flatten_dict(f32.params)
    for path, weights in kernels.items():
        if path[0] in ("layer_0", "layer_29"):
            expected = np.asarray(float_params[path]).reshape(weights.shape)
            np.testing.assert_array_equal(np.asarray(dequantize(weights)).view(np.uint32), expected.view(np.uint32), err_msg=str(path))
    ids, expected = f32_continuations[PROMPTS[0]]
    assert greedy_tokens_along(as_shipped, ids, expected) == expected
