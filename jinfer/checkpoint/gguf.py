"""Read a GGUF file as if it were a Hugging Face checkpoint.

llama.cpp's converter changes an HF checkpoint in four ways on the way into GGUF, and this module
undoes each so the rest of jinfer sees HF names, HF layouts and HF values:

* names: ``model.layers.0.self_attn.q_proj.weight`` becomes ``blk.0.attn_q.weight``; mapped back
  with gguf's own name table (``gguf.get_tensor_name_map``); the per-expert tensors of a
  mixture of experts (``mlp.experts.3.gate_proj.weight``) are stacked into one 3-D tensor per
  projection (``blk.0.ffn_gate_exps.weight``), presented again as one HF name per expert;
* config: ``config.json`` becomes ``{arch}.*`` metadata keys; rebuilt by ``hf_config``;
* llama-architecture files: the rows of q_proj and k_proj (weights and biases) are permuted per
  head from HF's half-split rotary layout to an interleaved one; inverted here;
* gemma and gemma2: RMSNorm weights ``w`` are stored as ``1 + w``; 1 is subtracted here.

Tensors are memory-mapped and decoded one at a time, on request.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import gguf
import numpy as np

# GGUF architecture -> (HF architecture class, HF model_type).
_ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
    "gemma": ("GemmaForCausalLM", "gemma"),
    "gemma2": ("Gemma2ForCausalLM", "gemma2"),
    "qwen2moe": ("Qwen2MoeForCausalLM", "qwen2_moe"),
    "qwen3moe": ("Qwen3MoeForCausalLM", "qwen3_moe"),
}
# A llama-architecture file with experts is a Mixtral.
_LLAMA_WITH_EXPERTS = ("MixtralForCausalLM", "mixtral")
# Architectures whose q_proj/k_proj rows the converter permutes (its LlamaModel.permute).
_QK_PERMUTED = frozenset({"llama"})
# Architectures whose RMSNorm weights the converter stores as 1 + w.
_NORM_PLUS_ONE = frozenset({"gemma", "gemma2"})

# HF module names a supported model can have; gguf's table says which exist per architecture.
_HF_GLOBAL_MODULES = ("model.embed_tokens", "model.norm", "lm_head")
_HF_BLOCK_MODULES = (
    "input_layernorm",
    "post_attention_layernorm",
    "pre_feedforward_layernorm",
    "post_feedforward_layernorm",
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "self_attn.q_norm",
    "self_attn.k_norm",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
# Sparse blocks, by HF model_type: (modules stored whole, expert modules stored stacked).
# Mixtral and Qwen modules map to the same GGUF names, so only the model's own are looked up.
_QWEN_EXPERT_MODULES = ("mlp.experts.gate_proj", "mlp.experts.up_proj", "mlp.experts.down_proj")
_HF_MOE_MODULES = {
    "mixtral": (
        ("block_sparse_moe.gate",),
        ("block_sparse_moe.experts.w1", "block_sparse_moe.experts.w2", "block_sparse_moe.experts.w3"),
    ),
    "qwen2_moe": (
        (
            "mlp.gate",
            "mlp.shared_expert.gate_proj",
            "mlp.shared_expert.up_proj",
            "mlp.shared_expert.down_proj",
            "mlp.shared_expert_gate",
        ),
        _QWEN_EXPERT_MODULES,
    ),
    "qwen3_moe": (("mlp.gate",), _QWEN_EXPERT_MODULES),
}
# Whether top-k routing weights are renormalised, where the file has no expert_weights_norm key
# (llama.cpp's per-architecture choice).
_DEFAULT_NORM_TOPK = {"mixtral": True, "qwen2_moe": False, "qwen3_moe": True}

# Tensor types the reader already decodes into numbers; gguf.quants.dequantize takes the rest.
_PLAIN_TYPES = frozenset(
    {
        gguf.GGMLQuantizationType.F64,
        gguf.GGMLQuantizationType.I8,
        gguf.GGMLQuantizationType.I16,
        gguf.GGMLQuantizationType.I32,
        gguf.GGMLQuantizationType.I64,
    }
)

# Errors gguf.GGUFReader raises on a truncated or malformed file.
_READER_ERRORS = (ValueError, KeyError, IndexError, TypeError, OverflowError)

# llama3 rope scaling: the context length the recovered scaling is expressed against, and the
# HF defaults used when rope_freqs has too few blended frequencies to fit the two factors.
_LLAMA3_ORIGINAL_CONTEXT = 8192
_LLAMA3_DEFAULT_LOW_HIGH = (1.0, 4.0)


class GGUFCheckpoint:
    """A GGUF file presented with HF tensor names, HF layouts and an HF-style config."""

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {self.path}")
        try:
            self._reader = gguf.GGUFReader(self.path)
        except _READER_ERRORS as error:
            raise ValueError(f"{self.path} is not a readable GGUF file: {error}") from error
        self.metadata: dict[str, Any] = {
            key: _field_value(field) for key, field in self._reader.fields.items()
        }
        self._arch = self.metadata.get("general.architecture")
        if self._arch not in _ARCHITECTURES:
            raise ValueError(
                f"unsupported GGUF architecture {self._arch!r} in {self.path}; "
                f"supported: {', '.join(_ARCHITECTURES)}"
            )
        self._hf_class, self._model_type = _ARCHITECTURES[self._arch]
        if self._arch == "llama" and self._kv("expert_count", 0):
            self._hf_class, self._model_type = _LLAMA_WITH_EXPERTS
        whole, stacked = _HF_MOE_MODULES.get(self._model_type, ((), ()))
        num_blocks = self._kv("block_count")
        names = _gguf_to_hf_modules(self._arch, num_blocks, _HF_BLOCK_MODULES + whole, _HF_GLOBAL_MODULES)
        expert_names = _gguf_to_hf_modules(self._arch, num_blocks, stacked)
        # HF name -> (GGUF tensor, expert index into its leading axis, or None for the whole tensor).
        self._tensors: dict[str, tuple[gguf.ReaderTensor, int | None]] = {}
        self._unmapped: dict[str, gguf.ReaderTensor] = {}
        for tensor in self._reader.tensors:
            module, _, suffix = tensor.name.rpartition(".")
            if module in names and suffix in ("weight", "bias"):
                self._tensors[f"{names[module]}.{suffix}"] = (tensor, None)
            elif module in expert_names and suffix == "weight":
                for expert in range(int(tensor.shape[-1])):
                    self._tensors[_expert_tensor_name(expert_names[module], expert)] = (tensor, expert)
            else:
                self._unmapped[tensor.name] = tensor

    def hf_config(self) -> dict:
        """The HF ``config.json`` contents this file was converted from, as far as GGUF keeps them."""
        hidden_size = self._kv("embedding_length")
        num_heads = self._kv("attention.head_count")
        num_layers = self._kv("block_count")
        head_dim = self._kv("attention.key_length", hidden_size // num_heads)
        activation = "gelu_pytorch_tanh" if self._arch in _NORM_PLUS_ONE else "silu"
        config = {
            "architectures": [self._hf_class],
            "model_type": self._model_type,
            "vocab_size": self.raw_tensor("model.embed_tokens.weight")[2][0],
            "hidden_size": hidden_size,
            "intermediate_size": self._kv("feed_forward_length"),
            "num_hidden_layers": num_layers,
            "num_attention_heads": num_heads,
            "num_key_value_heads": self._kv("attention.head_count_kv", num_heads),
            "head_dim": head_dim,
            "rms_norm_eps": self._kv("attention.layer_norm_rms_epsilon"),
            "rope_theta": self._kv("rope.freq_base", 10000.0),
            "max_position_embeddings": self._kv("context_length"),
            "tie_word_embeddings": "lm_head.weight" not in self._tensors,
            "attention_bias": "model.layers.0.self_attn.q_proj.bias" in self._tensors,
            "hidden_act": activation,
        }
        for hf_key, gguf_key in (
            ("bos_token_id", "tokenizer.ggml.bos_token_id"),
            ("eos_token_id", "tokenizer.ggml.eos_token_id"),
            ("pad_token_id", "tokenizer.ggml.padding_token_id"),
        ):
            if gguf_key in self.metadata:
                config[hf_key] = self.metadata[gguf_key]
        if self._model_type == "qwen2_moe":
            config["qkv_bias"] = config["attention_bias"]
        config.update(self._moe_config())
        if self._arch in _NORM_PLUS_ONE:
            config["hidden_activation"] = activation
        if self._arch == "gemma2":
            # Defaults and the 27B (46-layer) query scale are llama.cpp's; GGUF stores neither.
            config["attn_logit_softcapping"] = self._kv("attn_logit_softcapping", 50.0)
            config["final_logit_softcapping"] = self._kv("final_logit_softcapping", 30.0)
            config["sliding_window"] = self._kv("attention.sliding_window", 4096)
            config["query_pre_attn_scalar"] = hidden_size // num_heads if num_layers == 46 else head_dim
        rope_scaling = self._rope_scaling(config["rope_theta"], self._kv("rope.dimension_count", head_dim))
        if rope_scaling is not None:
            config["rope_scaling"] = rope_scaling
        return config

    def _moe_config(self) -> dict:
        """HF MoE config keys: expert counts and widths, routing normalisation. Every layer is
        sparse: llama.cpp's tensor lists for these architectures have no dense MLP."""
        if self._model_type not in _HF_MOE_MODULES:
            return {}
        count_key = "num_local_experts" if self._model_type == "mixtral" else "num_experts"
        config = {
            count_key: self._kv("expert_count"),
            "num_experts_per_tok": self._kv("expert_used_count"),
            "norm_topk_prob": bool(self._kv("expert_weights_norm", _DEFAULT_NORM_TOPK[self._model_type])),
        }
        if self._model_type == "mixtral":
            return config
        config["moe_intermediate_size"] = self._kv("expert_feed_forward_length")
        if self._model_type == "qwen2_moe":
            config["shared_expert_intermediate_size"] = self._kv("expert_shared_feed_forward_length")
        return config

    def tensor_names(self) -> list[str]:
        """HF names of the model tensors in the file, in file order (stacked experts: one name per expert)."""
        return list(self._tensors)

    def tensor(self, hf_name: str) -> np.ndarray:
        """The tensor as float32 in HF layout and values: [out_features, in_features] for linear
        weights (one expert's for an expert's), [vocab, hidden] for the embedding, [n] for norms
        and biases."""
        tensor, expert = self._lookup(hf_name)
        values = _decode(tensor, expert).reshape(_hf_shape(hf_name, tensor, expert))
        if self._arch in _QK_PERMUTED:
            if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
                values = _unpermute_rows(values, self._kv("attention.head_count"))
            elif hf_name.endswith(("k_proj.weight", "k_proj.bias")):
                values = _unpermute_rows(values, self._kv("attention.head_count_kv"))
        if self._arch in _NORM_PLUS_ONE and hf_name.endswith("norm.weight"):
            values = values - np.float32(1)
        return np.array(values, dtype=np.float32)

    def raw_tensor(self, hf_name: str) -> tuple[gguf.GGMLQuantizationType, np.ndarray, tuple[int, ...]]:
        """The stored tensor untouched: its type, its read-only memory-mapped data (quantized
        types: uint8 [rows, bytes per row]) and its HF logical shape.

        Unlike ``tensor``, this neither undoes the q_proj/k_proj row permutation of llama files
        nor the +1 of gemma norm weights.
        """
        tensor, expert = self._lookup(hf_name)
        data = tensor.data if expert is None else tensor.data[expert]
        return tensor.tensor_type, data, _hf_shape(hf_name, tensor, expert)

    def _lookup(self, hf_name: str) -> tuple[gguf.ReaderTensor, int | None]:
        if hf_name not in self._tensors:
            raise KeyError(f"tensor {hf_name!r} not in {self.path}")
        return self._tensors[hf_name]

    def _kv(self, key: str, default: Any = None) -> Any:
        """The metadata value ``{arch}.{key}``; required when no default is given."""
        full_key = f"{self._arch}.{key}"
        if full_key in self.metadata:
            return self.metadata[full_key]
        if default is None:
            raise ValueError(f"{self.path} lacks the metadata key {full_key!r}")
        return default

    def _rope_scaling(self, theta: float, rope_dim: int) -> dict | None:
        """HF ``rope_scaling`` from the rope.scaling.* keys, or from a llama3 rope_freqs tensor."""
        scaling_type = self._kv("rope.scaling.type", "none")
        if scaling_type == "linear":
            return {"rope_type": "linear", "factor": self._kv("rope.scaling.factor")}
        if scaling_type == "yarn":
            scaling = {
                "rope_type": "yarn",
                "factor": self._kv("rope.scaling.factor"),
                "original_max_position_embeddings": self._kv("rope.scaling.original_context_length"),
            }
            for hf_key, gguf_key in (
                ("beta_fast", "yarn_beta_fast"),
                ("beta_slow", "yarn_beta_slow"),
                ("attention_factor", "yarn_attn_factor"),
            ):
                if f"{self._arch}.rope.scaling.{gguf_key}" in self.metadata:
                    scaling[hf_key] = self._kv(f"rope.scaling.{gguf_key}")
            return scaling
        if scaling_type != "none":
            raise ValueError(f"unsupported rope scaling type {scaling_type!r} in {self.path}")
        if "rope_freqs.weight" not in self._unmapped:
            return None
        divisors = _decode(self._unmapped["rope_freqs.weight"])
        scaling = _llama3_rope_scaling(divisors, theta, rope_dim)
        if scaling is None:
            return None
        if not np.allclose(_llama3_divisors(scaling, theta, rope_dim), divisors, rtol=1e-4):
            raise ValueError(f"rope_freqs in {self.path} does not follow llama3 rope scaling")
        return scaling


