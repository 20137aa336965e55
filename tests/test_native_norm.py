"""jinfer's native CPU RMS normalization (jinfer/native/norm.cc) against the jnp formula `RMSNorm` uses
otherwise, and `RMSNorm` picking it for float32 rows in kernel mode "native" only."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jinfer import native
from jinfer.models.layers import RMSNorm
from jinfer.ops import backend
from pallas_kernels.testing import assert_close, random_normal

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="CPU kernels")


def reference(x, scale, eps, offset):  # x: [..., D]; scale: [D]
    x = np.asarray(x, np.float64)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * (offset + np.asarray(scale, np.float64))


@pytest.mark.parametrize("shape", [(1, 16), (32, 576), (3, 9, 64), (7, 4, 2, 128)])
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_native_rms_norm_matches_the_formula(shape, offset):
    x, scale = random_normal(0, shape, scale=3.0), random_normal(1, shape[-1:])
    assert_close(native.rms_norm(jnp.asarray(x), jnp.asarray(scale), 1e-6, offset), reference(x, scale, 1e-6, offset))


def test_a_nan_stays_in_its_row():
    x = random_normal(0, (4, 32))
    x[2, 5] = np.nan
    y = np.asarray(native.rms_norm(jnp.asarray(x), jnp.ones(32), 1e-6, 0.0))
    assert np.all(np.isnan(y[2])) and np.all(np.isfinite(np.delete(y, 2, axis=0)))


@pytest.mark.parametrize("mode, dtype, native_call", [("native", jnp.float32, True), ("reference", jnp.float32, False), ("native", jnp.bfloat16, False)])
def test_the_layer_runs_the_kernel_for_float32_in_native_mode(mode, dtype, native_call):
    norm = RMSNorm(features=64, eps=1e-6, dtype=dtype)
    x = jnp.asarray(random_normal(0, (8, 64)), dtype)
    params = nn.unbox(norm.init(jax.random.key(0), x))
    with backend.kernel_scope(mode):
        text = jax.jit(norm.apply).lower(params, x).as_text()
        y = norm.apply(params, x)
    assert ("jinfer_rms_norm" in text) == native_call
    expected = reference(x.astype(jnp.float32), params["params"]["scale"].astype(jnp.float32), 1e-6, 0.0)
    assert_close(np.asarray(y, np.float32), expected, dtype=dtype)
