"""Write tiny GGUF files the way llama.cpp's convert_hf_to_gguf.py does, for the GGUF tests.

The tensor names are written out by hand here (not taken from gguf's name table), so the
reader's use of that table is checked against an independent source.
"""

from __future__ import annotations

import pathlib
import re

import gguf
import numpy as np

# HF module name -> GGUF tensor name, as llama.cpp's converter writes them.
_GLOBAL_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
_BLOCK_NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "block_sparse_moe.gate": "ffn_gate_inp",
    "mlp.gate": "ffn_gate_inp",
    "mlp.shared_expert.gate_proj": "ffn_gate_shexp",
    "mlp.shared_expert.up_proj": "ffn_up_shexp",
    "mlp.shared_expert.down_proj": "ffn_down_shexp",
    "mlp.shared_expert_gate": "ffn_gate_inp_shexp",
}
# One HF tensor per expert, `model.layers.{bid}.{mlp}.experts.{e}.{projection}.weight`; the
# converter stacks each projection's experts into one [experts, rows, columns] tensor.
_EXPERT_TENSOR = re.compile(r"model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)\.weight")
_STACKED_EXPERT_NAMES = {
    "gate_proj": "ffn_gate_exps",
    "w1": "ffn_gate_exps",
    "up_proj": "ffn_up_exps",
    "w3": "ffn_up_exps",
    "down_proj": "ffn_down_exps",
    "w2": "ffn_down_exps",
}
# Gemma 2 has four norms per block; its post-attention norm is not the FFN norm.
_GEMMA2_BLOCK_NAMES = {
    **_BLOCK_NAMES,
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}


def gguf_name(arch: str, hf_name: str) -> str:
    """The GGUF tensor name llama.cpp's converter gives the HF tensor ``hf_name``."""
    module, suffix = hf_name.rsplit(".", 1)
    if module in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[module]}.{suffix}"
    _, _, bid, rest = module.split(".", 3)
    names = _GEMMA2_BLOCK_NAMES if arch == "gemma2" else _BLOCK_NAMES
    return f"blk.{bid}.{names[rest]}.{suffix}"


def stack_experts(state_dict: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Splits ``state_dict`` into its non-expert tensors and the GGUF tensors that stack each
    block's per-expert projections in expert order (``blk.0.ffn_gate_exps.weight``)."""
    rest, experts = {}, {}
    for hf_name, value in state_dict.items():
        match = _EXPERT_TENSOR.fullmatch(hf_name)
        if match is None:
            rest[hf_name] = value
            continue
        bid, expert, projection = match.groups()
        experts.setdefault(f"blk.{bid}.{_STACKED_EXPERT_NAMES[projection]}.weight", {})[int(expert)] = value
    stacked = {name: np.stack([by_expert[e] for e in sorted(by_expert)]) for name, by_expert in experts.items()}
    return rest, stacked


def _add_moe_metadata(writer: gguf.GGUFWriter, config) -> None:
    """The expert keys llama.cpp's converter writes for Mixtral, Qwen2-MoE and Qwen3-MoE."""
    writer.add_expert_count(config.num_experts)
    writer.add_expert_used_count(config.num_experts_per_tok)
    if getattr(config, "moe_intermediate_size", None):
        writer.add_expert_feed_forward_length(config.moe_intermediate_size)
    if getattr(config, "shared_expert_intermediate_size", None):
        writer.add_expert_shared_feed_forward_length(config.shared_expert_intermediate_size)


def llama_cpp_permute(rows: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute: rows [n_head * head_dim, ...] from HF's rotary halves to
    interleaved pairs."""
    pairs = rows.reshape(n_head, 2, rows.shape[0] // n_head // 2, *rows.shape[1:])
    return pairs.swapaxes(1, 2).reshape(rows.shape)


def converted_tensor(arch: str, config, hf_name: str, value: np.ndarray) -> np.ndarray:
    """``value`` as llama.cpp's converter stores it: Q/K rows permuted for llama, +1 on gemma norms."""
    if arch == "llama" and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
        return llama_cpp_permute(value, config.num_attention_heads)
    if arch == "llama" and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
        return llama_cpp_permute(value, config.num_key_value_heads)
    if arch in ("gemma", "gemma2") and hf_name.endswith("norm.weight"):
        return value + np.float32(1)
    return value


def head_dim_of(config) -> int:
    """The attention head size of an HF config, which only some configs state."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def write_gguf(
    path: pathlib.Path,
    arch: str,
    config,
    state_dict: dict[str, np.ndarray],
    qtype: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.F32,
    extra_tensors: dict[str, np.ndarray] | None = None,
    extra_kv: dict[str, float | int | str] | None = None,
) -> None:
    """Write ``state_dict`` (HF names, float32) and ``config`` (an HF config) as GGUF.

    2-D and stacked-expert 3-D tensors are stored as ``qtype``, 1-D ones as F32; tied models get
    no output tensor.
    """
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name("tiny-test-model")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    head_dim = head_dim_of(config)
    if getattr(config, "head_dim", None) is not None:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if arch == "llama":
        writer.add_vocab_size(config.vocab_size)
        writer.add_rope_dimension_count(head_dim)
    if arch == "gemma2":
        writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
        writer.add_final_logit_softcapping(config.final_logit_softcapping)
        writer.add_sliding_window(config.sliding_window)
    if getattr(config, "num_experts", 0):
        _add_moe_metadata(writer, config)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(["a", "b", "ab"] + [f"tok{i}" for i in range(3, config.vocab_size)])
    writer.add_token_merges(["a b"])
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_id)
    for key, value in (extra_kv or {}).items():
        if isinstance(value, str):
            writer.add_string(f"{arch}.{key}", value)
        elif isinstance(value, int):
            writer.add_uint32(f"{arch}.{key}", value)
        else:
            writer.add_float32(f"{arch}.{key}", value)
    state_dict, stacked_experts = stack_experts(state_dict)
    tensors = {}
    for hf_name, value in state_dict.items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        tensors[gguf_name(arch, hf_name)] = converted_tensor(arch, config, hf_name, value.astype(np.float32))
    tensors.update(stacked_experts)
    for name, stored in tensors.items():
        if stored.ndim >= 2 and qtype != gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, gguf.quants.quantize(stored, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, stored)
    for name, value in (extra_tensors or {}).items():
        writer.add_tensor(name, value.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