def _field_value(field: gguf.ReaderField) -> Any:
    """A metadata value; float32 scalars as the shortest decimal that round-trips (1e-05)."""
    value = field.contents()
    if field.types == [gguf.GGUFValueType.FLOAT32]:
        return float(str(np.float32(value)))
    return value


def _decode(tensor: gguf.ReaderTensor, expert: int | None = None) -> np.ndarray:
    """The tensor's values as float32, in the stored layout (HF shape order, [rows, columns]);
    with `expert`, only that slice of the leading (expert) axis is decoded."""
    data = tensor.data if expert is None else tensor.data[expert]
    if tensor.tensor_type in _PLAIN_TYPES:
        return data.astype(np.float32)
    return gguf.quants.dequantize(data, tensor.tensor_type)


def _hf_shape(hf_name: str, tensor: gguf.ReaderTensor, expert: int | None) -> tuple[int, ...]:
    """The HF shape of a tensor (or of one expert's slice). Qwen2-MoE's shared_expert_gate is
    HF's [1, hidden]; some files store it as [hidden]."""
    shape = tuple(int(d) for d in reversed(tensor.shape))
    if expert is not None:
        shape = shape[1:]
    if hf_name.endswith("shared_expert_gate.weight"):
        return (1, int(np.prod(shape)))
    return shape


