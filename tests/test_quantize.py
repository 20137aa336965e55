"""Weight-only quantization on load: the quantized model computes exactly what the float model computes
with the dequantized weights, stays close to the float model, and refuses bad settings by name."""

import functools
import json
import pathlib
import shutil
import subprocess
import sys

import flax.linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import jinfer
import jinfer.model
from hf_reference import VOCAB, save_tiny_model
from jinfer.checkpoint.convert import convert
from jinfer.cache import page_bytes, plan_device_memory
from jinfer.config import EngineConfig, read_preset
from jinfer.engine.engine import Engine
from jinfer.model import abstract_params, count_params, full_forward
from jinfer.ops.matmul import round_activation_blocks
from jinfer.quantize import PanelInt4Weights, abstract_quantized_like, is_quantized, parameter_bytes, quantize_params
from jinfer.sampling import SamplingParams
from pallas_kernels.quantized_matmul import Int4Weights, Int8Weights, dequantize
from pallas_kernels.testing import assert_close

TOKENS = np.random.default_rng(0).integers(0, VOCAB, (2, 12))
MODES = [("int8", None, Int8Weights), ("int8", 32, Int8Weights), ("int4", 32, Int4Weights)]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama")
    save_tiny_model("llama", directory, overrides={"intermediate_size": 96})
    return directory


@pytest.fixture(scope="module")
def float_model(tiny_dir):
    return jinfer.load(tiny_dir)


def with_dequantized_kernels(float_model, quantized_params):
    """The float model whose kernels (and the tied LM head's copy of the embedding) are the
    dequantized quantized ones, reshaped back."""
    shapes = {path: leaf.shape for path, leaf in traverse_util.flatten_dict(float_model.params).items()}
    flat = traverse_util.flatten_dict(quantized_params)
    for path, leaf in flat.items():
        if is_quantized(leaf):
            flat[path] = dequantize(leaf).reshape(shapes.get(path, leaf.shape))
    return jinfer.Model(float_model.config, traverse_util.unflatten_dict(flat), None, float_model.dtype)


@pytest.mark.parametrize("mode, group_size, layout", MODES)
def test_quantized_model_equals_the_float_model_on_dequantized_weights(tiny_dir, float_model, mode, group_size, layout):
    quantized = jinfer.load(tiny_dir, quantize=mode, group_size=group_size)
    kernels = [leaf for leaf in jax.tree.leaves(quantized.params, is_leaf=lambda x: isinstance(x, layout)) if isinstance(leaf, layout)]
    assert len(kernels) == 7 * float_model.config.num_layers + 1  # q, k, v, o, gate, up, down, and the LM head
    assert ("tied_lm_head" in quantized.params) == float_model.config.tie_word_embeddings
    logits = quantized.logits(TOKENS)
    assert_close(logits, with_dequantized_kernels(float_model, quantized.params).logits(TOKENS))
    assert_close(logits, float_model.logits(TOKENS), atol=0.05 if mode == "int8" else 0.5)


@pytest.fixture(scope="module")
def tied_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama_tied")
    save_tiny_model("llama_tied_mqa", directory)
    return directory


@pytest.mark.parametrize("mode, bits, atol", (("w4a8", 8, 0.05), ("w4a16", 16, 1e-3)))
def test_panel_modes_hold_the_int4_weights_and_round_the_activations(tiny_dir, float_model, tmp_path, mode, bits, atol):
    int4 = jinfer.load(tiny_dir, quantize="int4", group_size=32)
    rounded = jinfer.load(tiny_dir, quantize=mode, group_size=32)
    panels = quantized_leaves(rounded.params)
    assert len(panels) == 7 * float_model.config.num_layers + 1
    assert all(isinstance(leaf, PanelInt4Weights) and leaf.activation_bits == bits for leaf in panels)
    for got, want in zip(panels, quantized_leaves(int4.params)):
        for a, b in zip(jax.tree.leaves(got.as_int4()), jax.tree.leaves(want)):
            np.testing.assert_array_equal(a, b)
    logits = rounded.logits(TOKENS)
    assert_close(logits, int4.logits(TOKENS), atol=atol)
    assert not np.array_equal(logits, int4.logits(TOKENS)), "the activations were not rounded"
    convert(tiny_dir, tmp_path / mode, quantize=mode, group_size=32)
    restored = jinfer.load(tmp_path / mode)
    record = json.loads((tmp_path / mode / "config.json").read_text())["quantization"]
    assert record["tensors"]["layer_0/mlp/up_proj/kernel"] == {"layout": "int4", "group_size": 32, "symmetric": False, "activations": f"int{bits}"}
    planned = abstract_quantized_like(flax.linen.unbox(abstract_params(restored.config)), mode, 32)
    assert jax.tree.structure(restored.params) == jax.tree.structure(planned)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), restored.params) == jax.tree.map(lambda a: (a.shape, a.dtype), planned)
    np.testing.assert_array_equal(restored.logits(TOKENS), logits)


