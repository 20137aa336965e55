"""Multi-host serving: process 0 schedules, every process runs the same step on the global arrays.

One controller process per host. Only process 0 (the leader) tokenizes, schedules and reads
results; before each step it broadcasts the step's host batch to the other processes (followers),
which run the same jitted step on it, so every process takes part in the step's collectives.

A step is sent in two broadcasts: a fixed-size header (the shape of every array of the batch, and
a stop flag), then the arrays themselves, which the followers receive into zeros of those shapes.
The header makes the wire format independent of which bucket a step uses.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from jinfer.config import EngineConfig
from jinfer.distributed import is_leader
from jinfer.engine.batch import padding_batch
from jinfer.step import StepBatch

if TYPE_CHECKING:
    from jinfer.engine.engine import Engine


class StepBroadcast:
    """Carries each step's batch from the leader to the followers."""

    def __init__(self, config: EngineConfig, mesh: Mesh | None):
        if mesh is None or mesh.devices.size != jax.device_count():
            size = "no mesh" if mesh is None else f"a mesh of {mesh.devices.size} devices"
            raise ValueError(f"a run of {jax.process_count()} processes needs a mesh over all {jax.device_count()} devices, got {size}")
        template = padding_batch(config, config.token_buckets[0], config.seq_buckets[0], config.page_buckets[0])
        leaves, self._treedef = jax.tree.flatten(template)
        self._dtypes = [leaf.dtype for leaf in leaves]
        self._ranks = [leaf.ndim for leaf in leaves]

    def send(self, batch: StepBatch) -> None:
        """Leader: the batch's shapes, then its arrays (numpy, as `batch.build_batch` makes them)."""
        leaves = jax.tree.leaves(batch)
        dtypes = [leaf.dtype for leaf in leaves]
        if dtypes != self._dtypes:
            raise ValueError(f"step batch dtypes {dtypes} differ from those the followers expect {self._dtypes}")
        shapes = [dim for leaf in leaves for dim in leaf.shape]
        self._broadcast_header(np.asarray([0, *shapes], np.int32))
        multihost_utils.broadcast_one_to_all(leaves)

    def send_stop(self) -> None:
        """Leader: tells the followers there are no more steps."""
        self._broadcast_header(np.asarray([1] + [0] * sum(self._ranks), np.int32))

    def receive(self) -> StepBatch | None:
        """Follower: the next step's batch, or None once the leader has stopped."""
        header = self._broadcast_header(np.zeros(1 + sum(self._ranks), np.int32))
        if header[0]:
            return None
        zeros = [np.zeros(shape, dtype) for shape, dtype in zip(self._split_shapes(header[1:]), self._dtypes)]
        return jax.tree.unflatten(self._treedef, multihost_utils.broadcast_one_to_all(zeros))

    def _split_shapes(self, dims: np.ndarray) -> list[tuple[int, ...]]:
        """dims: [sum of ranks] int32, every array's shape in turn -> one shape per array."""
        bounds = np.cumsum([0, *self._ranks])
        return [tuple(int(d) for d in dims[start:end]) for start, end in zip(bounds[:-1], bounds[1:])]

    @staticmethod
    def _broadcast_header(header: np.ndarray) -> np.ndarray:
        """header: [1 + sum of ranks] int32 (stop flag, then shapes) -> the leader's header."""
        return multihost_utils.broadcast_one_to_all(header)


def follow(engine: Engine) -> int:
    """Follower loop: runs each step the leader sends until it stops; returns the number of steps."""
    if engine.multihost is None:
        raise ValueError("follow() needs a multi-process run: call jinfer.distributed.initialize() first")
    if is_leader():
        raise ValueError("process 0 leads the run and sends the steps; follow() is for the other processes")
    steps = 0
    while (batch := engine.multihost.receive()) is not None:
        engine.run_batch(batch)
        steps += 1
    return steps
