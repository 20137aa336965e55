"""XLA FFI call of the logit statistics in sampling.cc: what greedy sampling and logprobs need."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jinfer.native import library


def supports_logit_stats(logits) -> bool:
    """logits: [B, V] float32."""
    return logits.ndim == 2 and logits.dtype == jnp.float32


def logit_stats(logits):
    """logits: [B, V] float32 -> (max [B] float32, first index of the max [B] int32, log-sum-exp [B]
    float32); a row with a NaN gives (NaN, V - 1, NaN)."""
    rows = logits.shape[0]
    outputs = (jax.ShapeDtypeStruct((rows,), jnp.float32), jax.ShapeDtypeStruct((rows,), jnp.int32), jax.ShapeDtypeStruct((rows,), jnp.float32))
    return tuple(library.ffi_call("jinfer_logit_stats", outputs)(logits))
