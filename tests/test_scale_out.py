"""Scale-out on the fake 8-device CPU mesh: the engine on each mesh layout against one device (tokens
and logits), the KV pool's sharding, the collectives of the compiled step, per-device parameter
bytes, mesh errors raised before allocation, and restoring / converting into a mesh.

Every engine runs the same three prompts (4 tokens, 3 rows) so that prefill and decode steps share
one bucket: one compile per engine.
"""

import dataclasses
import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import jinfer
from hf_reference import save_tiny_model
from jinfer import model as model_lib
from jinfer.checkpoint import orbax_io
from jinfer.checkpoint.convert import convert
from jinfer.config import EngineConfig, read_preset
from jinfer.engine.batch import padding_batch
from jinfer.engine.engine import Engine
from jinfer.model import abstract_params, param_shardings
from jinfer.sampling import SamplingParams
from jinfer.sharding import kv_pool_sharding, make_mesh
from jinfer.step import step as step_fn
from pallas_kernels.testing import assert_close

LAYOUTS = {"1x8": {"model": 8}, "2x4": {"data": 2, "model": 4}, "8x1": {"data": 8}, "ep8": {"expert": 8}}
MODELS = {
    "dense": ("llama", dict(num_attention_heads=8, num_key_value_heads=8)),  # every head axis divides 8
    "moe": ("mixtral", dict(num_attention_heads=8, num_key_value_heads=4)),  # 4 KV heads: sharded on model:4, replicated on model:8
}
# The expert layout is for the MoE model only: a dense model has nothing to put on an expert axis.
CASES = [("dense", "1x8"), ("dense", "2x4"), ("dense", "8x1"), ("moe", "1x8"), ("moe", "2x4"), ("moe", "8x1"), ("moe", "ep8")]
# KV heads each device holds: 8 / model axis; the MoE model's 4 on model:8 fall back to replication.
KV_HEADS_PER_DEVICE = {
    ("dense", "1x8"): 1,
    ("dense", "2x4"): 2,
    ("dense", "8x1"): 8,
    ("moe", "1x8"): 4,
    ("moe", "2x4"): 1,
    ("moe", "8x1"): 4,
    ("moe", "ep8"): 4,
}
ENGINE = EngineConfig(max_num_seqs=4, max_num_batched_tokens=4, max_model_len=32, page_size=8, kv_cache_memory="64KiB")
BUCKET = (4, 4, 4, 0)  # (tokens, rows, pages per row, history width) of every step
PROMPTS = [[5, 17], [42], [99]]
GREEDY = SamplingParams(temperature=0.0, max_tokens=6)


@dataclasses.dataclass
class Served:
    engine: Engine
    allocated_pool: list[tuple]  # (sharding, shard shapes) of each pool array as allocated, before any step
    tokens: list[list[int]]  # per prompt, its generated ids
    logits: np.ndarray  # [steps, rows, vocab] float32 logits each step sampled from


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    directories = {}
    for name, (architecture, overrides) in MODELS.items():
        directories[name] = tmp_path_factory.mktemp(name)
        save_tiny_model(architecture, directories[name], overrides=overrides)
    return directories


def _layout(array: jax.Array) -> tuple:
    return array.sharding, [shard.data.shape for shard in array.addressable_shards]


def _serve(directory, layout: str | None) -> Served:
    model = jinfer.load(directory, mesh=None if layout is None else make_mesh(LAYOUTS[layout]))
    engine = Engine(model, ENGINE, measure_step_memory=False)
    allocated_pool = [_layout(array) for array in jax.tree.leaves(engine.kv_cache)]  # the steps donate these arrays
    requests = [engine.add_request(prompt, GREEDY) for prompt in PROMPTS]
    logits = []
    while engine.has_unfinished():
        engine.step()
        logits.append(np.asarray(engine.last_output.logits))
    return Served(engine, allocated_pool, [r.output_ids for r in requests], np.stack(logits))


