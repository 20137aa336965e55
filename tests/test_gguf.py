"""Tests for jinfer.checkpoint.gguf.

Tiny random HF models are written as GGUF the way llama.cpp's converter does (tests/gguf_fixtures.py)
and read back; the real SmolLM2 GGUF is checked against transformers' own GGUF loader; malformed
input must fail with messages naming the file or tensor.
"""

import math

import gguf
import numpy as np
import pytest
import torch
import transformers
from gguf_fixtures import converted_tensor, gguf_name, head_dim_of, write_gguf

from jinfer.checkpoint.gguf import GGUFCheckpoint

Q = gguf.GGMLQuantizationType

TINY_DIMS = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
)
# Test id -> (GGUF architecture, HF config class, config overrides). Where set, head_dim 32 differs
# from hidden_size / num_attention_heads = 16, so a config that derives it would be caught.
TINY_MODELS = {
    "llama": ("llama", transformers.LlamaConfig, dict(tie_word_embeddings=False)),
    "llama-bias": ("llama", transformers.LlamaConfig, dict(attention_bias=True, tie_word_embeddings=False)),
    "qwen2": ("qwen2", transformers.Qwen2Config, dict(tie_word_embeddings=True)),
    "qwen3": ("qwen3", transformers.Qwen3Config, dict(head_dim=32, tie_word_embeddings=False)),
    "gemma": ("gemma", transformers.GemmaConfig, dict(head_dim=32)),
    "gemma2": (
        "gemma2",
        transformers.Gemma2Config,
        dict(
            head_dim=32,
            query_pre_attn_scalar=32,
            sliding_window=8,
            attn_logit_softcapping=40.0,
            final_logit_softcapping=20.0,
        ),
    ),
}


def tiny_model(kind: str):
    """A tiny HF causal LM of ``kind`` with random weights, its config and numpy state dict."""
    arch, config_class, overrides = TINY_MODELS[kind]
    config = config_class(**TINY_DIMS, rope_theta=50000.0, **overrides)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                # Multiples of 1/64 survive gemma's stored 1 + w exactly in float32.
                param.copy_(torch.randint(-64, 64, param.shape) / 64)
            else:
                param.normal_(0.0, 0.5)
    state_dict = {name: value.numpy().copy() for name, value in model.state_dict().items()}
    return arch, config, model, state_dict


def expected_names(config, state_dict) -> set[str]:
    """The HF tensor names a converted file holds: all but lm_head when embeddings are tied."""
    return {name for name in state_dict if not (name == "lm_head.weight" and config.tie_word_embeddings)}


@pytest.fixture(scope="module", params=list(TINY_MODELS))
def tiny_f32(request, tmp_path_factory):
    """(kind, config, HF model, state dict, GGUFCheckpoint of its float32 GGUF)."""
    arch, config, model, state_dict = tiny_model(request.param)
    path = tmp_path_factory.mktemp(request.param) / "model.gguf"
    write_gguf(path, arch, config, state_dict)
    return request.param, config, model, state_dict, GGUFCheckpoint(path)


def test_float32_tensors_equal_hf_state_dict(tiny_f32):
    _, config, _, state_dict, checkpoint = tiny_f32
    assert set(checkpoint.tensor_names()) == expected_names(config, state_dict)
    for name in checkpoint.tensor_names():
        got = checkpoint.tensor(name)
        assert got.dtype == np.float32 and got.flags.writeable, name
        np.testing.assert_array_equal(got, state_dict[name], err_msg=name)
        assert checkpoint.raw_tensor(name)[2] == state_dict[name].shape, name


def test_hf_config_matches_hf_config(tiny_f32):
    kind, config, model, state_dict, checkpoint = tiny_f32
    got = checkpoint.hf_config()
    assert got["architectures"] == [type(model).__name__]
    assert got["model_type"] == config.model_type
    for key in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "rms_norm_eps",
        "max_position_embeddings",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
    ):
        assert got[key] == getattr(config, key), key
    assert got["head_dim"] == head_dim_of(config)
    assert got["rope_theta"] == config.rope_parameters["rope_theta"]
    assert got["attention_bias"] == ("model.layers.0.self_attn.q_proj.bias" in state_dict)
    assert got["hidden_act"] == (getattr(config, "hidden_activation", None) or config.hidden_act)
    assert "rope_scaling" not in got
    if kind == "gemma2":
        gemma2_keys = ("attn_logit_softcapping", "final_logit_softcapping", "sliding_window", "query_pre_attn_scalar")
        for key in gemma2_keys:
            assert got[key] == getattr(config, key), key


