"""Frozen, hashable model configuration, built from HF config.json, GGUF metadata or a TOML preset."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import tomllib
from typing import Any

from jinfer.ops.backend import check_kernel_mode

CONFIGS_DIR = pathlib.Path(os.environ.get("JINFER_CONFIGS", pathlib.Path(__file__).resolve().parents[1] / "configs"))
PRESETS_DIR = CONFIGS_DIR / "models"

# HF `architectures` entry -> jinfer architecture family.
HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "GemmaForCausalLM": "gemma",
    "Gemma2ForCausalLM": "gemma2",
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}
ARCHITECTURES = frozenset(HF_ARCHITECTURES.values())
ROPE_TYPES = ("default", "linear", "llama3")
ACTIVATIONS = ("silu", "gelu_tanh")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding: base frequency and optional context-extension scaling."""

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"unsupported rope_type {self.rope_type!r}; supported: {ROPE_TYPES}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything that fixes the shapes and the maths of a decoder. Static under jit."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = RopeConfig()
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: bool = False
    activation: str = "silu"
    norm_offset: float = 0.0
    scale_embeddings: bool = False
    sandwich_norms: bool = False
    query_pre_attn_scalar: float | None = None
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    layer_windows: tuple[int, ...] = ()
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # Mixture of experts: which layers replace the dense MLP by `num_experts` experts of width
    # `moe_intermediate_size`, `num_experts_per_tok` of them per token (softmax over all router
    # logits, top-k, renormalised to sum to 1 if `norm_topk_prob`), plus an always-on shared
    # expert behind a sigmoid gate when `shared_expert_intermediate_size` > 0 (Qwen2-MoE).
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    shared_expert_intermediate_size: int = 0
    moe_layers: tuple[bool, ...] = ()

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {self.architecture!r}; supported: {sorted(ARCHITECTURES)}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; supported: {ACTIVATIONS}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if not self.layer_windows:
            object.__setattr__(self, "layer_windows", (0,) * self.num_layers)
        if len(self.layer_windows) != self.num_layers:
            raise ValueError(f"layer_windows has {len(self.layer_windows)} entries for {self.num_layers} layers")
        if not self.moe_layers or (self.num_experts == 0 and not any(self.moe_layers)):
            object.__setattr__(self, "moe_layers", (self.num_experts > 0,) * self.num_layers)
        self._check_moe()

    def _check_moe(self):
        if len(self.moe_layers) != self.num_layers:
            raise ValueError(f"moe_layers has {len(self.moe_layers)} entries for {self.num_layers} layers")
        if not any(self.moe_layers):
            return
        if self.num_experts < 1:
            raise ValueError(f"moe_layers marks sparse layers but num_experts={self.num_experts}")
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(
                f"num_experts_per_tok={self.num_experts_per_tok} must be between 1 and num_experts={self.num_experts}"
            )
        if self.moe_intermediate_size < 1:
            raise ValueError(f"moe_intermediate_size={self.moe_intermediate_size} must be at least 1")

    @property
    def attention_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)


