"""Tests for jinfer.checkpoint.gguf_quant: GGUF blocks -> int8 / int4 layouts, bit for bit.

The reference is gguf's own dequantizer (``gguf.quants.dequantize``): every layout must
dequantize to exactly its float32 bits, eagerly and under jit. Blocks come from random bytes
(every code and scale pattern, all supported types), from gguf's quantizer in tiny GGUF files
(the Q/K row un-permutation), by hand (the half-split packing) and from the real SmolLM2 file.
"""

import functools

import gguf
import jax
import numpy as np
import pytest
import transformers
from gguf_fixtures import llama_cpp_permute, write_gguf

import jinfer
from jinfer.checkpoint.gguf import GGUFCheckpoint
from jinfer.checkpoint.gguf_quant import SUPPORTED_TYPES, decode_blocks, quantized_tensor
from pallas_kernels.quantized_matmul.layout import Int4Weights, Int8Weights, dequantize
from pallas_kernels.testing import assert_close

Q = gguf.GGMLQuantizationType

# GGUF type -> (layout class, group size, symmetric (int4 only), byte offsets of its f16 fields).
EXPECTED_LAYOUTS = {
    Q.Q8_0: (Int8Weights, 32, None, (0,)),
    Q.Q5_0: (Int8Weights, 32, None, (0,)),
    Q.Q6_K: (Int8Weights, 16, None, (208,)),
    Q.Q4_0: (Int4Weights, 32, True, (0,)),
    Q.Q3_K: (Int4Weights, 16, True, (108,)),
    Q.Q4_1: (Int4Weights, 32, False, (0, 2)),
    Q.Q4_K: (Int4Weights, 32, False, (0, 2)),
    Q.Q2_K: (Int4Weights, 16, False, (80, 82)),
}
jit_dequantize = jax.jit(dequantize)


def assert_same_bits(got, expected, err_msg=""):
    """float32 arrays equal bit for bit (the sign of zero included)."""
    got, expected = np.asarray(got, np.float32), np.asarray(expected, np.float32)
    assert got.shape == expected.shape, err_msg
    np.testing.assert_array_equal(got.view(np.uint32), expected.view(np.uint32), err_msg=err_msg)


def random_blocks(qtype: Q, rows: int, blocks_per_row: int, seed: int = 0) -> np.ndarray:
    """uint8 [rows, bytes per row] of random blocks whose f16 fields are finite, of either sign."""
    rng = np.random.default_rng(seed)
    block_bytes = gguf.GGML_QUANT_SIZES[qtype][1]
    data = rng.integers(0, 256, (rows, blocks_per_row, block_bytes), dtype=np.uint8)
    for offset in EXPECTED_LAYOUTS[qtype][3]:
        halves = rng.normal(0.0, 0.05, (rows, blocks_per_row, 1)).astype(np.float16)
        data[..., offset : offset + 2] = halves.view(np.uint8)
    return data.reshape(rows, -1)


def test_every_supported_type_is_tested():
    assert SUPPORTED_TYPES == set(EXPECTED_LAYOUTS)


@pytest.mark.parametrize("qtype", list(EXPECTED_LAYOUTS), ids=lambda q: q.name)
def test_random_blocks_dequantize_bit_exactly(qtype):
    layout_class, group_size, symmetric, _ = EXPECTED_LAYOUTS[qtype]
    data = random_blocks(qtype, rows=6, blocks_per_row=2)
    weights = decode_blocks(data, qtype)
    expected = gguf.quants.dequantize(data, qtype)
    assert type(weights) is layout_class and weights.group_size == group_size
    if symmetric is not None:
        assert weights.symmetric == symmetric
    assert_same_bits(dequantize(weights), expected)
    assert_same_bits(jit_dequantize(weights), expected)