def test_model_rebuilt_from_gguf_gives_same_logits(tiny_f32):
    """HF model built from hf_config() and tensor() computes exactly what the original does."""
    _, config, model, _, checkpoint = tiny_f32
    rebuilt_config = type(config)(**checkpoint.hf_config())
    rebuilt = transformers.AutoModelForCausalLM.from_config(rebuilt_config).eval()
    weights = {name: torch.from_numpy(checkpoint.tensor(name)) for name in checkpoint.tensor_names()}
    missing, unexpected = rebuilt.load_state_dict(weights, strict=False)
    assert unexpected == []
    assert missing == (["lm_head.weight"] if config.tie_word_embeddings else [])
    tokens = torch.randint(0, config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(tokens).logits, model(tokens).logits, rtol=0, atol=0)


# Bound on |dequantized - original| as a fraction of the tensor's largest magnitude.
QUANT_TOLERANCE = {
    Q.Q8_0: 0.01,
    Q.Q5_0: 0.07,
    Q.Q5_1: 0.04,
    Q.Q4_0: 0.13,
    Q.Q4_1: 0.07,
    Q.F16: 1e-3,
    Q.BF16: 4e-3,
}


@pytest.mark.parametrize("qtype", list(QUANT_TOLERANCE), ids=lambda q: q.name)
def test_quantized_tensors(qtype, tmp_path):
    """Quantized q/k rows (permuted in the file) decode to the HF layout; raw_tensor keeps the blocks."""
    arch, config, _, state_dict = tiny_model("llama-bias")
    path = tmp_path / "model.gguf"
    write_gguf(path, arch, config, state_dict, qtype=qtype)
    checkpoint = GGUFCheckpoint(path)
    assert set(checkpoint.tensor_names()) == expected_names(config, state_dict)
    for name in checkpoint.tensor_names():
        original = state_dict[name]
        got = checkpoint.tensor(name)
        raw_type, raw, shape = checkpoint.raw_tensor(name)
        assert shape == original.shape, name
        if original.ndim == 1:
            assert raw_type == Q.F32, name
            np.testing.assert_array_equal(got, original, err_msg=name)
            continue
        assert raw_type == qtype, name
        stored = gguf.quants.quantize(converted_tensor(arch, config, name, original), qtype)
        np.testing.assert_array_equal(raw, stored, err_msg=name)
        expected = gguf.quants.dequantize(gguf.quants.quantize(original, qtype), qtype)
        np.testing.assert_array_equal(got, expected, err_msg=name)
        tolerance = QUANT_TOLERANCE[qtype] * np.abs(original).max()
        np.testing.assert_allclose(got, original, rtol=0, atol=tolerance, err_msg=name)


def llama_cpp_rope_freqs(theta: float, head_dim: int, scaling: dict) -> np.ndarray:
    """The rope_freqs tensor llama.cpp's converter writes for llama3 rope scaling."""
    factors = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        low_wavelen = scaling["original_max_position_embeddings"] / scaling["low_freq_factor"]
        high_wavelen = scaling["original_max_position_embeddings"] / scaling["high_freq_factor"]
        if wavelen < high_wavelen:
            factors.append(1)
        elif wavelen > low_wavelen:
            factors.append(scaling["factor"])
        else:
            smooth = (scaling["original_max_position_embeddings"] / wavelen - scaling["low_freq_factor"]) / (
                scaling["high_freq_factor"] - scaling["low_freq_factor"]
            )
            factors.append(1 / ((1 - smooth) / scaling["factor"] + smooth))
    return np.array(factors, dtype=np.float32)


def tiny_llama_file(path, head_dim=16, rope_theta=50000.0, extra_kv=None, extra_tensors=None):
    """Write a tiny llama GGUF holding only the embedding, plus extra ``llama.*`` keys and tensors."""
    config = transformers.LlamaConfig(**TINY_DIMS, head_dim=head_dim, rope_theta=rope_theta)
    embedding = np.zeros((config.vocab_size, config.hidden_size), np.float32)
    weights = {"model.embed_tokens.weight": embedding}
    write_gguf(path, "llama", config, weights, extra_kv=extra_kv, extra_tensors=extra_tensors)


