"""Attention ops. The XLA reference paths here define what every kernel must match."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

MASKED = -1e30


@dataclasses.dataclass(frozen=True)
class LayerAttention:
    """Static per-layer attention settings."""

    scale: float
    window: int = 0  # 0: full causal attention; w > 0: a query at p sees keys at p - w < q <= p
    softcap: float | None = None


def visible(q_positions, kv_positions, window: int):
    """q_positions: [..., S], kv_positions: [..., T] -> bool [..., S, T] (causal, optionally windowed)."""
    delta = q_positions[..., :, None] - kv_positions[..., None, :]
    mask = delta >= 0
    if window:
        mask &= delta < window
    return mask


def grouped_attention(q, k, v, mask, layer: LayerAttention):
    """Masked softmax attention with grouped KV heads, float32 logits and softmax.

    q: [B, S, H, D]; k, v: [B, T, K, D] with H a multiple of K; mask: [B, S, T] bool -> [B, S, H, D].
    """
    batch, seq, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(batch, seq, kv_heads, heads // kv_heads, head_dim)
    logits = jnp.einsum("bskgd,btkd->bkgst", q, k, preferred_element_type=jnp.float32) * layer.scale
    if layer.softcap:
        logits = jnp.tanh(logits / layer.softcap) * layer.softcap
    logits = jnp.where(mask[:, None, None], logits, MASKED)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgst,btkd->bskgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(batch, seq, heads, head_dim).astype(q.dtype)


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class FullSequenceAttention:
    """Whole sequences at once, no cache: the forward used by `Model.logits` and parity tests."""

    def __call__(self, q, k, v, positions, cache, layer: LayerAttention):
        """q: [B, S, H, D]; k, v: [B, S, K, D]; positions: [B, S] -> ([B, S, H, D], cache unchanged)."""
        return grouped_attention(q, k, v, visible(positions, positions, layer.window), layer), cache
