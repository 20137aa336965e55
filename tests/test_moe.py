"""Mixture-of-experts blocks: dispatch against a dense per-expert loop, work per token, parity with
transformers on routing variants, config translation, sharding, and loading from safetensors and GGUF."""

import functools
import math

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf_fixtures import write_gguf
from hf_reference import VOCAB, build_tiny_model, reference_logits, save_tiny_model, tiny_config
from safetensors.numpy import load_file, save_file

import jinfer
from jinfer import config as config_lib
from jinfer.checkpoint.gguf import GGUFCheckpoint
from jinfer.checkpoint.weights import load_params
from jinfer.model import abstract_params
from jinfer.ops import moe
from jinfer.sharding import make_mesh
from pallas_kernels.testing import assert_close

TOKENS = np.random.default_rng(3).integers(0, VOCAB, (2, 13))
MOE_MODELS = ["mixtral", "qwen2_moe", "qwen3_moe"]


def random_experts(rng, num_experts, embed, inner):
    """(gate [E, I, embed], up [E, I, embed], down [E, embed, I]) float32, HF [out, in] layout."""
    gate = rng.normal(0, 0.3, (num_experts, inner, embed)).astype(np.float32)
    up = rng.normal(0, 0.3, (num_experts, inner, embed)).astype(np.float32)
    down = rng.normal(0, 0.3, (num_experts, embed, inner)).astype(np.float32)
    return gate, up, down


def dense_moe_reference(x, router_logits, gate, up, down, k, renormalize):
    """x: [T, embed]; router_logits: [T, E] -> [T, embed]. Every expert runs on every token (float64),
    weighted by its routing weight: the softmax probability if among the token's top k, else 0."""
    x, logits = x.astype(np.float64), router_logits.astype(np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    top = np.argsort(-probs, axis=-1)[:, :k]
    weights = np.zeros_like(probs)
    np.put_along_axis(weights, top, np.take_along_axis(probs, top, -1), -1)
    if renormalize:
        weights /= weights.sum(-1, keepdims=True)
    out = np.zeros_like(x)
    for e in range(gate.shape[0]):
        g, u = x @ gate[e].T.astype(np.float64), x @ up[e].T.astype(np.float64)
        out += weights[:, e : e + 1] * (((g / (1 + np.exp(-g))) * u) @ down[e].T.astype(np.float64))
    return out


@pytest.mark.parametrize(
    "lead, num_experts, k, renormalize",
    [((2, 5), 8, 2, True), ((7,), 4, 3, False), ((3,), 8, 1, True)],  # the last leaves experts without tokens
)
def test_dispatch_equals_dense_per_expert_loop(lead, num_experts, k, renormalize):
    rng = np.random.default_rng(0)
    embed, inner = 16, 12
    x = rng.normal(size=(*lead, embed)).astype(np.float32)
    logits = rng.normal(size=(*lead, num_experts)).astype(np.float32)
    gate, up, down = random_experts(rng, num_experts, embed, inner)
    dispatch = jax.jit(functools.partial(moe.moe_mlp, k=k, renormalize=renormalize, activation=jax.nn.silu))
    got = dispatch(x, logits, gate, up, down)
    expected = dense_moe_reference(x.reshape(-1, embed), logits.reshape(-1, num_experts), gate, up, down, k, renormalize)
    assert_close(got, expected.reshape(*lead, embed))


def test_grouped_matmul_multiplies_each_run_of_rows_by_its_group():
    rng = np.random.default_rng(1)
    group_sizes = np.array([3, 0, 1, 4], np.int32)  # an empty group in the middle
    lhs = rng.normal(size=(8, 5)).astype(np.float32)
    rhs = rng.normal(size=(4, 5, 6)).astype(np.float32)
    groups = np.repeat(np.arange(4), group_sizes)
    expected = np.einsum("mk,mkn->mn", lhs, rhs[groups])
    assert_close(moe.grouped_matmul(lhs, rhs, group_sizes), expected)


def _equations(jaxpr):
    yield from jaxpr.eqns
    for sub in jax.extend.core.subjaxprs(jaxpr):
        yield from _equations(sub)


def traced_matmul_flops(fn, *args) -> tuple[int, int]:
    """(grouped, total): 2 * rows * K * N summed over fn's grouped matmuls (each row is multiplied
    by its own group's matrix only), and that plus 2 * outputs * contraction over its dense dots."""
    grouped = dense = 0
    for eqn in _equations(jax.make_jaxpr(fn)(*args).jaxpr):
        if eqn.primitive.name == "ragged_dot_general":
            grouped += 2 * eqn.outvars[0].aval.size * eqn.invars[0].aval.shape[-1]
        elif eqn.primitive.name == "dot_general":
            (contracting, _), _ = eqn.params["dimension_numbers"]
            lhs_shape = eqn.invars[0].aval.shape
            dense += 2 * eqn.outvars[0].aval.size * math.prod(lhs_shape[d] for d in contracting)
    return grouped, grouped + dense


def test_matmul_work_follows_k_not_the_number_of_experts():
    tokens, embed, inner, k = 32, 64, 32, 2
    rng = np.random.default_rng(2)
    x = rng.normal(size=(tokens, embed)).astype(np.float32)
    work = {}
    for num_experts in (8, 64):
        logits = rng.normal(size=(tokens, num_experts)).astype(np.float32)
        weights = random_experts(rng, num_experts, embed, inner)

        def dispatch(x, logits, gate, up, down):
            return moe.moe_mlp(x, logits, gate, up, down, k=k, renormalize=True, activation=jax.nn.silu)

        work[num_experts] = traced_matmul_flops(dispatch, x, logits, *weights)
    assert work[8][0] == work[64][0] == 2 * tokens * k * 3 * embed * inner
    assert work[8][1] == work[64][1]


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("qwen3_moe", dict(decoder_sparse_step=2, mlp_only_layers=[], norm_topk_prob=False)),
        ("qwen2_moe", dict(norm_topk_prob=True, num_experts_per_tok=4)),
        ("qwen3_moe", dict(use_sliding_window=True, sliding_window=5)),
    ],
    ids=["qwen3_moe-sparse_step_2-unnormalised", "qwen2_moe-top4-normalised", "qwen3_moe-window_5"],
)
def test_routing_variants_match_transformers(tmp_path, name, overrides):
    reference = save_tiny_model(name, tmp_path, overrides=overrides)
    model = jinfer.load(tmp_path)
    assert_close(model.logits(TOKENS), reference_logits(reference, TOKENS))


