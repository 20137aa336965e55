"""XLA FFI call of the RMS normalization in norm.cc, and the inputs it takes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jinfer.native import library
from jinfer.native.library import LANES


def supports_rms_norm(x, scale) -> bool:
    """x: [..., D]; scale: [D]: float32, D a whole number of vectors."""
    return x.dtype == jnp.float32 and scale.dtype == jnp.float32 and x.shape[-1] % LANES == 0


def rms_norm(x, scale, eps: float, offset: float):
    """x: [..., D] float32; scale: [D] float32 -> [..., D] float32, x / rms(x) * (offset + scale)."""
    rows = x.reshape(-1, x.shape[-1])
    out = library.ffi_call("jinfer_rms_norm", jax.ShapeDtypeStruct(rows.shape, jnp.float32))(
        rows, scale, eps=np.float32(eps), offset=np.float32(offset)
    )
    return out.reshape(x.shape)