def _rope_from_hf(hf: dict[str, Any]) -> RopeConfig:
    """Reads both the v4 (`rope_theta` + `rope_scaling`) and the v5 (`rope_parameters`) layouts."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling") or {}
    params = {**scaling, **params}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    fields = {k: params[k] for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings") if k in params}
    return RopeConfig(theta=float(theta), rope_type=rope_type, **fields)


def _layer_windows(hf: dict[str, Any], num_layers: int) -> tuple[int, ...]:
    """Per-layer sliding window (0 = full attention), from `layer_types` or the legacy flags."""
    window = hf.get("sliding_window") or 0
    layer_types = hf.get("layer_types")
    if layer_types:
        return tuple(window if kind == "sliding_attention" else 0 for kind in layer_types)
    model_type = hf.get("model_type")
    if model_type == "gemma2":
        return tuple(window if i % 2 == 0 else 0 for i in range(num_layers))
    if model_type in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe"):
        if not hf.get("use_sliding_window", False):
            return (0,) * num_layers
        if model_type == "qwen3_moe":
            return (window,) * num_layers
        first = hf.get("max_window_layers", num_layers)
        if model_type == "qwen2_moe":
            return tuple(window if i % 2 == 0 and i < first else 0 for i in range(num_layers))
        return tuple(window if i >= first else 0 for i in range(num_layers))
    return (window,) * num_layers


def _attention_bias(hf: dict[str, Any], arch: str) -> bool:
    if arch == "qwen2_moe":  # Qwen2MoeConfig calls it qkv_bias
        return hf.get("qkv_bias", True)
    return hf.get("attention_bias", arch == "qwen2")


def _moe_fields(hf: dict[str, Any], arch: str, num_layers: int) -> dict[str, Any]:
    """The ModelConfig MoE fields of a Mixtral / Qwen2-MoE / Qwen3-MoE config (none for dense families).

    Mixtral's experts have the width `intermediate_size` and always renormalise their top-k
    weights; Qwen's layer i is sparse unless listed in `mlp_only_layers` or (i + 1) is not a
    multiple of `decoder_sparse_step`.
    """
    if arch == "mixtral":
        return dict(
            num_experts=hf["num_local_experts"],
            num_experts_per_tok=hf["num_experts_per_tok"],
            moe_intermediate_size=hf["intermediate_size"],
            norm_topk_prob=True,
        )
    if arch not in ("qwen2_moe", "qwen3_moe"):
        return {}
    num_experts = hf.get("num_experts") or hf.get("num_local_experts") or 0
    step = hf.get("decoder_sparse_step") or 1
    dense = set(hf.get("mlp_only_layers") or ())
    return dict(
        num_experts=num_experts,
        num_experts_per_tok=hf["num_experts_per_tok"],
        moe_intermediate_size=hf["moe_intermediate_size"],
        norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
        shared_expert_intermediate_size=hf.get("shared_expert_intermediate_size", 0) if arch == "qwen2_moe" else 0,
        moe_layers=tuple(num_experts > 0 and i not in dense and (i + 1) % step == 0 for i in range(num_layers)),
    )


def _eos_ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, (list, tuple)) else (int(value),)


def from_hf_config(hf: dict[str, Any], source: str = "config") -> ModelConfig:
    """Translates a Hugging Face `config.json` dict; `source` names it in errors."""
    names = hf.get("architectures") or []
    known = [HF_ARCHITECTURES[n] for n in names if n in HF_ARCHITECTURES]
    if not known:
        raise ValueError(f"{source}: unknown architecture {names or hf.get('model_type')!r}; supported: {sorted(HF_ARCHITECTURES)}")
    arch = known[0]
    num_layers = hf["num_hidden_layers"]
    num_heads = hf["num_attention_heads"]
    gemma = arch in ("gemma", "gemma2")
    activation = hf.get("hidden_activation") or hf.get("hidden_act") or "silu"
    return ModelConfig(
        architecture=arch,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope=_rope_from_hf(hf),
        max_position_embeddings=hf.get("max_position_embeddings", 8192),
        tie_word_embeddings=hf.get("tie_word_embeddings", gemma),
        attention_bias=_attention_bias(hf, arch),
        qk_norm=arch in ("qwen3", "qwen3_moe"),
        activation="gelu_tanh" if activation.startswith("gelu") else activation,
        norm_offset=1.0 if gemma else 0.0,
        scale_embeddings=gemma,
        sandwich_norms=arch == "gemma2",
        query_pre_attn_scalar=hf.get("query_pre_attn_scalar") if arch == "gemma2" else None,
        attn_logit_softcap=hf.get("attn_logit_softcapping") if arch == "gemma2" else None,
        final_logit_softcap=hf.get("final_logit_softcapping") if arch == "gemma2" else None,
        layer_windows=_layer_windows(hf, num_layers),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=_eos_ids(hf.get("eos_token_id")),
        **_moe_fields(hf, arch, num_layers),
    )


def read_hf_config(directory: str | os.PathLike) -> ModelConfig:
    path = pathlib.Path(directory) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in checkpoint directory {str(directory)!r}")
    return from_hf_config(json.loads(path.read_text()), source=str(path))


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.toml"))


def read_preset(name: str) -> tuple[ModelConfig, dict[str, Any]]:
    """A TOML preset: its `[model]` table (ModelConfig fields, `[model.rope]` nested) and its `[reference]` facts."""
    path = PRESETS_DIR / f"{name}.toml"
    if not path.is_file():
        raise ValueError(f"unknown preset {name!r}; available presets: {preset_names()}")
    data = tomllib.loads(path.read_text())
    return config_from_dict(data["model"]), data.get("reference", {})


def config_to_dict(config: ModelConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def config_from_dict(data: dict[str, Any]) -> ModelConfig:
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    values = {k: v for k, v in data.items() if k in fields}
    values["rope"] = RopeConfig(**values.get("rope", {}))
    for key in ("layer_windows", "eos_token_ids", "moe_layers"):
        values[key] = tuple(values.get(key, ()))
    return ModelConfig(**values)


def _powers_of_two_up_to(limit: int, smallest: int) -> tuple[int, ...]:
    """smallest, 2*smallest, ... below `limit`, then `limit` itself."""
    sizes, size = [], smallest
    while size < limit:
        sizes.append(size)
        size *= 2
    return tuple(sizes) + (limit,)


KV_CACHE_DTYPES = ("auto", "int8")
# What the front doors (jinfer.LLM, the CLI, the benchmark) change from EngineConfig's defaults. An
# Engine stepped by hand runs one program per step (its `last_output` holds each step's logits);
# serving fuses decode steps, which on the 2-core CPU gave ~30% more batch-1 tokens/s (WORKSPACE.md).
SERVING_DEFAULTS = {"fused_decode_steps": 8}


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Serving limits and the padded shapes ("buckets") the step is compiled for.

    Buckets are powers of two. Tokens and rows start at 1: XLA:CPU multiplies a single row by
    a weight matrix (matrix-vector) several times faster than it multiplies two to eight rows,
    so a batch-1 decode must not be padded. Pages per row start at 4 (short contexts share one
    compile; the gather they cost is small).
    """

    max_num_seqs: int = 32
    max_model_len: int = 2048
    max_num_batched_tokens: int = 256
    page_size: int = 16
    kv_cache_memory: str = "256MiB"
    program_cache: str = ""  # directory of serialized step programs (see jinfer.step_programs); "": trace every start
    kernels: str = "auto"  # hot ops: auto | reference | native | pallas | interpret (see jinfer.ops.backend)
    kv_cache_dtype: str = "auto"  # KV page pool: auto (the model's dtype) | int8 (per token-and-head scales, see jinfer.cache)
    fused_decode_steps: int = 1  # decode steps run as one program while every running request decodes (see jinfer.decode_loop)

    def __post_init__(self):
        for name in ("max_num_seqs", "max_model_len", "max_num_batched_tokens", "page_size", "fused_decode_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens={self.max_num_batched_tokens} must be >= max_num_seqs={self.max_num_seqs} "
                "so that every running sequence can decode in one step"
            )
        check_kernel_mode(self.kernels)
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype={self.kv_cache_dtype!r} is not one of {KV_CACHE_DTYPES} ('auto': the model's dtype)")

    @property
    def max_pages_per_seq(self) -> int:
        return -(-self.max_model_len // self.page_size)

    @property
    def token_buckets(self) -> tuple[int, ...]:
        return _powers_of_two_up_to(self.max_num_batched_tokens, 1)

    @property
    def seq_buckets(self) -> tuple[int, ...]:
        return _powers_of_two_up_to(self.max_num_seqs, 1)

    @property
    def page_buckets(self) -> tuple[int, ...]:
        return _powers_of_two_up_to(self.max_pages_per_seq, 4)
