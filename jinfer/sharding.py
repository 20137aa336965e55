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


def _spec_for(shape: Sequence[int], logical_axes: Sequence[str | None], mesh: Mesh, rules) -> PartitionSpec:
    """Maps logical axes to mesh axes; an axis whose size the mesh axis does not divide is replicated."""
    table = dict(rules)
    spec = []
    for size, axis in zip(shape, logical_axes):
        mesh_axis = table.get(axis) if axis is not None else None
        if mesh_axis is not None and size % mesh.shape[mesh_axis]:
            logging.info("replicating logical axis %r of size %d: mesh axis %r has %d devices", axis, size, mesh_axis, mesh.shape[mesh_axis])
            mesh_axis = None
        spec.append(mesh_axis)
    return PartitionSpec(*spec)


def logical_shardings(annotated_tree, mesh: Mesh, rules=RULES):
    """NamedShardings for a pytree whose leaves are `nn.LogicallyPartitioned` (e.g. from `jax.eval_shape(init)`)."""

    def to_sharding(leaf):
        if isinstance(leaf, nn.LogicallyPartitioned):
            return NamedSharding(mesh, _spec_for(leaf.value.shape, leaf.names, mesh, rules))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(to_sharding, annotated_tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
