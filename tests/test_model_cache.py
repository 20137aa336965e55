"""The model cache: a GGUF file is decoded once; later loads read the cached arrays, equal bit for bit."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import transformers
from gguf_fixtures import write_gguf

import jinfer.model
from jinfer.checkpoint import model_cache
from jinfer.model import load
from jinfer.sharding import make_mesh


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    directory = tmp_path / "cache"
    monkeypatch.setenv("JINFER_MODEL_CACHE", str(directory))
    return directory


@pytest.fixture
def tiny_gguf(tmp_path):
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    )
    model = transformers.AutoModelForCausalLM.from_config(config)
    state_dict = {name: value.detach().numpy().copy() for name, value in model.state_dict().items()}
    path = tmp_path / "tiny.gguf"
    write_gguf(path, "llama", config, state_dict)
    return path


def leaves_equal(a, b) -> bool:
    same_structure = jax.tree.structure(a) == jax.tree.structure(b)
    return same_structure and all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def refuse_to_decode(monkeypatch):
    def decode(path):
        raise AssertionError(f"the GGUF file {path} was decoded although it is cached")

    monkeypatch.setattr(jinfer.model, "GGUFCheckpoint", decode)


def test_second_load_reads_the_cache_and_equals_the_first(tiny_gguf, cache_dir, monkeypatch):
    first = load(tiny_gguf)
    assert len(list(cache_dir.iterdir())) == 1
    refuse_to_decode(monkeypatch)
    second = load(tiny_gguf)
    assert second.config == first.config
    assert leaves_equal(first.params, second.params)
    tokens = np.arange(10)[None]
    np.testing.assert_array_equal(second.logits(tokens), first.logits(tokens))


def test_each_dtype_and_each_version_of_the_file_has_its_own_entry(tiny_gguf, cache_dir, monkeypatch):
    load(tiny_gguf)
    bf16 = load(tiny_gguf, dtype=jnp.bfloat16)
    assert {leaf.dtype for leaf in jax.tree.leaves(bf16.params)} == {jnp.dtype(jnp.bfloat16)}
    stat = tiny_gguf.stat()
    os.utime(tiny_gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    load(tiny_gguf)
    assert len(list(cache_dir.iterdir())) == 3


def test_an_unreadable_entry_is_replaced(tiny_gguf, cache_dir):
    reference = load(tiny_gguf, cache=False)
    entry = model_cache.entry_for(tiny_gguf, jnp.float32)
    load(tiny_gguf)
    params_file = entry / model_cache.PARAMS_FILE
    params_file.write_bytes(params_file.read_bytes()[:100])
    assert leaves_equal(reference.params, load(tiny_gguf).params)
    assert model_cache.read_params(entry, None, lambda _, array: array) is not None


def test_on_a_mesh_an_entry_that_does_not_fit_the_model_is_replaced(tiny_gguf, cache_dir):
    mesh = make_mesh({"model": 2}, jax.devices()[:2])
    reference = load(tiny_gguf, cache=False)
    entry = model_cache.entry_for(tiny_gguf, jnp.float32)
    load(tiny_gguf, mesh=mesh)
    safetensors.numpy.save_file({"embedding": np.zeros((3, 3), np.float32)}, str(entry / model_cache.PARAMS_FILE))
    reloaded = load(tiny_gguf, mesh=mesh)
    assert leaves_equal(reference.params, reloaded.params)
    assert {shard.data.shape for shard in reloaded.params["layer_0"]["attn"]["q_proj"]["kernel"].addressable_shards} == {(2, 8, 32)}


def test_cache_off_writes_nothing(tiny_gguf, cache_dir):
    load(tiny_gguf, cache=False)
    assert not cache_dir.exists()