def test_q4_0_packs_half_split_by_hand():
    """One row of 64 codes c[k] = k // 4 in two Q4_0 blocks with scales 0.5 and 2.

    A Q4_0 block's byte j holds its values j (low nibble) and j + 16 (high); the layout's
    byte j holds the row's columns j and j + 32.
    """
    j = np.arange(16)
    blocks = []
    for block, scale in enumerate([0.5, 2.0]):
        codes = 8 * block + np.concatenate([j // 4, j // 4 + 4])
        nibble_bytes = (codes[:16] | (codes[16:] << 4)).astype(np.uint8)
        blocks.append(np.concatenate([np.float16(scale).reshape(1).view(np.uint8), nibble_bytes]))
    weights = decode_blocks(np.concatenate(blocks)[None, :], Q.Q4_0)
    columns = np.arange(32)
    np.testing.assert_array_equal(weights.packed, [(columns // 4) | ((8 + columns // 4) << 4)])
    np.testing.assert_array_equal(weights.scales, [[0.5, 2.0]])
    codes = np.arange(64) // 4
    assert_same_bits(dequantize(weights), [(codes - 8) * np.repeat([0.5, 2.0], 32)])


def tiny_llama(vocab=64, hidden=64, intermediate=96, heads=4, kv_heads=2):
    """A one-layer llama config (head_dim 16) and a random float32 state dict in HF layout."""
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=1,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    head_dim = hidden // heads
    shapes = {
        "model.embed_tokens.weight": (vocab, hidden),
        "model.layers.0.input_layernorm.weight": (hidden,),
        "model.layers.0.self_attn.q_proj.weight": (heads * head_dim, hidden),
        "model.layers.0.self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
        "model.layers.0.self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
        "model.layers.0.self_attn.o_proj.weight": (hidden, heads * head_dim),
        "model.layers.0.post_attention_layernorm.weight": (hidden,),
        "model.layers.0.mlp.gate_proj.weight": (intermediate, hidden),
        "model.layers.0.mlp.up_proj.weight": (intermediate, hidden),
        "model.layers.0.mlp.down_proj.weight": (hidden, intermediate),
        "model.norm.weight": (hidden,),
        "lm_head.weight": (vocab, hidden),
    }
    rng = np.random.default_rng(0)
    return config, {name: rng.normal(0.0, 0.5, shape).astype(np.float32) for name, shape in shapes.items()}


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q5_0, Q.Q4_0, Q.Q4_1], ids=lambda q: q.name)
def test_tiny_gguf_weights_are_exact_in_hf_row_order(qtype, tmp_path):
    """The file stores q/k rows permuted; the layouts must hold the blocks of the HF-order rows,
    i.e. what quantizing the HF weight row by row gives."""
    config, state_dict = tiny_llama()
    write_gguf(tmp_path / "model.gguf", "llama", config, state_dict, qtype=qtype)
    checkpoint = GGUFCheckpoint(tmp_path / "model.gguf")
    weight_names = [name for name, value in state_dict.items() if value.ndim == 2]
    for name in weight_names:
        expected = gguf.quants.dequantize(gguf.quants.quantize(state_dict[name], qtype), qtype)
        assert_same_bits(dequantize(quantized_tensor(checkpoint, name)), expected, err_msg=name)


def test_unsupported_quantized_type_names_tensor_and_type(tmp_path):
    config, state_dict = tiny_llama()
    write_gguf(tmp_path / "model.gguf", "llama", config, state_dict, qtype=Q.Q5_1)
    checkpoint = GGUFCheckpoint(tmp_path / "model.gguf")
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.up_proj\.weight .* Q5_1"):
        quantized_tensor(checkpoint, "model.layers.0.mlp.up_proj.weight")
    with pytest.raises(ValueError, match=r"model\.norm\.weight .* F32"):
        quantized_tensor(checkpoint, "model.norm.weight")


@pytest.mark.parametrize("qtype, layout", [(Q.Q8_0, Int8Weights), (Q.Q4_0, Int4Weights)], ids=lambda q: getattr(q, "name", ""))
def test_gguf_mode_loads_the_blocks_as_stored(qtype, layout, tmp_path):
    """jinfer.load(quantize="gguf") keeps every linear weight in its layout, dequantizing to gguf's
    values, and computes what the float load of the same file computes."""
    config, state_dict = tiny_llama()
    write_gguf(tmp_path / "model.gguf", "llama", config, state_dict, qtype=qtype)
    model = jinfer.load(tmp_path / "model.gguf", quantize="gguf")
    checkpoint = GGUFCheckpoint(tmp_path / "model.gguf")
    for path, hf_name in [(("layer_0", "attn", "q_proj"), "model.layers.0.self_attn.q_proj.weight"), (("lm_head",), "lm_head.weight")]:
        weights = functools.reduce(lambda tree, key: tree[key], path, model.params)["kernel"]
        assert type(weights) is layout, hf_name
        assert_same_bits(dequantize(weights), checkpoint.tensor(hf_name), err_msg=hf_name)
    assert model.params["embedding"].dtype == np.float32
    tokens = np.arange(12).reshape(2, 6)
    assert_close(model.logits(tokens), jinfer.load(tmp_path / "model.gguf", cache=False).logits(tokens))


def test_gguf_mode_names_a_tensor_of_an_unsupported_type(tmp_path):
    config, state_dict = tiny_llama()
    write_gguf(tmp_path / "model.gguf", "llama", config, state_dict, qtype=Q.Q5_1)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight is stored as GGUF type Q5_1"):
        jinfer.load(tmp_path / "model.gguf", quantize="gguf")


def test_decode_blocks_rejects_bad_input():
    with pytest.raises(ValueError, match="up_proj is stored as GGUF type Q5_K"):
        decode_blocks(np.zeros((2, 176), np.uint8), Q.Q5_K, "up_proj")
    with pytest.raises(ValueError, match=r"multiple of 20 bytes\], got uint8 \(2, 30\)"):
        decode_blocks(np.zeros((2, 30), np.uint8), Q.Q4_1)


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    return GGUFCheckpoint(smollm2_gguf)


@pytest.mark.slow
def test_smollm2_every_quantized_tensor_is_bit_exact(smollm2):
    """Every quantized tensor, permuted back the way llama.cpp stores it, dequantizes to gguf's
    decoding of the stored blocks."""
    heads = {"q_proj": 9, "k_proj": 3}
    types = {}
    for name in smollm2.tensor_names():
        qtype, data, shape = smollm2.raw_tensor(name)
        if len(shape) == 1:
            continue
        types[name] = qtype
        values = np.asarray(dequantize(quantized_tensor(smollm2, name)))
        projection = name.split(".")[-2]
        if projection in heads:
            values = llama_cpp_permute(values, heads[projection])
        assert_same_bits(values, gguf.quants.dequantize(data, qtype), err_msg=name)
    assert len(types) == 211
    assert set(types.values()) == {Q.Q4_1, Q.Q8_0}