def _expert_tensor_name(stacked_module: str, expert: int) -> str:
    """('model.layers.0.mlp.experts.gate_proj', 3) -> 'model.layers.0.mlp.experts.3.gate_proj.weight'."""
    experts_module, _, projection = stacked_module.rpartition(".")
    return f"{experts_module}.{expert}.{projection}.weight"


def _gguf_to_hf_modules(
    arch: str, num_blocks: int, block_modules: tuple[str, ...], global_modules: tuple[str, ...] = ()
) -> dict[str, str]:
    """GGUF module names (``blk.0.attn_q``) -> HF module names, from gguf's name table.

    block_modules are relative to a block (``self_attn.q_proj``); global_modules are full names.
    """
    model_arch = next(key for key, name in gguf.MODEL_ARCH_NAMES.items() if name == arch)
    name_map = gguf.get_tensor_name_map(model_arch, num_blocks)
    hf_modules = list(global_modules)
    hf_modules += [f"model.layers.{bid}.{module}" for bid in range(num_blocks) for module in block_modules]
    return {gguf_name: hf for hf in hf_modules if (gguf_name := name_map.get_name(hf)) is not None}


def _unpermute_rows(values: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head rotary row interleave.

    values: [num_heads * head_dim, ...] with each head's rows stored as (head_dim/2, 2) pairs;
    returns the same shape with each head's rows as HF's (2, head_dim/2) halves.
    """
    rows = values.shape[0]
    heads = values.reshape(num_heads, rows // num_heads // 2, 2, *values.shape[1:])
    return heads.swapaxes(1, 2).reshape(values.shape)


def _llama3_rope_scaling(divisors: np.ndarray, theta: float, rope_dim: int) -> dict | None:
    """Recover HF's llama3 ``rope_scaling`` from llama.cpp's rope_freqs tensor.

    divisors: [rope_dim / 2], what each rotary frequency is divided by: 1 for high frequencies,
    ``factor`` for low ones and a blend between. The blend depends on the two wavelength bounds
    original_max_position_embeddings / {low,high}_freq_factor only, so the context length is fixed
    at 8192 and the two factors are fitted to the blended frequencies.
    """
    divisors = divisors.astype(np.float64)
    factor = float(divisors.max())
    if factor <= 1.0:
        return None
    blended = (divisors != 1.0) & (divisors != factor)
    low, high = _LLAMA3_DEFAULT_LOW_HIGH
    if blended.sum() >= 2:
        # smooth = (context / wavelength - low) / (high - low) is linear in context / wavelength.
        smooth = (1 / divisors[blended] - 1 / factor) / (1 - 1 / factor)
        inverse_wavelengths = _inverse_frequencies(theta, rope_dim)[blended] / (2 * np.pi)
        slope, intercept = np.polyfit(_LLAMA3_ORIGINAL_CONTEXT * inverse_wavelengths, smooth, 1)
        low = round(float(-intercept / slope), 4)
        high = round(low + float(1 / slope), 4)
    return {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": _LLAMA3_ORIGINAL_CONTEXT,
    }


def _llama3_divisors(scaling: dict, theta: float, rope_dim: int) -> np.ndarray:
    """The rope_freqs divisors [rope_dim / 2] a llama3 ``rope_scaling`` implies."""
    wavelengths = 2 * np.pi / _inverse_frequencies(theta, rope_dim)
    context, factor = scaling["original_max_position_embeddings"], scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    smooth = (context / wavelengths - low) / (high - low)
    blended = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelengths < context / high, 1.0, np.where(wavelengths > context / low, factor, blended))


def _inverse_frequencies(theta: float, rope_dim: int) -> np.ndarray:
    """Rotary inverse frequencies theta^(-2i/rope_dim), [rope_dim / 2]."""
    return theta ** (-np.arange(0, rope_dim, 2, dtype=np.float64) / rope_dim)
