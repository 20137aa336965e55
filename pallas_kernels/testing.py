"""Tolerances, written once, for comparing jinfer against its references (kernels and models)."""

from __future__ import annotations

import ml_dtypes
import numpy as np

# Max |actual - expected| allowed, relative to max(1, max |expected|), by the dtype computed in.
TOLERANCE = {
    np.dtype(np.float32): 1e-4,
    np.dtype(ml_dtypes.bfloat16): 3e-2,
}
# A real 30-layer checkpoint accumulates more float32 rounding than a tiny random model.
REAL_MODEL_FLOAT32_TOLERANCE = 1e-3


def scaled_error(actual, expected) -> float:
    """max |actual - expected| / max(1, max |expected|)."""
    actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    return float(np.max(np.abs(actual - expected)) / max(1.0, float(np.max(np.abs(expected)))))


def assert_close(actual, expected, dtype=np.float32, atol: float | None = None) -> None:
    """Asserts shapes equal, values finite, and the scaled error within the dtype's tolerance."""
    limit = TOLERANCE[np.dtype(dtype)] if atol is None else atol
    assert np.shape(actual) == np.shape(expected), f"shape {np.shape(actual)} != {np.shape(expected)}"
    assert np.all(np.isfinite(actual)), "non-finite values in the result"
    error = scaled_error(actual, expected)
    assert error <= limit, f"scaled max error {error:.3g} exceeds {limit:.3g}"


def random_normal(seed: int, shape: tuple[int, ...], dtype=np.float32, scale: float = 1.0) -> np.ndarray:
    """Standard normal values (times `scale`) rounded to `dtype`, reproducible from `seed`."""
    values = np.random.default_rng(seed).normal(size=shape) * scale
    return values.astype(np.float32).astype(dtype)
