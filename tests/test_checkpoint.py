"""Checkpoint formats: sharded safetensors, Orbax save/restore (also into a mesh), convert, bad input."""

import json
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import jinfer
from hf_reference import VOCAB, reference_logits, save_tiny_model
from jinfer.checkpoint import orbax_io
from jinfer.sharding import make_mesh
from pallas_kernels.testing import assert_close

TOKENS = np.random.default_rng(7).integers(0, VOCAB, (2, 9))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama")
    save_tiny_model("llama", directory)
    return directory


def test_sharded_safetensors_with_index(tmp_path):
    reference = save_tiny_model("qwen2", tmp_path)
    reference.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    assert_close(jinfer.load(tmp_path).logits(TOKENS), reference_logits(reference, TOKENS))


def test_orbax_round_trip_is_exact(tiny_dir, tmp_path):
    model = jinfer.load(tiny_dir)
    orbax_io.save(tmp_path / "ckpt", model.params, model.config)
    restored = jinfer.load(tmp_path / "ckpt")
    assert restored.config == model.config
    np.testing.assert_array_equal(restored.logits(TOKENS), model.logits(TOKENS))


def test_orbax_restores_straight_into_a_mesh(tiny_dir, tmp_path):
    model = jinfer.load(tiny_dir)
    orbax_io.save(tmp_path / "ckpt", model.params, model.config)
    restored = jinfer.load(tmp_path / "ckpt", mesh=make_mesh({"data": 2, "model": 4}))
    up = restored.params["layer_1"]["mlp"]["up_proj"]["kernel"]
    assert len(up.sharding.device_set) == 8
    assert up.addressable_shards[0].data.shape == (96 // 4, 64)
    assert_close(restored.logits(TOKENS), model.logits(TOKENS), atol=1e-5)


def test_convert_command_writes_a_checkpoint_and_reports_parity(tiny_dir, tmp_path):
    output = tmp_path / "converted"
    result = subprocess.run(
        [sys.executable, "-m", "jinfer.cli", "convert", f"--model={tiny_dir}", f"--output={output}"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "parity against transformers" in result.stdout
    rows = [line for line in result.stdout.splitlines() if line.rstrip().endswith(")")]
    assert len(rows) == 3 and all(" yes " in row for row in rows), result.stdout
    assert_close(jinfer.load(output).logits(TOKENS), jinfer.load(tiny_dir).logits(TOKENS), atol=0.0)


def test_missing_path_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        jinfer.load(tmp_path / "nowhere")


def test_truncated_safetensors_is_named(tiny_dir, tmp_path):
    data = (tiny_dir / "model.safetensors").read_bytes()
    (tmp_path / "config.json").write_text((tiny_dir / "config.json").read_text())
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors"):
        jinfer.load(tmp_path)


def _rewrite(tiny_dir, tmp_path, edit):
    tensors = load_file(tiny_dir / "model.safetensors")
    edit(tensors)
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((tiny_dir / "config.json").read_text())


def test_missing_tensor_is_named(tiny_dir, tmp_path):
    _rewrite(tiny_dir, tmp_path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(KeyError, match="model.layers.1.mlp.up_proj.weight"):
        jinfer.load(tmp_path)


def test_wrong_shape_is_named(tiny_dir, tmp_path):
    def shrink(tensors):
        tensors["model.layers.0.self_attn.k_proj.weight"] = tensors["model.layers.0.self_attn.k_proj.weight"][:-1]

    _rewrite(tiny_dir, tmp_path, shrink)
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.k_proj.weight.*\(31, 64\)"):
        jinfer.load(tmp_path)


def test_unknown_architecture_is_named(tiny_dir, tmp_path):
    config = json.loads((tiny_dir / "config.json").read_text())
    _rewrite(tiny_dir, tmp_path, lambda t: None)
    (tmp_path / "config.json").write_text(json.dumps({**config, "architectures": ["MambaForCausalLM"]}))
    with pytest.raises(ValueError, match="MambaForCausalLM"):
        jinfer.load(tmp_path)


def test_pickled_checkpoints_are_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(ValueError, match="pytorch_model.bin.*never loaded"):
        jinfer.load(tmp_path)


def test_unknown_preset_or_path_is_named():
    with pytest.raises(FileNotFoundError, match="llama-9000"):
        jinfer.load("llama-9000")