def test_renormalisation_changes_the_result(tmp_path):
    """Guards the parity tests: with k=3 of 8 experts, skipping the renormalisation must show."""
    reference = save_tiny_model("qwen3_moe", tmp_path)
    model = jinfer.load(tmp_path)
    assert model.config.norm_topk_prob
    unnormalised = jinfer.Model(model.config.replace(norm_topk_prob=False), model.params, None, model.dtype)
    assert np.max(np.abs(unnormalised.logits(TOKENS) - reference_logits(reference, TOKENS))) > 1e-2


def hf_config_dict(name: str, architecture: str, overrides: dict | None = None) -> dict:
    """config.json contents of a tiny HF config (`architectures` is only filled in on save)."""
    return {**tiny_config(name, overrides).to_dict(), "architectures": [architecture]}


def test_qwen_sparse_layers_from_hf_config():
    overrides = dict(num_hidden_layers=4, decoder_sparse_step=2, mlp_only_layers=[3])
    config = config_lib.from_hf_config(hf_config_dict("qwen3_moe", "Qwen3MoeForCausalLM", overrides))
    assert config.moe_layers == (False, True, False, False)
    assert (config.num_experts, config.num_experts_per_tok, config.moe_intermediate_size) == (8, 3, 32)
    assert config.qk_norm and config.norm_topk_prob and config.shared_expert_intermediate_size == 0


def test_qwen2_moe_windows_without_layer_types_follow_transformers():
    """A config.json without `layer_types` (written before transformers 5) gets the windows that
    transformers derives from use_sliding_window / max_window_layers."""
    overrides = dict(num_hidden_layers=6, use_sliding_window=True, sliding_window=4, max_window_layers=3)
    hf = hf_config_dict("qwen2_moe", "Qwen2MoeForCausalLM", overrides)
    expected = tuple(4 if kind == "sliding_attention" else 0 for kind in hf.pop("layer_types"))
    assert 0 < sum(map(bool, expected)) < 6
    assert config_lib.from_hf_config(hf).layer_windows == expected


def test_mixtral_config_from_hf_config():
    config = config_lib.from_hf_config(hf_config_dict("mixtral", "MixtralForCausalLM"))
    assert config.moe_layers == (True, True)
    assert (config.num_experts, config.num_experts_per_tok, config.moe_intermediate_size) == (8, 2, 96)
    assert config.norm_topk_prob and config.layer_windows == (6, 6)


def test_too_many_experts_per_token_is_named():
    config, _ = config_lib.read_preset("mixtral-8x7b")
    with pytest.raises(ValueError, match="num_experts_per_tok=9.*num_experts=8"):
        config.replace(num_experts_per_tok=9)


def test_moe_layers_of_wrong_length_is_named():
    config, _ = config_lib.read_preset("qwen3-30b-a3b")
    with pytest.raises(ValueError, match="moe_layers has 2 entries for 48 layers"):
        config.replace(moe_layers=(True, False))


