"""jinfer's native CPU matmul kernels (jinfer/native) against their plain-jnp references, the shapes
and dtypes the dispatch hands them, their fallback when no compiler builds them, and the engine using
them: greedy tokens equal to the XLA reference path's, logits within the float32 tolerance."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jinfer
from hf_reference import save_tiny_model
from jinfer import native
from jinfer.config import EngineConfig
from jinfer.engine.engine import Engine
from jinfer.native import library
from jinfer.ops import backend
from jinfer.ops.matmul import dense_matmul, int4_dynamic_matmul, int8_dynamic_matmul, quantized_matmul, round_activation_blocks
from jinfer.quantize import DynamicInt8Weights, PanelInt4Weights
from jinfer.sampling import SamplingParams
from pallas_kernels.quantized_matmul import quantize_int4, quantize_int8, quantized_matmul_reference
from pallas_kernels.testing import assert_close, random_normal, scaled_error

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="CPU kernels")

# Rows of x: one (decode), the 4-row tile and its remainders, a verification chunk; float32's
# outer-product form from 20 rows on (matmul.cc, kPackedMinRows): tiles of 6 + 7 + 7 and
# 6 + 6 + 6 + 7 rows; the limit (four tiles of 8).
ROWS = (1, 2, 3, 4, 5, 7, 20, 25, native.MAX_ROWS)
# Output rows: a single row, the 4-row tile with a remainder, more than one unit of work (32 rows
# for dot products; 48 for outer products, a last unit of 22 rows: a panel of 16 and part of one),
# one whole unit of three 16-row panels.
OUTPUTS = (1, 6, 70, 48)


def _weights(kind: str, n: int, k: int, seed: int = 1):
    w = jnp.asarray(random_normal(seed, (n, k)))
    if kind == "int8":
        return quantize_int8(w)
    if kind.startswith("int8-g"):
        return quantize_int8(w, int(kind.removeprefix("int8-g")))
    group = int(kind.split("-g")[1])
    return quantize_int4(w, group, kind.startswith("int4-sym"))


@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("n", OUTPUTS)
@pytest.mark.parametrize("k", (16, 64, 576))  # 576: blocks of 128 columns and a last one of 64
def test_float32_kernel_matches_a_float32_product(m, n, k):
    x, w = random_normal(m + n, (m, k)), random_normal(k, (n, k))
    expected = np.dot(x.astype(np.float64), w.astype(np.float64).T)
    assert_close(native.dense_matmul(jnp.asarray(x), jnp.asarray(w)), expected)


@pytest.mark.parametrize("m", (1, 3, 5, native.MAX_W8A8_ROWS, native.MAX_ROWS))
@pytest.mark.parametrize("n", OUTPUTS)
@pytest.mark.parametrize("kind", ("int8", "int8-g32", "int8-g16", "int4-g32", "int4-g64", "int4-sym-g32", "int4-g16"))
def test_quantized_kernels_match_the_dequantizing_reference(m, n, kind):
    # K = 96: int4's halves of 48 columns cut a group of 32 in two (the kernel's general path);
    # groups of 16, or of 64 in K = 128, fit each half whole (its path with one load for both halves).
    k = 128 if kind == "int4-g64" else 96
    x, weights = jnp.asarray(random_normal(m, (m, k))), _weights(kind, n, k)
    assert native.supports_quantized(x, weights)
    assert_close(native.quantized_matmul(x, weights), quantized_matmul_reference(x, weights))


@pytest.mark.parametrize("m", (1, 4))
def test_w8a8_rounds_the_activations_as_the_int8_gemm_does(m):
    x, w = jnp.asarray(random_normal(0, (m, 96))), jnp.asarray(random_normal(1, (40, 96)))
    weights = quantize_int8(w)
    dynamic = DynamicInt8Weights(values=weights.values, scales=weights.scales)
    native_result = quantized_matmul(x, dynamic, kernels="native")
    assert _runs_native(lambda x, q: quantized_matmul(x, q, kernels="native"), x, dynamic)
    assert_close(native_result, int8_dynamic_matmul(x, dynamic))
    assert scaled_error(native_result, quantized_matmul(x, weights, kernels="native")) > 1e-3, "activations were not rounded"


def _panels(n: int, k: int, group: int, bits: int = 8, seed: int = 1) -> PanelInt4Weights:
    return PanelInt4Weights.from_int4(quantize_int4(jnp.asarray(random_normal(seed, (n, k))), group, False), bits)


# Rows of x: the 4-row tile and its remainders, past the other kernels' limit, a prefill chunk.
# Output rows: one panel of 8, a tile of two panels, three panels (a tile and a one-panel tile), a
# unit of four panels and part of the next.
@pytest.mark.parametrize("m", (1, 2, 3, 4, 5, 9, native.MAX_ROWS + 7))
@pytest.mark.parametrize("n", (8, 16, 24, 48))
@pytest.mark.parametrize("k, group", ((64, 32), (576, 32), (576, 64), (640, 128)))
@pytest.mark.parametrize("bits", (8, 16))
def test_w4a8_and_w4a16_kernels_match_the_rounding_reference(m, n, k, group, bits):
    x, weights = jnp.asarray(random_normal(m + k, (m, k))), _panels(n, k, group, bits)
    assert native.supports_quantized(x, weights)
    assert_close(native.quantized_matmul(x, weights), int4_dynamic_matmul(x, weights))


@pytest.mark.parametrize("bits, fine_steps, unrounded_error", ((8, 1, 1e-3), (16, 254, 1e-6)))
def test_w4a8_and_w4a16_round_the_activations_per_block_of_32(bits, fine_steps, unrounded_error):
    x = random_normal(0, (3, 128))
    x[1, 40] = 1e3  # an outlier coarsens only its own block's steps
    x[2, :32] = 0.0  # an all-zero block (scale 0) rounds to zeros
    rounded = np.asarray(round_activation_blocks(jnp.asarray(x), bits))
    blocks = x.reshape(3, 4, 32)
    steps = np.abs(blocks).max(-1, keepdims=True) / 127 / fine_steps
    assert np.all(np.abs(rounded.reshape(3, 4, 32) - blocks) <= steps / 2 + 1e-6)
    assert np.max(np.abs(rounded.reshape(3, 4, 32) - blocks)[:2] / steps[:2]) > 0.4, "rounded more finely than the steps"
    assert np.allclose(rounded[1, 64:], x[1, 64:], atol=0.02 / fine_steps) and not np.allclose(rounded[1, 32:64], x[1, 32:64], atol=0.02 / fine_steps)
    assert np.all(rounded[2, :32] == 0)
    weights = _panels(16, 128, 32, bits)
    got = native.quantized_matmul(jnp.asarray(x), weights)
    assert_close(got, int4_dynamic_matmul(jnp.asarray(x), weights))
    assert scaled_error(got, quantized_matmul_reference(jnp.asarray(x), weights.as_int4())) > unrounded_error, "activations were not rounded"


def test_panels_hold_the_int4_weights():
    int4 = quantize_int4(jnp.asarray(random_normal(3, (24, 128))), 32, False)
    panels = PanelInt4Weights.from_int4(int4, 8)
    assert panels.shape == int4.shape and panels.group_size == 32
    assert not np.array_equal(panels.packed, int4.packed), "the rows were not interleaved"
    np.testing.assert_array_equal(panels.packed[0, :8], np.concatenate([int4.packed[0, :4], int4.packed[1, :4]]))
    for got, want in zip(jax.tree.leaves(panels.as_int4()), jax.tree.leaves(int4)):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("m", (5, native.MAX_ROWS))  # float32's dot-product and outer-product forms
def test_a_nan_reaches_only_its_own_row_and_column(m):
    """A stray read across rows of x or of the weights would spread the NaN."""
    x, w = random_normal(0, (m, 64)), random_normal(1, (70, 64))
    x[2, 7], w[33, 40] = np.nan, np.nan
    y = np.asarray(native.dense_matmul(jnp.asarray(x), jnp.asarray(w)))
    poisoned = np.zeros_like(y, bool)
    poisoned[2, :], poisoned[:, 33] = True, True
    assert np.all(np.isnan(y[poisoned])) and np.all(np.isfinite(y[~poisoned]))
    q = quantize_int8(jnp.asarray(np.nan_to_num(w)))
    q = dataclasses.replace(q, scales=q.scales.at[33].set(np.nan))
    y = np.asarray(native.quantized_matmul(jnp.asarray(np.nan_to_num(x)), q))
    assert np.all(np.isnan(y[:, 33])) and np.isfinite(np.delete(y, 33, axis=1)).all()
    x[0, 50] = np.inf  # w4a8 rounds x per block: a NaN or infinity makes its whole row NaN
    y = np.asarray(native.quantized_matmul(jnp.asarray(x), _panels(72, 64, 32)))
    assert np.all(np.isnan(y[[0, 2]])) and np.isfinite(np.delete(y, [0, 2], axis=0)).all()
    assert np.all(np.isnan(np.asarray(int4_dynamic_matmul(jnp.asarray(x), _panels(72, 64, 32)))[[0, 2]]))


def _runs_native(fn, *args) -> bool:
    return "jinfer_matmul" in jax.jit(fn).lower(*args).as_text()


def test_dispatch_hands_the_kernels_only_the_shapes_they_take():
    x, w = jnp.ones((3, 64)), jnp.ones((8, 64))
    assert _runs_native(lambda x, w: dense_matmul(x, w, kernels="native"), x, w)
    assert _runs_native(lambda x, w: dense_matmul(x, w), x, w), "'auto' on CPU runs the native kernels"
    assert not _runs_native(lambda x, w: dense_matmul(x, w, kernels="reference"), x, w)
    many = jnp.ones((native.MAX_ROWS + 1, 64))
    assert not _runs_native(lambda x, w: dense_matmul(x, w, kernels="native"), many, w)
    ragged = jnp.ones((3, 40)), jnp.ones((8, 40))  # K not a whole number of vectors
    assert not _runs_native(lambda x, w: dense_matmul(x, w, kernels="native"), *ragged)
    assert not _runs_native(lambda x, w: dense_matmul(x, w, kernels="native"), x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))
    q = quantize_int8(w)
    assert _runs_native(lambda x, q: quantized_matmul(x, q, kernels="native"), x, q)
    past_w8a8 = jnp.ones((native.MAX_W8A8_ROWS + 1, 64))
    assert _runs_native(lambda x, q: quantized_matmul(x, q, kernels="native"), past_w8a8, q)
    dynamic = DynamicInt8Weights(values=q.values, scales=q.scales)
    assert not _runs_native(lambda x, q: quantized_matmul(x, q, kernels="native"), past_w8a8, dynamic)
    odd_halves = quantize_int4(jnp.ones((8, 48)), 16, False)  # K / 2 = 24 is not whole vectors
    assert not native.supports_quantized(jnp.ones((3, 48)), odd_halves)
    np.testing.assert_allclose(
        quantized_matmul(jnp.ones((3, 48)), odd_halves, kernels="native"), quantized_matmul_reference(jnp.ones((3, 48)), odd_halves)
    )
    panels = _panels(8, 64, 32)
    assert _runs_native(lambda x, q: quantized_matmul(x, q, kernels="native"), many, panels), "w4a8 takes any number of rows"
    odd_blocks = _panels(8, 96, 32)  # K / 2 = 48 is not whole blocks of 32
    assert not _runs_native(lambda x, q: quantized_matmul(x, q, kernels="native"), jnp.ones((3, 96)), odd_blocks)
    np.testing.assert_allclose(
        quantized_matmul(jnp.ones((3, 96)), odd_blocks, kernels="native"), int4_dynamic_matmul(jnp.ones((3, 96)), odd_blocks)
    )


def test_without_a_compiler_the_references_run(tmp_path, monkeypatch):
    monkeypatch.setenv("JINFER_NATIVE_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises(FileNotFoundError, match="no-such-compiler"):
        library.build()
    assert not any(tmp_path.iterdir()), "a failed build left a file behind"
    monkeypatch.setattr(library, "load", library.build)  # this process already loaded the library once
    library.available.cache_clear()
    try:
        assert not library.available()
        assert backend.resolve("auto") == "reference"
        assert backend.resolve("native") == "reference"
    finally:
        library.available.cache_clear()
        monkeypatch.undo()
    assert library.available()


def test_the_library_is_cached_by_source_and_machine(tmp_path, monkeypatch):
    monkeypatch.setenv("JINFER_NATIVE_CACHE", str(tmp_path))
    path = library.build()
    assert path.parent == tmp_path and path.name.startswith("kernels-")
    built = path.stat().st_mtime_ns
    assert library.build() == path and path.stat().st_mtime_ns == built, "a cached library was rebuilt"
    monkeypatch.setenv("CXX", "g++")
    assert library.library_path() != path, "another compiler command must build anew"


def test_native_is_refused_off_the_cpu():
    with pytest.raises(ValueError, match="'gpu'"):
        backend.resolve("native", backend="gpu")
    assert backend.resolve("auto", backend="gpu") == "pallas"


def test_an_engine_over_a_cpu_mesh_uses_the_references():
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("model",))
    assert backend.for_mesh("auto", mesh) == "reference"
    assert backend.for_mesh("auto", None) == "auto"
    assert backend.for_mesh("native", mesh) == "native"


TINY = EngineConfig(max_num_seqs=4, max_model_len=64, max_num_batched_tokens=16, page_size=8, kv_cache_memory="256KiB")
PROMPTS = ([11, 200, 37], [5, 81, 129, 64, 250, 3, 17, 9, 44], [7])


def _greedy_run(model, kernels: str) -> tuple[list[list[int]], np.ndarray]:
    engine = Engine(model, dataclasses.replace(TINY, kernels=kernels), measure_step_memory=False, cache_fill=float("nan"))
    requests = [engine.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=6)) for prompt in PROMPTS]
    logits = []
    while engine.has_unfinished():
        engine.step()
        logits.append(np.asarray(engine.last_output.logits))
    return [r.output_ids for r in requests], np.concatenate(logits)


@pytest.mark.parametrize("quantize", (None, "int8", "int4", "w4a8", "w4a16"))
def test_engine_with_native_kernels_gives_the_reference_tokens(tmp_path, monkeypatch, quantize):
    save_tiny_model("llama", tmp_path)
    model = jinfer.load(tmp_path, quantize=quantize, group_size=32 if quantize in ("int4", "w4a8", "w4a16") else None)
    calls = []
    for name in ("dense_matmul", "quantized_matmul"):
        traced = getattr(native, name)
        monkeypatch.setattr(native, name, lambda *args, traced=traced: calls.append(args[0].shape) or traced(*args))
    tokens, logits = _greedy_run(model, "native")
    assert calls, "the engine step never called the native kernels"
    reference_tokens, reference_logits = _greedy_run(model, "reference")
    assert tokens == reference_tokens
    assert_close(logits, reference_logits)
