"""Multi-process (multi-host) runs: one controller process per host, all running the same step.

Call `initialize` in every process before JAX touches a device; then load the model with a mesh
over all processes' devices (`jax.devices()` is global after it). Process 0 serves requests
(`LLM.generate`, ...) and ends with `LLM.stop_followers()`; the others call `LLM.follow()`.
See `jinfer.engine.multihost` for what travels between them.

Arguments left None come from JAX's own discovery: the JAX_COORDINATOR_ADDRESS environment
variable, and the cluster environments JAX detects (Cloud TPU VMs, Slurm, Open MPI, Kubernetes).
"""

from __future__ import annotations

import jax
from absl import logging

CPU_COLLECTIVES = "gloo"


def _check(coordinator_address: str | None, num_processes: int | None, process_id: int | None) -> None:
    if coordinator_address is not None:
        host, _, port = coordinator_address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"coordinator_address={coordinator_address!r} must be HOST:PORT, e.g. 10.0.0.1:1234")
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"num_processes={num_processes} must be at least 1")
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"process_id={process_id} must be in [0, {num_processes}) for num_processes={num_processes}")


def initialize(coordinator_address: str | None = None, num_processes: int | None = None, process_id: int | None = None) -> None:
    """Joins this process to the run. CPU devices exchange collectives through gloo."""
    _check(coordinator_address, num_processes, process_id)
    if jax.config.jax_cpu_collectives_implementation in (None, "none"):
        jax.config.update("jax_cpu_collectives_implementation", CPU_COLLECTIVES)
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id)
    logging.info(
        "process %d of %d: %d local devices of %d", jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count()
    )


def is_leader() -> bool:
    """Whether this process schedules and reads results (process 0; also true in a single-process run)."""
    return jax.process_index() == 0