def test_panel_modes_need_whole_panels_of_rows():
    params = {"layer_0": {"attn": {"q_proj": {"kernel": jnp.ones((12, 64))}}}}
    with pytest.raises(ValueError, match="q_proj/kernel: quantize='w4a8' stores panels of 8 rows; its 12 output features"):
        quantize_params(params, "w4a8", 32)


def test_a_tied_lm_head_multiplies_by_a_quantized_copy_of_the_embedding(tied_dir, tmp_path):
    float_model = jinfer.load(tied_dir)
    quantized = jinfer.load(tied_dir, quantize="int8")
    head = quantized.params["tied_lm_head"]["kernel"]
    assert isinstance(head, Int8Weights) and head.shape == float_model.params["embedding"].shape
    np.testing.assert_array_equal(quantized.params["embedding"], float_model.params["embedding"])  # the lookup stays float
    logits = quantized.logits(TOKENS)
    assert_close(logits, with_dequantized_kernels(float_model, quantized.params).logits(TOKENS))
    assert not np.array_equal(logits, jinfer.load(tied_dir, quantize="int8", quantize_lm_head=False).logits(TOKENS))
    convert(tied_dir, tmp_path / "int8", quantize="int8")
    np.testing.assert_array_equal(jinfer.load(tmp_path / "int8").logits(TOKENS), logits)


def test_the_lm_head_stays_float_by_flag(tiny_dir, tied_dir):
    assert not is_quantized(jinfer.load(tiny_dir, quantize="int8", quantize_lm_head=False).params["lm_head"]["kernel"])
    assert "tied_lm_head" not in jinfer.load(tied_dir, quantize="w8a8", quantize_lm_head=False).params


def test_the_engine_serves_a_quantized_model(tiny_dir):
    model = jinfer.load(tiny_dir, quantize="int8")
    engine = Engine(model, EngineConfig(max_num_seqs=2, max_model_len=32, max_num_batched_tokens=8, page_size=8, kv_cache_memory="512KiB"), measure_step_memory=False)
    prompt = TOKENS[0, :5].tolist()
    request = engine.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=6))
    while engine.has_unfinished():
        engine.step()
    assert request.output_ids == model.greedy_continuation(prompt, 6)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"quantize": "int3"}, "int3"),
        ({"quantize": "int4"}, "group_size"),
        ({"quantize": "w4a8"}, "w4a8 quantization needs a group_size"),
        ({"quantize": "int8", "group_size": 48}, "group_size=48"),
        ({"quantize": "gguf", "group_size": 32}, "group_size=32 does not apply"),
    ],
)
def test_bad_settings_are_named(tiny_dir, options, message):
    with pytest.raises(ValueError, match=message):
        jinfer.load(tiny_dir, **options)


def test_a_group_size_that_does_not_fit_a_layer_names_it(float_model):
    with pytest.raises(ValueError, match="_proj/kernel: group_size=128 does not divide its 64 input features"):
        quantize_params(float_model.params, "int8", 128)


@pytest.fixture(scope="module")
def int8_checkpoint(tiny_dir, tmp_path_factory):
    output = tmp_path_factory.mktemp("int8") / "ckpt"
    convert(tiny_dir, output, quantize="int8")
    return output