@pytest.mark.parametrize(
    "head_dim, scaling",
    [
        (128, dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0)),  # Llama 3.1
        (128, dict(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0)),  # Llama 3.2
        (64, dict(factor=16.0, low_freq_factor=2.0, high_freq_factor=8.0)),
        (16, dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0)),  # one blended frequency
    ],
)
def test_llama3_rope_scaling_from_rope_freqs(head_dim, scaling, tmp_path):
    scaling = {"rope_type": "llama3", **scaling, "original_max_position_embeddings": 8192}
    theta = 500000.0
    path = tmp_path / "model.gguf"
    rope_freqs = llama_cpp_rope_freqs(theta, head_dim, scaling)
    tiny_llama_file(path, head_dim, rope_theta=theta, extra_tensors={"rope_freqs.weight": rope_freqs})
    config = GGUFCheckpoint(path).hf_config()
    assert config["rope_scaling"] == pytest.approx(scaling)
    rotary = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding
    rope_parameters = {**scaling, "rope_theta": theta}
    expected = rotary(transformers.LlamaConfig(**TINY_DIMS, head_dim=head_dim, rope_parameters=rope_parameters))
    got = rotary(transformers.LlamaConfig(**config))
    torch.testing.assert_close(got.inv_freq, expected.inv_freq, rtol=1e-6, atol=0)


def test_rope_freqs_that_are_not_llama3_are_rejected(tmp_path):
    path = tmp_path / "model.gguf"
    rope_freqs = np.array([1, 3, 2, 5, 1, 4, 2, 8], np.float32)
    tiny_llama_file(path, 16, extra_tensors={"rope_freqs.weight": rope_freqs})
    with pytest.raises(ValueError, match="rope_freqs.*model.gguf"):
        GGUFCheckpoint(path).hf_config()


@pytest.mark.parametrize(
    "kv, expected",
    [
        ({"rope.scaling.type": "linear", "rope.scaling.factor": 4.0}, {"rope_type": "linear", "factor": 4.0}),
        (
            {
                "rope.scaling.type": "yarn",
                "rope.scaling.factor": 4.0,
                "rope.scaling.original_context_length": 32768,
                "rope.scaling.yarn_beta_fast": 32.0,
                "rope.scaling.yarn_beta_slow": 1.0,
            },
            {
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 32768,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
            },
        ),
    ],
    ids=["linear", "yarn"],
)
def test_rope_scaling_from_metadata(kv, expected, tmp_path):
    path = tmp_path / "model.gguf"
    tiny_llama_file(path, extra_kv=kv)
    assert GGUFCheckpoint(path).hf_config()["rope_scaling"] == expected


def test_unsupported_rope_scaling_type_is_rejected(tmp_path):
    path = tmp_path / "model.gguf"
    tiny_llama_file(path, extra_kv={"rope.scaling.type": "longrope"})
    with pytest.raises(ValueError, match="longrope.*model.gguf"):
        GGUFCheckpoint(path).hf_config()


