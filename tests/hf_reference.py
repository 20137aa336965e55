"""Tiny random-weight Hugging Face models: the reference implementation for parity tests."""

from __future__ import annotations

import pathlib

import numpy as np
import torch
import transformers

VOCAB = 256

COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)

# Each architecture exercises its own features: llama3 rope scaling, a sliding window shorter than
# the test sequences, q/k/v biases, q/k norms, Gemma's offsets, soft-caps and alternating windows;
# the MoE ones top-2 of 8 experts (Mixtral), a gated shared expert without renormalised routing
# weights (Qwen2-MoE), top-3 renormalised and a dense layer among sparse ones (Qwen3-MoE).
TINY_CONFIGS = {
    "llama": (
        transformers.LlamaConfig,
        dict(
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=10000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=32,
            )
        ),
    ),
    "llama_tied_mqa": (transformers.LlamaConfig, dict(tie_word_embeddings=True, num_key_value_heads=1)),
    "mistral": (transformers.MistralConfig, dict(sliding_window=5, head_dim=16)),
    "qwen2": (transformers.Qwen2Config, dict(rope_parameters=dict(rope_type="default", rope_theta=1e6))),
    "qwen3": (transformers.Qwen3Config, dict(head_dim=32)),
    "gemma": (transformers.GemmaConfig, dict(head_dim=32, num_key_value_heads=1, tie_word_embeddings=True)),
    "gemma2": (
        transformers.Gemma2Config,
        dict(
            head_dim=16,
            sliding_window=4,
            query_pre_attn_scalar=24,
            attn_logit_softcapping=3.0,
            final_logit_softcapping=5.0,
            tie_word_embeddings=True,
            num_hidden_layers=4,
        ),
    ),
    "mixtral": (
        transformers.MixtralConfig,
        dict(num_hidden_layers=2, num_local_experts=8, num_experts_per_tok=2, sliding_window=6),
    ),
    "qwen2_moe": (
        transformers.Qwen2MoeConfig,
        dict(
            num_hidden_layers=2,
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=48,
            norm_topk_prob=False,
        ),
    ),
    "qwen3_moe": (
        transformers.Qwen3MoeConfig,
        dict(
            num_hidden_layers=2,
            head_dim=32,
            num_experts=8,
            num_experts_per_tok=3,
            moe_intermediate_size=32,
            norm_topk_prob=True,
            mlp_only_layers=[1],
        ),
    ),
}


def tiny_config(name: str, overrides: dict | None = None) -> transformers.PretrainedConfig:
    """The HF config of TINY_CONFIGS[name], with `overrides` applied."""
    config_class, entry_overrides = TINY_CONFIGS[name]
    return config_class(**{**COMMON, **entry_overrides, **(overrides or {})})


def build_tiny_model(name: str, seed: int = 0, overrides: dict | None = None) -> transformers.PreTrainedModel:
    """A float32 random model whose weights are large enough that every term matters; `overrides`
    change the entry's config."""
    config = tiny_config(name, overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if "norm" in param_name:
                param.copy_(1.0 + 0.2 * torch.randn_like(param) if not name.startswith("gemma") else 0.2 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.08)
                if param_name.endswith("bias"):
                    param.mul_(5.0)
    return model.eval()


def save_tiny_model(
    name: str, directory: pathlib.Path, seed: int = 0, overrides: dict | None = None
) -> transformers.PreTrainedModel:
    model = build_tiny_model(name, seed, overrides)
    model.save_pretrained(directory, safe_serialization=True)
    return model


def reference_logits(model: transformers.PreTrainedModel, tokens: np.ndarray) -> np.ndarray:
    """tokens: [batch, seq] -> float32 logits [batch, seq, vocab] from transformers."""
    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()
