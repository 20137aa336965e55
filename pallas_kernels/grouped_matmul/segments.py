"""Work list of a grouped matmul: which (row tile, group) pairs to compute, from `group_sizes`.

Rows are cut into tiles of `tile_rows`. Groups are contiguous row ranges (rows sorted by
group); the rows after the last group (and after M, up to the last tile's end) form one more
range, the padding, whose id is the number of groups. A *segment* is the non-empty intersection
of a tile with one of these ranges: a tile that straddles a group boundary has several segments.
Segments are listed by tile, then by row, so the segments of one tile are consecutive (a kernel
can keep that tile's output block resident while it visits them), and together they cover
every row exactly once.

E + 1 contiguous ranges over T tiles make at most T + E segments (each boundary inside a tile
adds one), so the list has that static length; the unused tail repeats the last tile with an
empty row range and the padding id, which kernels treat as nothing to do.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Segments(NamedTuple):
    """The work list, each field int32 [num_tiles + num_groups]."""

    tiles: jax.Array  # row tile of each segment
    groups: jax.Array  # group of each segment; num_groups for padding rows and unused entries
    starts: jax.Array  # first row of the segment (absolute row index)
    ends: jax.Array  # one past its last row (== starts for unused entries)


def num_segments(num_rows: int, tile_rows: int, num_groups: int) -> int:
    """Static length of the work list: one per tile plus one per possible group boundary."""
    return -(-num_rows // tile_rows) + num_groups


def make_segments(
    group_sizes: jax.Array,  # [E] int32, sum <= num_rows
    num_rows: int,
    tile_rows: int,
) -> Segments:
    """The segments of `num_rows` rows in tiles of `tile_rows` (the last tile may overhang)."""
    num_groups = group_sizes.shape[0]
    num_tiles = -(-num_rows // tile_rows)
    capacity = num_segments(num_rows, tile_rows, num_groups)
    group_ends = jnp.minimum(jnp.cumsum(group_sizes.astype(jnp.int32)), num_rows)
    # The E groups, then the padding rows up to the last tile's end: E + 1 contiguous ranges.
    range_starts = jnp.concatenate([jnp.zeros(1, jnp.int32), group_ends])
    range_ends = jnp.concatenate([group_ends, jnp.full(1, num_tiles * tile_rows, jnp.int32)])
    tile_ids = jnp.arange(num_tiles, dtype=jnp.int32)[:, None]
    seg_starts = jnp.maximum(range_starts[None, :], tile_ids * tile_rows)  # [T, E + 1]
    seg_ends = jnp.minimum(range_ends[None, :], (tile_ids + 1) * tile_rows)  # [T, E + 1]
    valid = (seg_starts < seg_ends).ravel()
    slot = jnp.where(valid, jnp.cumsum(valid) - 1, capacity)

    def compact(values: jax.Array, fill: int) -> jax.Array:  # values: [T, E + 1]
        unused = jnp.full((capacity,), fill, jnp.int32)
        values = jnp.broadcast_to(values, seg_starts.shape).ravel()
        return unused.at[slot].set(values, mode="drop")

    return Segments(
        tiles=compact(tile_ids, num_tiles - 1),
        groups=compact(jnp.arange(num_groups + 1, dtype=jnp.int32), num_groups),
        starts=compact(seg_starts, 0),
        ends=compact(seg_ends, 0),
    )