def test_expert_sharded_forward_equals_single_device(tmp_path):
    save_tiny_model("mixtral", tmp_path)
    single = jinfer.load(tmp_path)
    sharded = jinfer.load(tmp_path, mesh=make_mesh({"expert": 4, "model": 2}))
    gate = sharded.params["layer_0"]["mlp"]["experts"]["gate_proj"]
    assert gate.shape == (8, 96, 64)
    assert gate.addressable_shards[0].data.shape == (2, 48, 64)
    assert_close(sharded.logits(TOKENS), single.logits(TOKENS), atol=1e-5)


def test_missing_expert_tensor_is_named(tmp_path):
    source, broken = tmp_path / "source", tmp_path / "broken"
    save_tiny_model("mixtral", source)
    tensors = load_file(source / "model.safetensors")
    del tensors["model.layers.1.block_sparse_moe.experts.5.w3.weight"]
    broken.mkdir()
    save_file(tensors, broken / "model.safetensors")
    (broken / "config.json").write_text((source / "config.json").read_text())
    with pytest.raises(KeyError, match=r"model\.layers\.1\.block_sparse_moe\.experts\.5\.w3\.weight"):
        jinfer.load(broken)


# GGUF architecture of each HF MoE family, and what llama.cpp's files can express: token ids, no
# sliding window for llama-architecture (Mixtral) files, every layer sparse.
GGUF_ARCHITECTURES = {"mixtral": "llama", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe"}
GGUF_OVERRIDES = dict(bos_token_id=1, eos_token_id=2)
GGUF_MODEL_OVERRIDES = {"mixtral": dict(sliding_window=None), "qwen3_moe": dict(mlp_only_layers=[])}


@pytest.fixture(scope="module", params=MOE_MODELS)
def moe_gguf(request, tmp_path_factory):
    """(name, HF model, its safetensors state dict with one tensor per expert, GGUF path)."""
    directory = tmp_path_factory.mktemp(request.param)
    overrides = {**GGUF_OVERRIDES, **GGUF_MODEL_OVERRIDES.get(request.param, {})}
    reference = save_tiny_model(request.param, directory, overrides=overrides)
    state_dict = load_file(directory / "model.safetensors")
    path = directory / "model.gguf"
    write_gguf(path, GGUF_ARCHITECTURES[request.param], reference.config, state_dict)
    return request.param, reference, state_dict, path


def test_gguf_presents_one_hf_tensor_per_expert(moe_gguf):
    _, reference, state_dict, path = moe_gguf
    checkpoint = GGUFCheckpoint(path)
    assert set(checkpoint.tensor_names()) == set(state_dict)
    for name, expected in state_dict.items():
        np.testing.assert_array_equal(checkpoint.tensor(name), expected, err_msg=name)
    from_gguf = config_lib.from_hf_config(checkpoint.hf_config())
    expected_config = config_lib.from_hf_config(reference.config.to_dict())
    moe_fields = ("architecture", "num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob")
    for field in moe_fields + ("shared_expert_intermediate_size", "moe_layers", "attention_bias", "qk_norm"):
        assert getattr(from_gguf, field) == getattr(expected_config, field), field


def test_gguf_moe_logits_match_transformers(moe_gguf):
    _, reference, _, path = moe_gguf
    checkpoint = GGUFCheckpoint(path)
    config = config_lib.from_hf_config(checkpoint.hf_config(), source=str(path))
    params = load_params(checkpoint, abstract_params(config), config, lambda _, array: jnp.asarray(array), source_name=str(path))
    model = jinfer.Model(config, params, None, jnp.float32)
    assert_close(model.logits(TOKENS), reference_logits(reference, TOKENS))


def test_quantized_gguf_experts_decode_per_expert(tmp_path):
    q8 = gguf.GGMLQuantizationType.Q8_0
    # Q8_0 needs rows that are a multiple of 32 values long.
    reference = build_tiny_model("qwen2_moe", overrides={**GGUF_OVERRIDES, "shared_expert_intermediate_size": 64})
    reference.save_pretrained(tmp_path)
    state_dict = load_file(tmp_path / "model.safetensors")
    write_gguf(tmp_path / "model.gguf", "qwen2moe", reference.config, state_dict, qtype=q8)
    checkpoint = GGUFCheckpoint(tmp_path / "model.gguf")
    for name in ("model.layers.1.mlp.experts.6.down_proj.weight", "model.layers.0.mlp.shared_expert_gate.weight"):
        original = state_dict[name]
        raw_type, _, shape = checkpoint.raw_tensor(name)
        assert raw_type == q8 and shape == original.shape, name
        expected = gguf.quants.dequantize(gguf.quants.quantize(original, q8), q8)
        np.testing.assert_array_equal(checkpoint.tensor(name), expected, err_msg=name)
