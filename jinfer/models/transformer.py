"""The decoder: a pure function of (params, tokens, positions, attention backend, cache).

Dense ops work on any leading shape `[*lead]` (`[batch, seq]` for full sequences, `[tokens]`
for a ragged engine batch); only the attention backend knows how tokens relate to each other
and to the KV cache.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jinfer.config import ModelConfig
from jinfer.models.layers import INIT_STDDEV, GatedMLP, Linear, RMSNorm, apply_rope, rope_tables
from jinfer.models.moe import MoEBlock
from jinfer.ops.attention import LayerAttention
from jinfer.ops.matmul import dense_matmul, quantized_matmul
from jinfer.quantize import TIED_LM_HEAD, is_quantized


def layer_attention(config: ModelConfig, layer_index: int) -> LayerAttention:
    return LayerAttention(
        scale=config.attention_scale,
        window=config.layer_windows[layer_index],
        softcap=config.attn_logit_softcap,
    )


class Attention(nn.Module):
    """Projections, optional q/k norm, rotary embedding; the attention itself is the backend's."""

    config: ModelConfig
    layer_index: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, rope, positions, backend, cache):  # x: [*lead, embed]; positions: [*lead]
        cfg = self.config
        embed, heads, kv_heads = (cfg.hidden_size,), (cfg.num_heads, cfg.head_dim), (cfg.num_kv_heads, cfg.head_dim)

        def projection(features, axes, name):
            return Linear(embed, features, ("embed", *axes), use_bias=cfg.attention_bias, dtype=self.dtype, name=name)(x)

        q = projection(heads, ("heads", "head_dim"), "q_proj")  # [*lead, H, D]
        k = projection(kv_heads, ("kv_heads", "head_dim"), "k_proj")  # [*lead, K, D]
        v = projection(kv_heads, ("kv_heads", "head_dim"), "v_proj")  # [*lead, K, D]
        if cfg.qk_norm:
            q = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, axis_name="head_dim", dtype=self.dtype, name="q_norm")(q)
            k = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, axis_name="head_dim", dtype=self.dtype, name="k_norm")(k)
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out, cache = backend(q, k, v, positions, cache, layer_attention(cfg, self.layer_index))
        out = Linear(heads, embed, ("heads", "head_dim", "embed"), dtype=self.dtype, name="o_proj")(out)
        return out, cache


class DecoderLayer(nn.Module):
    config: ModelConfig
    layer_index: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, rope, positions, backend, cache):  # x: [*lead, embed]
        cfg = self.config

        def norm(name):
            return RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_offset, dtype=self.dtype, name=name)

        with jax.named_scope("attention"):
            h, cache = Attention(cfg, self.layer_index, self.dtype, name="attn")(norm("attn_norm")(x), rope, positions, backend, cache)
            if cfg.sandwich_norms:
                h = norm("attn_post_norm")(h)
            x = x + h
        with jax.named_scope("mlp"):
            mlp = MoEBlock if cfg.moe_layers[self.layer_index] else GatedMLP
            h = mlp(cfg, self.dtype, name="mlp")(norm("mlp_norm")(x))
            if cfg.sandwich_norms:
                h = norm("mlp_post_norm")(h)
            return x + h, cache


def tied_lm_head(module: nn.Module, x, embedding):
    """x: [M, embed]; embedding: [V, embed] -> [M, V] float32 logits, through the separate copy of
    the embedding matrix (`jinfer.quantize.TIED_LM_HEAD`: quantized, or [V, embed] float) when the
    parameters hold one."""
    if not module.has_variable("params", TIED_LM_HEAD):
        return dense_matmul(x, embedding)
    head = module.get_variable("params", TIED_LM_HEAD)["kernel"]
    if is_quantized(head):
        return quantized_matmul(x, head).astype(jnp.float32)
    return dense_matmul(x, head)


class Transformer(nn.Module):
    """Token ids -> float32 logits. `cache` is a per-layer list the backend reads and writes (or None).

    `logits_index` ([R] int32 indices into the flattened tokens) keeps only those positions'
    logits: the engine samples one token per sequence, so it never projects the others to the vocabulary.
    `return_hidden` also returns the hidden states the LM head read (after the final norm, at
    `logits_index` if given): speculative draft heads draft from them without another pass.
    """

    config: ModelConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tokens, positions, backend, cache=None, logits_index=None, return_hidden=False):  # tokens, positions: [*lead] int32
        cfg = self.config
        embedding = self.param(
            "embedding",
            nn.with_logical_partitioning(nn.initializers.normal(INIT_STDDEV), ("vocab", "embed")),
            (cfg.vocab_size, cfg.hidden_size),
            self.dtype,
        )
        x = jnp.take(embedding, tokens, axis=0)  # [*lead, embed]
        if cfg.scale_embeddings:
            x = x * jnp.asarray(cfg.hidden_size**0.5, self.dtype)
        rope = rope_tables(positions, cfg.rope, cfg.head_dim, self.dtype)
        new_cache = []
        for i in range(cfg.num_layers):
            with jax.named_scope(f"layer_{i}"):
                x, layer_cache = DecoderLayer(cfg, i, self.dtype, name=f"layer_{i}")(
                    x, rope, positions, backend, None if cache is None else cache[i]
                )
            new_cache.append(layer_cache)
        if logits_index is not None:
            x = x.reshape(-1, cfg.hidden_size)[logits_index]  # [R, embed]
        x = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_offset, dtype=self.dtype, name="final_norm")(x)
        head = LMHead(cfg, self.dtype)
        nn.share_scope(self, head)  # the head's parameters keep their paths (`lm_head/kernel`, `tied_lm_head`)
        logits = head(x, embedding)
        new_cache = None if cache is None else new_cache
        return (logits, new_cache, x) if return_hidden else (logits, new_cache)


class LMHead(nn.Module):
    """Final hidden states (after the final norm) -> float32 logits: the tied embedding or `lm_head`,
    then the final soft-cap. A module of its own, in the Transformer's scope, so that `lm_head_logits`
    projects other hidden states (speculative draft heads) through the target's own code and weights."""

    config: ModelConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, embedding):  # x: [*lead, embed]; embedding: [vocab, embed]
        cfg = self.config
        if cfg.tie_word_embeddings:
            flat = tied_lm_head(self, x.reshape(-1, cfg.hidden_size), embedding)
            logits = flat.reshape(*x.shape[:-1], cfg.vocab_size)
        else:
            logits = Linear((cfg.hidden_size,), (cfg.vocab_size,), ("embed", "vocab"), dtype=self.dtype, name="lm_head")(x)
        logits = logits.astype(self.dtype).astype(jnp.float32)
        if cfg.final_logit_softcap:
            logits = jnp.tanh(logits / cfg.final_logit_softcap) * cfg.final_logit_softcap
        return logits


def lm_head_logits(params, x, config: ModelConfig, dtype):
    """x: [*lead, embed] final hidden states -> [*lead, vocab] float32 logits under the LM head of the
    Transformer whose parameters are `params`."""
    return LMHead(config, dtype).apply({"params": params}, x, params["embedding"])