@pytest.fixture(scope="module")
def served(checkpoints):
    """served(model, layout) -> Served; layout None is one device. Each pair runs once per module."""
    runs = {}

    def get(name: str, layout: str | None) -> Served:
        if (name, layout) not in runs:
            runs[name, layout] = _serve(checkpoints[name], layout)
        return runs[name, layout]

    return get


@pytest.mark.parametrize("name, layout", CASES, ids=[f"{n}-{l}" for n, l in CASES])
def test_engine_on_a_mesh_matches_one_device(served, name, layout):
    single, sharded = served(name, None), served(name, layout)
    assert sharded.engine.bucket_shapes_used == single.engine.bucket_shapes_used == {BUCKET}
    assert sharded.tokens == single.tokens
    assert_close(sharded.logits, single.logits, atol=1e-5)


@pytest.mark.parametrize("name, layout", CASES, ids=[f"{n}-{l}" for n, l in CASES])
def test_kv_pool_is_sharded_over_kv_heads_and_keeps_its_sharding(served, name, layout):
    run = served(name, layout)
    engine, config = run.engine, run.engine.model.config
    per_device = KV_HEADS_PER_DEVICE[name, layout]
    expected = (engine.plan.num_pages, ENGINE.page_size, per_device, config.head_dim)  # one device's shard
    page_bytes_per_device = config.num_layers * 2 * ENGINE.page_size * per_device * config.head_dim * 4  # K and V, float32
    assert engine.plan.bytes_per_page == page_bytes_per_device  # the plan counts one device's share
    assert engine.plan.num_pages == 64 * 2**10 // page_bytes_per_device  # kv_cache_memory is per device
    after_the_steps = [_layout(array) for array in jax.tree.leaves(engine.kv_cache)]
    for when, layouts in (("allocated", run.allocated_pool), ("after the steps", after_the_steps)):
        for sharding, shard_shapes in layouts:
            assert sharding.is_equivalent_to(engine.pool_sharding, len(expected)), when
            assert shard_shapes == [expected] * 8, when


def test_kv_pool_replication_is_logged(caplog):
    with caplog.at_level(logging.WARNING):
        sharding = kv_pool_sharding(3, 64, make_mesh({"model": 8}))
    assert sharding.is_fully_replicated
    assert "3 KV heads are fewer than the devices of mesh axis 'model' (8)" in caplog.text


COLLECTIVE = re.compile(r"= (.+?) (all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(?:-start)?\(")
OP_NAME = re.compile(r'op_name="([^"]*)"')


def _collectives(served_run: Served) -> list[tuple[str, str, str]]:
    """(op, result type without layout, op_name) of every collective in the engine's compiled step
    (a compile-cache hit: the bucket and argument shardings the engine ran)."""
    engine = served_run.engine
    batch = jax.tree.map(jnp.asarray, padding_batch(engine.config, *BUCKET[:3]))  # the kernels the engine chose for its mesh
    compiled = step_fn.lower(engine.model.params, engine.kv_cache, batch, config=engine.model.config, dtype=engine.model.dtype).compile()
    found = []
    for line in compiled.as_text().splitlines():
        if match := COLLECTIVE.search(line):
            name = OP_NAME.search(line)
            found.append((match.group(2), match.group(1).split("{")[0], name.group(1) if name else ""))
    return found


def _weight_types(params) -> set[str]:
    return {f"{jnp.dtype(x.dtype).name.replace('float', 'f')}[{','.join(map(str, x.shape))}]" for x in jax.tree.leaves(params)}


def _no_weight_is_gathered(collectives, params) -> None:
    weights = _weight_types(params)
    gathered = [kind for op, kind, _ in collectives if op == "all-gather"]
    assert not weights.intersection(gathered), f"weights gathered: {weights.intersection(gathered)}"