def quantized_leaves(params) -> list:
    return [leaf for leaf in jax.tree.leaves(params, is_leaf=is_quantized) if is_quantized(leaf)]


def test_an_int8_checkpoint_restores_its_layouts_without_quantizing_again(tiny_dir, int8_checkpoint, monkeypatch):
    expected = jinfer.load(tiny_dir, quantize="int8")
    monkeypatch.setattr(jinfer.model, "quantize_params", lambda *args: pytest.fail("the checkpoint was quantized again"))
    restored = jinfer.load(int8_checkpoint)
    same_mode = jinfer.load(int8_checkpoint, quantize="int8")
    assert jax.tree.structure(restored.params) == jax.tree.structure(expected.params)
    assert len(quantized_leaves(restored.params)) == len(quantized_leaves(expected.params)) > 0
    for got, want in zip(jax.tree.leaves(restored.params), jax.tree.leaves(expected.params)):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(same_mode.logits(TOKENS), expected.logits(TOKENS))


def test_the_convert_command_writes_an_int4_checkpoint(tiny_dir, tmp_path):
    output = tmp_path / "int4"
    command = [sys.executable, "-m", "jinfer.cli", "convert", f"--model={tiny_dir}", f"--output={output}", "--quantize=int4", "--group_size=32", "--noparity"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((output / "config.json").read_text())["quantization"]
    assert record["mode"] == "int4" and record["group_size"] == 32
    assert record["tensors"]["layer_0/attn/o_proj/kernel"] == {"layout": "int4", "group_size": 32, "symmetric": False}
    restored = jinfer.load(output)
    assert all(isinstance(leaf, Int4Weights) for leaf in quantized_leaves(restored.params))
    planned = abstract_quantized_like(flax.linen.unbox(abstract_params(restored.config)), "int4", 32)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), restored.params) == jax.tree.map(lambda a: (a.shape, a.dtype), planned)
    np.testing.assert_array_equal(restored.logits(TOKENS), jinfer.load(tiny_dir, quantize="int4", group_size=32).logits(TOKENS))


def edited_copy(checkpoint: pathlib.Path, directory: pathlib.Path, edit) -> pathlib.Path:
    """A copy of `checkpoint` whose config.json dict went through `edit`."""
    copy = directory / "edited"
    shutil.copytree(checkpoint, copy)
    config = json.loads((copy / "config.json").read_text())
    edit(config)
    (copy / "config.json").write_text(json.dumps(config))
    return copy


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c.update(intermediate_size=128), r"'layer_0/mlp/down_proj/kernel/values' is stored as int8 \(64, 96\) but its config.json implies int8 \(64, 128\)"),
        (lambda c: c["quantization"]["tensors"]["layer_1/attn/q_proj/kernel"].update(group_size=32), r"'layer_1/attn/q_proj/kernel/scales' is stored as float32 \(64, 1\) but its config.json implies float32 \(64, 2\)"),
        (lambda c: c["quantization"]["tensors"]["layer_1/attn/q_proj/kernel"].update(group_size=48), r"layer_1/attn/q_proj/kernel: the checkpoint records group_size=48"),
        (lambda c: c["quantization"]["tensors"]["layer_1/attn/q_proj/kernel"].update(layout="int4", symmetric=True, group_size=64), r"'layer_1/attn/q_proj/kernel/packed' \(uint8 \(64, 32\)\) that its config.json implies is not in the checkpoint"),
        (lambda c: c["quantization"]["tensors"].update({"final_norm/scale": {"layout": "int8", "group_size": 64}}), r"'final_norm/scale', which is not a linear kernel"),
        (lambda c: c["quantization"]["tensors"]["layer_1/attn/q_proj/kernel"].update(layout="int4", group_size=32, activations="int3"), r"layer_1/attn/q_proj/kernel: int4 weights with rounded activations .* activations='int3'"),
    ],
)
def test_a_quantized_checkpoint_with_a_mismatching_config_names_the_tensor(int8_checkpoint, tmp_path, edit, message):
    with pytest.raises(ValueError, match=message):
        jinfer.load(edited_copy(int8_checkpoint, tmp_path, edit))


