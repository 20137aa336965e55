"""Dropless mixture-of-experts dispatch: route, sort token copies by expert, grouped matmuls, combine.

Each token is copied once per selected expert (`k` copies); the copies are sorted by expert so
that every expert's rows are contiguous, and one grouped matmul per projection multiplies each
run of rows by its expert's matrix. No capacity factor: every copy is computed, so the work is
`tokens * k` rows whatever the number of experts.

Expert kernels keep the HF `[out, in]` layout with a leading expert axis:
gate/up `[experts, moe_intermediate, embed]`, down `[experts, embed, moe_intermediate]`. The grouped
matmul reads them in that layout (`transpose_rhs`), so the Pallas kernel never copies the weights.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from jinfer.ops import backend as kernel_backend
from pallas_kernels import grouped_matmul as gmm


def grouped_matmul(lhs, rhs, group_sizes, *, transpose_rhs: bool = False, kernels: str | None = None):
    """lhs: [M, K]; rhs: [E, K, N] ([E, N, K] if transpose_rhs); group_sizes: [E] int32 summing to M
    -> [M, N] in lhs's dtype.

    Rows `sum(group_sizes[:e])` to `sum(group_sizes[:e + 1])` of lhs are multiplied by rhs[e] (rhs[e].T
    if transpose_rhs), accumulating in float32: `jax.lax.ragged_dot`, or the Pallas kernel, as
    `kernels` (None: the enclosing kernel_scope's mode) resolves (jinfer.ops.backend).
    """
    mode = kernel_backend.resolve(kernels)
    if kernel_backend.runs_pallas(mode):
        return gmm.grouped_matmul(lhs, rhs, group_sizes, transpose_rhs=transpose_rhs, interpret=mode == "interpret")
    if transpose_rhs:
        rhs = jnp.swapaxes(rhs, 1, 2)
    out = jax.lax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=jnp.float32)
    return out.astype(lhs.dtype)


def route(router_logits, k: int, renormalize: bool):
    """router_logits: [T, E] -> (weights [T, k] float32, experts [T, k] int32).

    Softmax over all E experts, then the k largest; with `renormalize` the k weights are
    rescaled to sum to 1, which equals a softmax over the k selected logits (Mixtral).
    """
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, k)
    if renormalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, experts.astype(jnp.int32)


def sort_by_expert(experts, num_experts: int):
    """experts: [T, k] int32 -> (order [T*k], group_sizes [E]).

    `order` lists the flat copy indices (token * k + slot) grouped by expert, ascending;
    `group_sizes[e]` is the number of copies routed to expert e.
    """
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    return order, group_sizes


def expert_mlp(x_sorted, gate_kernel, up_kernel, down_kernel, group_sizes, activation: Callable):
    """x_sorted: [M, embed] rows grouped by expert; gate/up_kernel: [E, I, embed];
    down_kernel: [E, embed, I]; group_sizes: [E] -> [M, embed], down(act(gate(x)) * up(x))."""
    gate = grouped_matmul(x_sorted, gate_kernel, group_sizes, transpose_rhs=True)  # [M, I]
    up = grouped_matmul(x_sorted, up_kernel, group_sizes, transpose_rhs=True)  # [M, I]
    return grouped_matmul(activation(gate) * up, down_kernel, group_sizes, transpose_rhs=True)


def moe_mlp(x, router_logits, gate_kernel, up_kernel, down_kernel, *, k: int, renormalize: bool, activation: Callable):
    """x: [*lead, embed]; router_logits: [*lead, E]; gate/up_kernel: [E, I, embed];
    down_kernel: [E, embed, I] -> [*lead, embed]: the routing-weighted sum of each token's k experts."""
    embed, num_experts = x.shape[-1], router_logits.shape[-1]
    tokens = x.reshape(-1, embed)  # [T, embed]
    weights, experts = route(router_logits.reshape(-1, num_experts), k, renormalize)  # [T, k] each
    order, group_sizes = sort_by_expert(experts, num_experts)  # [T*k], [E]
    y_sorted = expert_mlp(tokens[order // k], gate_kernel, up_kernel, down_kernel, group_sizes, activation)
    y = y_sorted[jnp.argsort(order)].reshape(-1, k, embed)  # [T, k, embed], copies back in token order
    combined = jnp.einsum("tke,tk->te", y.astype(jnp.float32), weights)
    return combined.astype(x.dtype).reshape(x.shape)