def test_tensor_parallel_step_all_reduces_after_the_row_parallel_projections(served):
    run = served("dense", "1x8")
    collectives = _collectives(run)
    activations = "f32[4,64]"  # [tokens, embed]: partial sums of the row-parallel matmuls
    for i in range(run.engine.model.config.num_layers):
        for projection in ("o_proj", "down_proj"):
            found = [c for c in collectives if c[0] == "all-reduce" and f"layer_{i}/" in c[2] and f"/{projection}/" in c[2]]
            assert [kind for _, kind, _ in found] == [activations], (i, projection, found)
    _no_weight_is_gathered(collectives, run.engine.model.params)


def test_expert_parallel_step_all_reduces_the_expert_outputs(served):
    run = served("moe", "ep8")
    collectives = _collectives(run)
    copies = "f32[8,64]"  # [tokens * experts per token, embed]: each device's experts' rows, summed
    for i in range(run.engine.model.config.num_layers):
        found = [kind for op, kind, name in collectives if op == "all-reduce" and f"layer_{i}/" in name and "/experts/" in name]
        assert copies in found, (i, found)
    _no_weight_is_gathered(collectives, run.engine.model.params)


def test_data_replicas_need_no_collectives(served):
    assert _collectives(served("dense", "8x1")) == []


def _device_bytes(params, device) -> int:
    return sum(shard.data.nbytes for x in jax.tree.leaves(params) for shard in x.addressable_shards if shard.device == device)


@pytest.mark.parametrize("name, layout, shards", [("dense", "1x8", 8), ("dense", "2x4", 4)])
def test_dense_weights_take_a_shard_of_their_bytes_on_each_device(served, name, layout, shards):
    params = served(name, layout).engine.model.params
    leaves = jax.tree.leaves(params)
    matrices = sum(x.nbytes for x in leaves if x.ndim >= 2)  # embedding and every projection: all shard
    vectors = sum(x.nbytes for x in leaves if x.ndim == 1)  # norm scales: replicated
    for device in jax.devices():
        assert _device_bytes(params, device) == matrices // shards + vectors


def test_experts_take_an_eighth_of_their_bytes_on_each_device(served):
    params = served("moe", "ep8").engine.model.params
    total = sum(x.nbytes for x in jax.tree.leaves(params))
    expert_weights = sum(x.nbytes for path, x in jax.tree_util.tree_leaves_with_path(params) if "experts" in jax.tree_util.keystr(path))
    routers = sum(x.nbytes for path, x in jax.tree_util.tree_leaves_with_path(params) if "'mlp']['gate']" in jax.tree_util.keystr(path))
    assert expert_weights > total / 2
    for device in jax.devices():
        assert _device_bytes(params, device) == total - (expert_weights + routers) * 7 // 8


def test_mesh_must_match_the_device_count():
    with pytest.raises(ValueError, match=r"needs 6 devices, but 8 are available"):
        make_mesh({"data": 2, "model": 3})


@pytest.fixture
def no_allocation(monkeypatch):
    """Fails the test if a preset's parameters get initialised."""

    def refuse(*args):
        raise AssertionError("parameters were allocated before the mesh was checked")

    monkeypatch.setattr(model_lib, "init_params", refuse)


def test_experts_not_divisible_by_the_expert_axis_fail_before_allocation(no_allocation):
    mesh = make_mesh({"expert": 3}, jax.devices()[:3])
    with pytest.raises(ValueError, match=r"'experts' has size 8, which mesh axis 'expert' of size 3 does not divide"):
        jinfer.load("mixtral-8x7b", mesh=mesh)


def test_a_mesh_axis_that_shards_nothing_fails_before_allocation(no_allocation):
    mesh = make_mesh({"expert": 2}, jax.devices()[:2])
    with pytest.raises(ValueError, match=r"mesh axis 'expert' has 2 devices but shards no parameter: the model has no experts axis mapped to it"):
        jinfer.load("llama-3.1-8b", mesh=mesh)


