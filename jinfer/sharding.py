"""Logical axis names -> mesh axes: one rules table, and shardings for any annotated pytree."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "model", "expert")

# Logical axis -> mesh axis. Tensor parallelism shards heads, MLP and vocab over `model`;
# the hidden (`embed`) axis stays whole on every device.
RULES: tuple[tuple[str, str | None], ...] = (
    ("batch", "data"),
    ("vocab", "model"),
    ("embed", None),
    ("heads", "model"),
    ("kv_heads", "model"),
    ("head_dim", None),
    ("mlp", "model"),
    ("experts", "expert"),
)


def make_mesh(axis_sizes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with the named axes (missing ones get size 1); errors name the sizes that do not fit."""
    unknown = set(axis_sizes) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; known: {MESH_AXES}")
    devices = list(jax.devices() if devices is None else devices)
    shape = tuple(int(axis_sizes.get(name, 1)) for name in MESH_AXES)
    if math.prod(shape) != len(devices):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} devices, but {len(devices)} are available")
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def parse_mesh_flag(text: str) -> dict[str, int]:
    """`data:2,model:4` -> {"data": 2, "model": 4}."""
    sizes = {}
    for item in filter(None, text.split(",")):
        name, _, size = item.partition(":")
        if not size.isdigit():
            raise ValueError(f"bad mesh entry {item!r} in {text!r}; expected NAME:SIZE")
        sizes[name.strip()] = int(size)
    return sizes


# A logical axis the mesh axis does not divide is an error, with one documented fallback: KV heads
# fewer than the devices of `model` (SmolLM2's 3 on 8, GQA models' 8 on 16) are replicated, as a
# query-head shard then needs its KV heads whole anyway. Replicating anything else would silently
# leave devices holding what they were meant to split.
REPLICATED_WHEN_FEWER = frozenset({"kv_heads"})

# Mesh axes that exist to shard parameters: one of size > 1 that shards none of them is a mistake.
PARAMETER_MESH_AXES = ("model", "expert")

# The KV page pool, per layer and per K/V: [num_pages, page_size, num_kv_heads, head_dim]. Pages
# are indexed by every row, so only the head axis shards (over `model`, like the K/V projections).
KV_POOL_AXES = ("kv_pages", "kv_page_offset", "kv_heads", "head_dim")


def _spec_for(shape: Sequence[int], logical_axes: Sequence[str | None], mesh: Mesh, rules) -> PartitionSpec:
    """Maps logical axes to mesh axes; raises ValueError naming the axis and sizes when a mesh axis
    does not divide its logical axis (KV heads fewer than its devices are replicated instead, logged)."""
    table = dict(rules)
    spec = []
    for size, axis in zip(shape, logical_axes):
        mesh_axis = table.get(axis) if axis is not None else None
        if mesh_axis is not None and size % mesh.shape[mesh_axis]:
            devices = mesh.shape[mesh_axis]
            if not (axis in REPLICATED_WHEN_FEWER and size < devices):
                raise ValueError(
                    f"logical axis {axis!r} has size {size}, which mesh axis {mesh_axis!r} of size {devices} "
                    f"does not divide; give {mesh_axis!r} a size that divides {size}"
                )
            logging.info("replicating logical axis %r of size %d: fewer than the %d devices of mesh axis %r", axis, size, devices, mesh_axis)
            mesh_axis = None
        spec.append(mesh_axis)
    return PartitionSpec(*spec)


def _check_parameter_axes_used(leaves, specs: Sequence[PartitionSpec], mesh: Mesh, rules) -> None:
    """Raises if a `model`/`expert` mesh axis of size > 1 shards no parameter, naming the sizes it met."""
    used = {axis for spec in specs for axis in spec if axis is not None}
    for mesh_axis in PARAMETER_MESH_AXES:
        if mesh.shape[mesh_axis] == 1 or mesh_axis in used:
            continue
        logical = sorted(name for name, target in rules if target == mesh_axis)
        sizes = sorted({f"{name}={size}" for leaf in leaves for name, size in zip(leaf.names, leaf.value.shape) if name in logical})
        reason = ", ".join(sizes) if sizes else f"the model has no {' / '.join(logical) or 'logical'} axis mapped to it"
        raise ValueError(f"mesh axis {mesh_axis!r} has {mesh.shape[mesh_axis]} devices but shards no parameter: {reason}")


def _is_annotated(leaf) -> bool:
    return isinstance(leaf, nn.LogicallyPartitioned)


def logical_shardings(annotated_tree, mesh: Mesh, rules=RULES):
    """NamedShardings for a pytree whose leaves are `nn.LogicallyPartitioned` (e.g. from `jax.eval_shape(init)`).

    Raises ValueError (before anything is allocated) for an axis its mesh axis does not divide or a
    parameter mesh axis that would shard nothing."""
    leaves, treedef = jax.tree.flatten(annotated_tree, is_leaf=_is_annotated)
    annotated = [leaf for leaf in leaves if _is_annotated(leaf)]
    specs = [_spec_for(leaf.value.shape, leaf.names, mesh, rules) if _is_annotated(leaf) else PartitionSpec() for leaf in leaves]
    _check_parameter_axes_used(annotated, specs, mesh, rules)
    return jax.tree.unflatten(treedef, [NamedSharding(mesh, spec) for spec in specs])


def kv_pool_sharding(num_kv_heads: int, head_dim: int, mesh: Mesh, rules=RULES) -> NamedSharding:
    """Sharding of every K or V pool array ([num_pages, page_size, K, D]): KV heads over `model`.

    When the K heads are fewer than the model axis's devices the pool is replicated, every device
    holding all of it; a warning says so. The page axes are never sharded, so their sizes do not matter here.
    """
    spec = _spec_for((1, 1, num_kv_heads, head_dim), KV_POOL_AXES, mesh, rules)
    model_axis = dict(rules)["kv_heads"]
    if mesh.shape[model_axis] > 1 and spec[2] is None:
        logging.warning(
            "KV page pool replicated on every device: %d KV heads are fewer than the devices of mesh axis %r (%d)",
            num_kv_heads,
            model_axis,
            mesh.shape[model_axis],
        )
    return NamedSharding(mesh, spec)