def test_loading_a_quantized_checkpoint_in_another_mode_is_refused(int8_checkpoint):
    with pytest.raises(ValueError, match="quantize='int8', group_size=None; it cannot be loaded with quantize='int4', group_size=32"):
        jinfer.load(int8_checkpoint, quantize="int4", group_size=32)


def test_gguf_mode_needs_a_gguf_file(tiny_dir):
    with pytest.raises(ValueError, match="is not a .gguf file"):
        jinfer.load(tiny_dir, quantize="gguf")


def test_a_preset_too_big_for_a_budget_in_bfloat16_is_served_in_int8():
    """Planned from shapes alone (jax.eval_shape): Llama 3.1 8B does not fit 12 GiB in bfloat16, but does
    with int8 weights (the embedding and LM head stay bfloat16), with room for 8,192 tokens of int8 KV."""
    config, _ = read_preset("llama-3.1-8b")
    abstract = flax.linen.unbox(abstract_params(config, jnp.bfloat16))
    bf16_bytes, int8_bytes = parameter_bytes(abstract), parameter_bytes(abstract_quantized_like(abstract, "int8"))
    assert bf16_bytes == 2 * count_params(config)
    budget = 12 * 2**30
    with pytest.raises(ValueError, match=r"weights of 14.96 GiB leave 0 B of device_memory=12.00 GiB"):
        plan_device_memory(config, bf16_bytes, budget, 16, jnp.bfloat16, 8192)
    plan = plan_device_memory(config, int8_bytes, budget, 16, jnp.int8, 8192)
    assert plan.max_tokens_in_flight >= 8192 and int8_bytes + plan.kv_bytes <= budget
    int4_bytes = parameter_bytes(abstract_quantized_like(abstract, "int4", 32))
    assert int4_bytes < int8_bytes < 0.6 * bf16_bytes


def test_an_int8_kv_cache_fits_about_twice_the_pages_of_bfloat16():
    """SmolLM2's head_dim 64: 64 int8 codes + one float32 scale per (token, KV head) against 128 bytes."""
    config, _ = read_preset("smollm2-135m")
    assert page_bytes(config, 16, jnp.bfloat16) / page_bytes(config, 16, jnp.int8) == pytest.approx(128 / 68)
    assert page_bytes(config, 16, jnp.float32) / page_bytes(config, 16, jnp.int8) == pytest.approx(256 / 68)


def test_the_engine_with_an_int8_kv_cache_computes_the_int8_rounded_forward(float_model):
    """Greedy tokens and logits of the engine on an int8 pool (unused slots poisoned with NaN scales) equal a
    full-sequence forward whose K/V are rounded as the pool stores them, and stay close to the float model."""
    config = EngineConfig(max_num_seqs=2, max_model_len=32, max_num_batched_tokens=8, page_size=8, kv_cache_memory="64KiB", kv_cache_dtype="int8")
    engine = Engine(float_model, config, measure_step_memory=False, cache_fill=float("nan"), poison_freed_pages=True)
    assert engine.kv_cache[0]["k"].dtype == jnp.int8 and engine.kv_cache[0]["k_scale"].shape == engine.kv_cache[0]["k"].shape[:3]
    assert engine.plan.bytes_per_page == page_bytes(float_model.config, 8, jnp.int8)
    prompt = TOKENS[0, :5].tolist()
    request = engine.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=6))
    step_logits = []
    while engine.has_unfinished():
        engine.step()
        step_logits.append(np.asarray(engine.last_output.logits)[0])
    tokens = np.asarray([prompt + request.output_ids])
    forward = functools.partial(full_forward, float_model.params, config=float_model.config, dtype=float_model.dtype)
    rounded = np.asarray(forward(tokens, kv_cache_dtype="int8"))[0, len(prompt) - 1 : -1]
    assert request.output_ids == np.argmax(rounded, axis=-1).tolist()
    assert_close(np.stack(step_logits), rounded)
    assert_close(rounded, np.asarray(forward(tokens))[0, len(prompt) - 1 : -1], atol=0.05)
    assert not np.allclose(rounded, np.asarray(forward(tokens))[0, len(prompt) - 1 : -1], rtol=0, atol=1e-6)
