"""The sparse MLP block: a router over stacked experts, plus Qwen2-MoE's gated shared expert."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jinfer.config import ModelConfig
from jinfer.models.layers import ACTIVATION_FNS, INIT_STDDEV, GatedMLP, Linear
from jinfer.ops import moe as moe_ops


class Experts(nn.Module):
    """`num_experts` gated MLPs stored stacked in HF's [out, in] layout behind an expert axis."""

    config: ModelConfig
    dtype: Any = jnp.float32

    def kernel(self, name: str, shape: tuple[int, ...], axes: tuple[str, ...]):
        init = nn.with_logical_partitioning(nn.initializers.normal(INIT_STDDEV), axes)
        return self.param(name, init, shape, self.dtype)

    @nn.compact
    def __call__(self, x, router_logits):  # x: [*lead, embed]; router_logits: [*lead, experts]
        cfg = self.config
        experts, inner, embed = cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size
        gate = self.kernel("gate_proj", (experts, inner, embed), ("experts", "mlp", "embed"))
        up = self.kernel("up_proj", (experts, inner, embed), ("experts", "mlp", "embed"))
        down = self.kernel("down_proj", (experts, embed, inner), ("experts", "embed", "mlp"))
        return moe_ops.moe_mlp(
            x,
            router_logits,
            gate,
            up,
            down,
            k=cfg.num_experts_per_tok,
            renormalize=cfg.norm_topk_prob,
            activation=ACTIVATION_FNS[cfg.activation],
        )


class MoEBlock(nn.Module):
    """Router `gate` ([experts, embed]) -> top-k experts; + sigmoid(shared_expert_gate(x)) * shared_expert(x)."""

    config: ModelConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):  # x: [*lead, embed]
        cfg = self.config
        hidden = (cfg.hidden_size,)
        router_logits = Linear(hidden, (cfg.num_experts,), ("embed", "experts"), dtype=self.dtype, name="gate")(x)
        y = Experts(cfg, self.dtype, name="experts")(x, router_logits)
        if cfg.shared_expert_intermediate_size:
            shared_config = cfg.replace(intermediate_size=cfg.shared_expert_intermediate_size)
            shared = GatedMLP(shared_config, self.dtype, name="shared_expert")(x)
            shared_gate = Linear(hidden, (1,), ("embed", None), dtype=self.dtype, name="shared_expert_gate")(x)
            y = y + jax.nn.sigmoid(shared_gate) * shared
        return y