@pytest.mark.parametrize(
    "overrides, axis, size",
    [
        (dict(num_heads=9), "heads", 9),  # SmolLM2's heads
        (dict(intermediate_size=1540), "mlp", 1540),
        (dict(vocab_size=49150), "vocab", 49150),
        (dict(num_kv_heads=12), "kv_heads", 12),  # more KV heads than devices
    ],
)
def test_a_weight_axis_the_mesh_does_not_divide_fails_before_allocation(no_allocation, overrides, axis, size):
    config, _ = read_preset("smollm2-135m")
    config = dataclasses.replace(config, **{"num_heads": 24, **overrides})  # 24 heads: only the overridden axis is indivisible
    with pytest.raises(ValueError, match=rf"logical axis '{axis}' has size {size}, which mesh axis 'model' of size 8 does not divide"):
        param_shardings(abstract_params(config), make_mesh({"model": 8}))


def test_kv_heads_fewer_than_the_devices_are_replicated_while_the_rest_shards():
    """SmolLM2 with 24 heads and its 3 KV heads on model:8: the K/V projections replicate, the rest shards."""
    config, _ = read_preset("smollm2-135m")
    config = dataclasses.replace(config, num_heads=24)
    shardings = param_shardings(abstract_params(config), make_mesh({"model": 8}))
    layer = shardings["layer_0"]
    assert layer["attn"]["k_proj"]["kernel"].is_fully_replicated
    assert "model" in tuple(layer["attn"]["q_proj"]["kernel"].spec)
    assert tuple(layer["mlp"]["gate_proj"]["kernel"].spec) == ("model", None)
    assert tuple(shardings["embedding"].spec) == ("model", None)


def test_restore_into_a_mesh_reads_per_device_shards(checkpoints, tmp_path):
    single = jinfer.load(checkpoints["dense"])
    orbax_io.save(tmp_path / "ckpt", single.params, single.config)
    mesh = make_mesh(LAYOUTS["2x4"])
    restored = jinfer.load(tmp_path / "ckpt", mesh=mesh)
    targets = param_shardings(abstract_params(single.config), mesh)
    for path, array in jax.tree_util.tree_leaves_with_path(restored.params):
        target = targets
        for key in path:
            target = target[key.key]
        shard_shape = target.shard_shape(array.shape)
        assert array.sharding.is_equivalent_to(target, array.ndim), jax.tree_util.keystr(path)
        assert [s.data.shape for s in array.addressable_shards] == [shard_shape] * 8, jax.tree_util.keystr(path)
        if array.ndim >= 2:
            assert shard_shape != array.shape, jax.tree_util.keystr(path)
    for restored_leaf, original in zip(jax.tree.leaves(restored.params), jax.tree.leaves(single.params)):
        np.testing.assert_array_equal(np.asarray(restored_leaf), np.asarray(original))


def _stored_chunks(directory) -> dict[str, tuple[int, ...]]:
    with ocp.StandardCheckpointer() as checkpointer:
        tree = checkpointer.metadata(directory / orbax_io.PARAMS_DIR).item_metadata
    return {jax.tree_util.keystr(path): tuple(leaf.storage.chunk_shape) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def test_convert_with_a_mesh_writes_chunks_of_its_shards(checkpoints, tmp_path):
    mesh = make_mesh(LAYOUTS["1x8"])
    source = convert(checkpoints["dense"], tmp_path / "single")
    convert(checkpoints["dense"], tmp_path / "model8", mesh=mesh)
    single, sharded = _stored_chunks(tmp_path / "single"), _stored_chunks(tmp_path / "model8")
    gate = "['layer_0']['mlp']['gate_proj']['kernel']"
    assert single[gate] == (96, 64)
    assert sharded[gate] == (96 // 8, 64)
    assert sharded["['embedding']"] == (256 // 8, 64)
    restored = jinfer.load(tmp_path / "model8", mesh=mesh)
    for restored_leaf, original in zip(jax.tree.leaves(restored.params), jax.tree.leaves(source.params)):
        np.testing.assert_array_equal(np.asarray(restored_leaf), np.asarray(original))
