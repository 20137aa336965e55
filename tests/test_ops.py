"""jinfer.ops dispatch: the kernel-mode policy, which Pallas kernels the engine step traces for each
mode, and the dispatching grouped and quantized matmuls against numpy on both paths."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_reference import tiny_config

from jinfer import config as config_lib
from jinfer.cache import abstract_cache
from jinfer.config import EngineConfig
from jinfer.engine.batch import padding_batch
from jinfer.model import init_params
from jinfer.ops import backend, moe
from jinfer.ops.matmul import quantized_matmul
from jinfer.quantize import DynamicInt8Weights
from jinfer.step import step
from pallas_kernels import quantized_matmul as qmm
from pallas_kernels.testing import assert_close

ATTENTION_KERNELS = {"ragged_paged_attention_tpu", "write_kv_pages_tpu"}


def _kernel_names(jaxpr) -> set[str]:
    """Names of the pallas_calls anywhere in a (closed) jaxpr."""
    names = {eqn.params["name"] for eqn in jaxpr.eqns if eqn.primitive.name == "pallas_call"}
    for sub in jax.extend.core.subjaxprs(jaxpr):
        names |= _kernel_names(sub)
    return names


def _traced_kernels(fn, *args) -> set[str]:
    return _kernel_names(jax.make_jaxpr(fn)(*args).jaxpr)


# ---- the policy ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mode, platform, expected",
    [
        ("auto", "cpu", "native"),  # jinfer's CPU kernels build on every test machine
        ("auto", "tpu", "pallas"),
        ("auto", "gpu", "pallas"),
        ("reference", "tpu", "reference"),
        ("pallas", "gpu", "pallas"),
        ("interpret", "cpu", "interpret"),
    ],
)
def test_modes_resolve_by_backend(mode, platform, expected):
    assert backend.resolve(mode, platform) == expected


def test_bad_modes_are_named():
    with pytest.raises(ValueError, match="kernels='pallas' needs a TPU or GPU backend.*'cpu'"):
        backend.resolve("pallas", "cpu")
    with pytest.raises(ValueError, match="kernels='fast' is not one of"):
        backend.resolve("fast", "tpu")
    with pytest.raises(ValueError, match="kernels='fast'"):
        EngineConfig(kernels="fast")


def test_ops_without_a_mode_take_the_innermost_scope():
    assert backend.resolve() == "native"  # "auto" outside any scope, on CPU
    with backend.kernel_scope("interpret"):
        with backend.kernel_scope("reference"):
            assert backend.resolve() == "reference"
        assert backend.resolve() == "interpret"
    assert backend.scope_mode() == "auto"


# ---- the engine step traces the kernels its batch names ------------------------------------------


@pytest.fixture(scope="module")
def moe_step_inputs():
    """Abstract params and pool of a one-layer Mixtral, for tracing the step."""
    hf = tiny_config("mixtral", {"num_hidden_layers": 1, "architectures": ["MixtralForCausalLM"]})
    config = config_lib.from_hf_config(hf.to_dict())
    params = jax.eval_shape(functools.partial(init_params, config))
    return config, params, abstract_cache(config, 8, 8, jnp.float32)


@pytest.mark.parametrize(
    "kernels, platform, expected",
    [
        ("auto", "cpu", set()),
        ("reference", "cpu", set()),
        ("interpret", "cpu", ATTENTION_KERNELS | {"grouped_matmul_tpu"}),
        ("auto", "tpu", ATTENTION_KERNELS | {"grouped_matmul_tpu"}),
    ],
)
def test_step_traces_the_kernels_its_batch_names(moe_step_inputs, monkeypatch, kernels, platform, expected):
    config, params, cache = moe_step_inputs
    monkeypatch.setattr(jax, "default_backend", lambda: platform)
    batch = padding_batch(EngineConfig(max_num_seqs=2, max_model_len=32, max_num_batched_tokens=8, page_size=8, kernels=kernels), 8, 2, 4)
    # The step's function itself: the jitted step would reuse a trace made under another backend.
    traced = functools.partial(step.__wrapped__, config=config, dtype=jnp.float32)
    assert _traced_kernels(traced, params, cache, batch) == expected


# ---- the dispatching matmuls against numpy -------------------------------------------------------


@pytest.mark.parametrize("kernels", ["reference", "interpret"])
def test_grouped_matmul_reads_hf_layout_weights(kernels):
    rng = np.random.default_rng(0)
    group_sizes = np.array([3, 0, 1, 4], np.int32)  # an empty group in the middle
    lhs = rng.normal(size=(8, 16)).astype(np.float32)  # [M, K]
    rhs = rng.normal(size=(4, 24, 16)).astype(np.float32)  # [E, N, K]
    expected = np.einsum("mk,mnk->mn", lhs, rhs[np.repeat(np.arange(4), group_sizes)])
    fn = functools.partial(moe.grouped_matmul, transpose_rhs=True, kernels=kernels)
    assert_close(jax.jit(fn)(lhs, rhs, group_sizes), expected)
    assert bool(_traced_kernels(fn, lhs, rhs, group_sizes)) == (kernels == "interpret")


@pytest.mark.parametrize("kernels", ["auto", "reference", "interpret"])
def test_quantized_matmul_dispatch(kernels):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 64)).astype(np.float32)  # [M, K]
    values = rng.integers(-127, 128, (32, 64)).astype(np.int8)  # [N, K]
    scales = rng.uniform(0.001, 0.01, (32, 2)).astype(np.float32)  # [N, K // 32]
    weights = qmm.Int8Weights(jnp.asarray(values), jnp.asarray(scales))
    expected = x.astype(np.float64) @ (values * np.repeat(scales, 32, axis=1)).T.astype(np.float64)
    fn = functools.partial(quantized_matmul, kernels=kernels)
    assert_close(jax.jit(fn)(x, weights), expected)
    assert bool(_traced_kernels(fn, x, weights)) == (kernels == "interpret")


def test_quantized_matmul_names_bad_weights_on_every_path():
    weights = qmm.Int8Weights(jnp.zeros((32, 64), jnp.int8), jnp.ones((32, 2), jnp.float32))
    for kernels in ("reference", "interpret"):
        with pytest.raises(ValueError, match="x has K = 48"):
            quantized_matmul(jnp.zeros((3, 48)), weights, kernels=kernels)


@pytest.mark.parametrize("rows", [1, 5])
def test_int8_dynamic_matmul_quantizes_each_row_of_activations(rows):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(rows, 64)).astype(np.float32)  # [M, K]
    values = rng.integers(-127, 128, (32, 64)).astype(np.int8)  # [N, K]
    scales = rng.uniform(0.001, 0.01, (32, 1)).astype(np.float32)  # [N, 1]
    weights = DynamicInt8Weights(jnp.asarray(values), jnp.asarray(scales))
    x_scales = np.abs(x).max(axis=1, keepdims=True) / 127  # [M, 1]
    x_codes = np.round(x / x_scales)  # [M, K], |code| <= 127
    expected = (x_codes @ values.T.astype(np.float64)) * x_scales * scales[:, 0]
    got = jax.jit(functools.partial(quantized_matmul, kernels="reference"))(x, weights)
    assert_close(got, expected)
    exact = x.astype(np.float64) @ (values * scales).T.astype(np.float64)
    assert_close(got, exact, atol=0.02 * np.abs(exact).max())
    assert not np.allclose(got, exact, rtol=0, atol=1e-5)
