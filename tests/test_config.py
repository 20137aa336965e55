"""Model configurations: presets against published parameter counts, HF config translation."""

import pytest

from jinfer import config as config_lib
from jinfer.model import count_params

PRESETS = [
    "smollm2-135m",
    "llama-3.1-8b",
    "llama-3.1-70b",
    "qwen2.5-7b",
    "qwen3-8b",
    "mistral-7b-v0.3",
    "gemma-2-2b",
    "gemma-2-9b",
    "mixtral-8x7b",
    "qwen3-30b-a3b",
]
# MoE model cards publish rounded totals (Qwen3-30B-A3B: "30.5B"); dense counts are exact.
MOE_COUNT_TOLERANCE = 0.01


def test_required_presets_exist():
    assert set(PRESETS) <= set(config_lib.preset_names())


@pytest.mark.parametrize("name", PRESETS)
def test_preset_parameter_count_matches_published(name):
    config, reference = config_lib.read_preset(name)
    published = reference["num_params"]
    if config.num_experts:
        assert abs(count_params(config) - published) / published < MOE_COUNT_TOLERANCE
    else:
        assert count_params(config) == published


def test_config_is_hashable_and_frozen():
    config, _ = config_lib.read_preset("gemma-2-2b")
    assert hash(config) == hash(config_lib.read_preset("gemma-2-2b")[0])
    with pytest.raises(AttributeError):
        config.num_layers = 3


def test_gemma2_alternates_local_and_global_layers():
    config, _ = config_lib.read_preset("gemma-2-2b")
    assert config.layer_windows[:4] == (4096, 0, 4096, 0)


def test_dict_round_trip():
    config, _ = config_lib.read_preset("llama-3.1-8b")
    assert config_lib.config_from_dict(config_lib.config_to_dict(config)) == config


def test_hf_config_v4_rope_layout_and_gemma2_windows():
    hf = {
        "architectures": ["Gemma2ForCausalLM"],
        "model_type": "gemma2",
        "vocab_size": 10,
        "hidden_size": 8,
        "intermediate_size": 16,
        "num_hidden_layers": 3,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 4,
        "rope_theta": 1234.0,
        "sliding_window": 7,
        "query_pre_attn_scalar": 16,
    }
    config = config_lib.from_hf_config(hf)
    assert config.rope.theta == 1234.0
    assert config.layer_windows == (7, 0, 7)
    assert config.attention_scale == 16**-0.5
    assert config.tie_word_embeddings and config.norm_offset == 1.0


def test_unknown_architecture_is_named():
    with pytest.raises(ValueError, match="FalconForCausalLM"):
        config_lib.from_hf_config({"architectures": ["FalconForCausalLM"]}, source="x/config.json")


def test_unsupported_rope_type_is_named():
    with pytest.raises(ValueError, match="yarn"):
        config_lib.RopeConfig(rope_type="yarn")


def test_unknown_preset_is_named():
    with pytest.raises(ValueError, match="no-such-model"):
        config_lib.read_preset("no-such-model")
