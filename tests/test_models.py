"""Parity with Hugging Face transformers: tiny random models of every architecture, float32 logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jinfer
from hf_reference import TINY_CONFIGS, VOCAB, reference_logits, save_tiny_model
from jinfer.models.transformer import Transformer
from jinfer.ops.attention import FullSequenceAttention
from jinfer.sharding import make_mesh
from pallas_kernels.testing import assert_close

SHAPES = [(1, 1), (2, 13), (3, 40)]


@pytest.fixture(scope="module", params=sorted(TINY_CONFIGS))
def tiny(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    reference = save_tiny_model(request.param, directory)
    return jinfer.load(directory), reference


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_logits_match_transformers(tiny, shape):
    model, reference = tiny
    tokens = np.random.default_rng(shape[1]).integers(0, VOCAB, shape)
    assert_close(model.logits(tokens), reference_logits(reference, tokens))


@pytest.mark.parametrize("name", ["mistral", "gemma2"])
def test_sliding_window_changes_the_result(tmp_path, name):
    """Guards the parity test itself: a window shorter than the sequence must matter."""
    reference = save_tiny_model(name, tmp_path)
    model = jinfer.load(tmp_path)
    tokens = np.random.default_rng(1).integers(0, VOCAB, (1, 24))
    no_window = model.config.replace(layer_windows=(0,) * model.config.num_layers)
    full = jinfer.Model(no_window, model.params, None, model.dtype)
    assert np.max(np.abs(full.logits(tokens) - reference_logits(reference, tokens))) > 1e-2


@pytest.mark.parametrize("mesh_shape", [{"model": 8}, {"data": 2, "model": 4}, {"data": 8}])
def test_sharded_forward_equals_single_device(tmp_path, mesh_shape):
    save_tiny_model("qwen3", tmp_path, overrides=dict(num_attention_heads=8))  # its 2 KV heads replicate on model:8 and model:4
    single = jinfer.load(tmp_path)
    sharded = jinfer.load(tmp_path, mesh=make_mesh(mesh_shape))
    gate = sharded.params["layer_0"]["mlp"]["gate_proj"]["kernel"]
    model_axis = mesh_shape.get("model", 1)
    assert gate.addressable_shards[0].data.shape == (96 // model_axis, 64)
    tokens = np.random.default_rng(0).integers(0, VOCAB, (2, 11))
    assert_close(sharded.logits(tokens), single.logits(tokens), atol=1e-5)


def test_token_out_of_vocabulary_is_named(tmp_path):
    save_tiny_model("llama", tmp_path)
    model = jinfer.load(tmp_path)
    with pytest.raises(ValueError, match=f"token id {VOCAB + 3}"):
        model.logits(np.array([[1, VOCAB + 3]]))


def test_eight_fake_devices_are_available():
    assert len(jax.devices()) == 8


def test_rope_tables_are_computed_once_for_all_layers(tmp_path):
    """XLA:CPU used to fuse cos and sin into every layer's rotation, evaluating them per head and layer:
    the compiled forward holds them once (in each of the two branches of `rope_tables`' conditional)."""
    save_tiny_model("llama", tmp_path)
    model = jinfer.load(tmp_path)
    assert model.config.num_layers > 1

    def forward(params, tokens, positions):  # tokens, positions: [B, S] int32, positions known only at run time
        return Transformer(model.config, model.dtype).apply({"params": params}, tokens, positions, FullSequenceAttention())[0]

    tokens = jnp.zeros((1, 8), jnp.int32)
    compiled = jax.jit(forward).lower(model.params, tokens, tokens).compile().as_text()
    assert compiled.count("cosine(") <= 2 and compiled.count(" sine(") <= 2