@pytest.mark.parametrize("num_layers, scalar", [(46, 64 // 4), (42, 32)])
def test_gemma2_query_scale_follows_llama_cpp(num_layers, scalar, tmp_path):
    """llama.cpp scales Gemma 2 27B (46 layers) queries by hidden_size / heads, others by head_dim."""
    config = transformers.Gemma2Config(**{**TINY_DIMS, "num_hidden_layers": num_layers}, head_dim=32)
    path = tmp_path / "model.gguf"
    embedding = np.zeros((config.vocab_size, config.hidden_size), np.float32)
    write_gguf(path, "gemma2", config, {"model.embed_tokens.weight": embedding})
    assert GGUFCheckpoint(path).hf_config()["query_pre_attn_scalar"] == scalar


def test_unknown_architecture_is_rejected(tmp_path):
    path = tmp_path / "model.gguf"
    writer = gguf.GGUFWriter(path, "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"'gpt2'.*model\.gguf"):
        GGUFCheckpoint(path)


def test_missing_file(tmp_path):
    path = tmp_path / "absent.gguf"
    with pytest.raises(FileNotFoundError, match="absent.gguf"):
        GGUFCheckpoint(path)


def test_non_gguf_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"model_type": "llama"}\n' * 20)
    with pytest.raises(ValueError, match="config.json"):
        GGUFCheckpoint(path)


@pytest.mark.parametrize("cut", ["empty", "magic", "metadata", "tensor-info", "first-tensor", "last-byte"])
def test_truncated_file(cut, tmp_path):
    whole = tmp_path / "whole.gguf"
    arch, config, _, state_dict = tiny_model("llama")
    write_gguf(whole, arch, config, state_dict)
    data = whole.read_bytes()
    data_offset = gguf.GGUFReader(whole).data_offset
    size = {
        "empty": 0,
        "magic": 3,
        "metadata": 100,
        "tensor-info": data_offset - 40,
        "first-tensor": data_offset + 100,
        "last-byte": len(data) - 1,
    }[cut]
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(data[:size])
    with pytest.raises(ValueError, match="truncated.gguf"):
        GGUFCheckpoint(truncated)


def test_unknown_tensor_name(tiny_f32):
    checkpoint = tiny_f32[-1]
    for read in (checkpoint.tensor, checkpoint.raw_tensor):
        with pytest.raises(KeyError, match=r"model\.layers\.7\.self_attn\.q_proj\.weight.*model\.gguf"):
            read("model.layers.7.self_attn.q_proj.weight")


# SmolLM2-135M-Instruct's config.json on the Hugging Face Hub.
SMOLLM2_CONFIG = dict(
    architectures=["LlamaForCausalLM"],
    model_type="llama",
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
    max_position_embeddings=8192,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
)


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    return GGUFCheckpoint(smollm2_gguf)


SMOLLM2_COMPARED = [
    "model.embed_tokens.weight",
    "model.norm.weight",
    "model.layers.0.input_layernorm.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.self_attn.k_proj.weight",
    "model.layers.0.self_attn.v_proj.weight",
    "model.layers.29.self_attn.q_proj.weight",
    "model.layers.29.self_attn.k_proj.weight",
    "model.layers.29.mlp.down_proj.weight",
]


@pytest.fixture(scope="module")
def smollm2_transformers(smollm2_gguf):
    """The SMOLLM2_COMPARED tensors as transformers' GGUF loader decodes them, by HF name.

    Each tensor goes through the steps of transformers' load_gguf_checkpoint (gguf's dequantize,
    then its llama tensor processor, which undoes llama.cpp's Q/K permutation); loading only these
    few keeps the test fast.
    """
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    processor = LlamaTensorProcessor(config={"num_attention_heads": 9, "num_key_value_heads": 3})
    stored = {tensor.name: tensor for tensor in gguf.GGUFReader(smollm2_gguf).tensors}
    tensors = {}
    for hf_name in SMOLLM2_COMPARED:
        tensor = stored[gguf_name("llama", hf_name)]
        weights = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        tensors[hf_name] = processor.process(weights=weights, name=tensor.name).weights
    return tensors


@pytest.mark.slow
def test_smollm2_config(smollm2):
    config = smollm2.hf_config()
    assert {key: config[key] for key in SMOLLM2_CONFIG} == SMOLLM2_CONFIG
    assert "rope_scaling" not in config


@pytest.mark.slow
def test_smollm2_metadata(smollm2):
    assert smollm2.metadata["general.architecture"] == "llama"
    assert smollm2.metadata["llama.attention.layer_norm_rms_epsilon"] == 1e-5
    assert smollm2.metadata["tokenizer.ggml.model"] == "gpt2"
    assert len(smollm2.metadata["tokenizer.ggml.tokens"]) == 49152


@pytest.mark.slow
def test_smollm2_names_and_shapes_fit_llama(smollm2):
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**smollm2.hf_config()))
    expected = {name: tuple(value.shape) for name, value in model.state_dict().items()}
    del expected["lm_head.weight"]  # tied to the embedding: no tensor of its own
    assert {name: smollm2.raw_tensor(name)[2] for name in smollm2.tensor_names()} == expected
    assert smollm2.tensor("model.layers.29.mlp.down_proj.weight").shape == (576, 1536)


@pytest.mark.slow
def test_smollm2_storage_types(smollm2):
    assert smollm2.raw_tensor("model.embed_tokens.weight")[0] == Q.Q8_0
    assert smollm2.raw_tensor("model.layers.0.self_attn.q_proj.weight")[0] == Q.Q4_1
    assert smollm2.raw_tensor("model.norm.weight")[0] == Q.F32


@pytest.mark.slow
@pytest.mark.parametrize("name", SMOLLM2_COMPARED)
def test_smollm2_values_match_transformers(name, smollm2, smollm2_transformers):
    np.testing.assert_array_equal(smollm2.tensor(name), smollm2_transformers[name])
