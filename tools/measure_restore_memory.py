"""Peak host memory of restoring a jinfer Orbax checkpoint, by how it is restored and how it was saved.

    python tools/measure_restore_memory.py [--preset=llama-3.1-8b --num_layers=1 --vocab_size=8192 --dtype=bfloat16]

Saves a random-weight model (a preset cut down to `--num_layers` and `--vocab_size`) twice: from one
device (each array one chunk) and from a model:8 mesh (each array chunked by its shards, what
`jinfer convert --mesh=model:8` writes). Then restores it in a fresh process per measurement, on 8
fake CPU devices, and reports how much the process's peak RSS (`ru_maxrss`) grew during the
restore, against the model's size:

  one_device     `jinfer.load(path)`: every array on device 0
  mesh           `jinfer.load(path, mesh=model:8)`: Orbax reads each shard into its device
  host_copy      the whole checkpoint read into host numpy arrays, then `device_put` onto model:8
  two_processes  two processes of 4 devices each (`jinfer.distributed`), one model:8 mesh across
                 them: what one host of a multi-host run holds

Fake CPU devices share the host's memory, so in one process the 8 shards of the mesh add up to the
whole model. This process never imports JAX: Linux carries a parent's peak RSS into the
`ru_maxrss` of the processes it starts, so the saving runs in a process of its own too.
"""

from __future__ import annotations

import json
import os
import pathlib
import resource
import socket
import subprocess
import sys
import tempfile

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("preset", "llama-3.1-8b", "Preset whose shapes the model takes.")
flags.DEFINE_integer("num_layers", 1, "Layers kept from the preset.")
flags.DEFINE_integer("vocab_size", 8192, "Vocabulary size (the preset's is large for a few layers).")
flags.DEFINE_enum("dtype", "bfloat16", ["float32", "bfloat16"], "Parameter dtype.")
flags.DEFINE_string("checkpoint", None, "Internal: the checkpoint a child process saves or restores.")
flags.DEFINE_enum("mode", None, ["save_one_device", "save_mesh", "one_device", "mesh", "host_copy", "two_processes"], "Internal: a child's task.")
flags.DEFINE_string("coordinator_address", None, "Internal: two_processes coordinator.")
flags.DEFINE_integer("process_id", 0, "Internal: two_processes process index.")

DEVICES = 8
LAYOUTS = ("one_device", "mesh")  # how a checkpoint was saved
MEASUREMENTS = (  # (restore mode, checkpoint layout)
    ("one_device", "one_device"),
    ("mesh", "one_device"),
    ("mesh", "mesh"),
    ("host_copy", "mesh"),
    ("two_processes", "one_device"),
    ("two_processes", "mesh"),
)
TIMEOUT_S = 900
MIB = 2**20


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _mesh():
    import jax

    from jinfer.sharding import make_mesh

    return make_mesh({"model": jax.device_count()})


def save_model(directory: pathlib.Path, on_mesh: bool) -> dict:
    """Writes the cut-down preset with random weights, from one device or from the mesh."""
    import jax

    from jinfer.checkpoint import orbax_io
    from jinfer.config import read_preset
    from jinfer.model import abstract_params, init_params, param_shardings, resolve_dtype

    preset, _ = read_preset(FLAGS.preset)
    layers = FLAGS.num_layers
    config = preset.replace(
        num_layers=layers, vocab_size=FLAGS.vocab_size, layer_windows=preset.layer_windows[:layers], moe_layers=preset.moe_layers[:layers]
    )
    dtype = resolve_dtype(FLAGS.dtype)
    shardings = param_shardings(abstract_params(config, dtype), _mesh() if on_mesh else None)
    params = jax.jit(init_params, static_argnums=(0, 1, 2), out_shardings=shardings)(config, dtype, 0)
    orbax_io.save(directory, params, config)
    return {"model_bytes": sum(x.nbytes for x in jax.tree.leaves(params))}


def restore(mode: str, checkpoint: pathlib.Path) -> dict:
    """Restores the checkpoint as `mode` says; returns the RSS growth and the bytes on device 0."""
    import jax

    import jinfer

    if mode == "two_processes":
        from jinfer import distributed

        distributed.initialize(FLAGS.coordinator_address, 2, FLAGS.process_id)
    mesh = None if mode == "one_device" else _mesh()
    jax.block_until_ready(jax.numpy.zeros(1))
    before = peak_rss_bytes()
    if mode == "host_copy":
        params = _restore_through_host(checkpoint, mesh)
    else:
        params = jinfer.load(checkpoint, dtype=FLAGS.dtype, mesh=mesh).params
    jax.block_until_ready(params)
    device = jax.local_devices()[0]
    on_device = sum(s.data.nbytes for x in jax.tree.leaves(params) for s in x.addressable_shards if s.device == device)
    return {"rss_growth": peak_rss_bytes() - before, "device_bytes": on_device}


def _restore_through_host(checkpoint: pathlib.Path, mesh):
    """The whole checkpoint as host numpy arrays, then placed onto the mesh."""
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    from jinfer.checkpoint import orbax_io
    from jinfer.model import abstract_params, param_shardings

    annotated = abstract_params(orbax_io.read_config(checkpoint), FLAGS.dtype)
    with ocp.StandardCheckpointer() as checkpointer:
        metadata = checkpointer.metadata(checkpoint / orbax_io.PARAMS_DIR).item_metadata
        target = jax.tree.map(lambda leaf: np.empty(leaf.shape, leaf.dtype), dict(metadata))
        host = checkpointer.restore(checkpoint / orbax_io.PARAMS_DIR, target)
    return jax.device_put(host, param_shardings(annotated, mesh))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(mode: str, checkpoint: pathlib.Path) -> list[dict]:
    """Runs `mode` in fresh processes (two for two_processes); one result per process."""
    processes = 2 if mode == "two_processes" else 1
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={DEVICES // processes}", "JAX_PLATFORMS": "cpu"}
    model = [f"--preset={FLAGS.preset}", f"--num_layers={FLAGS.num_layers}", f"--vocab_size={FLAGS.vocab_size}", f"--dtype={FLAGS.dtype}"]
    command = [sys.executable, __file__, f"--mode={mode}", f"--checkpoint={checkpoint}", *model]
    if processes > 1:
        command.append(f"--coordinator_address=127.0.0.1:{_free_port()}")
    children = [subprocess.Popen([*command, f"--process_id={i}"], env=env, stdout=subprocess.PIPE, text=True) for i in range(processes)]
    try:
        outputs = [child.communicate(timeout=TIMEOUT_S)[0] for child in children]
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
    codes = [child.returncode for child in children]
    if any(codes):
        raise RuntimeError(f"{mode} on {checkpoint.name}: a child process failed with exit codes {codes}")
    return [json.loads(output.strip().splitlines()[-1]) for output in outputs]


def main(argv: list[str]) -> None:
    if FLAGS.mode:
        checkpoint = pathlib.Path(FLAGS.checkpoint)
        saves = {"save_one_device": False, "save_mesh": True}
        print(json.dumps(save_model(checkpoint, saves[FLAGS.mode]) if FLAGS.mode in saves else restore(FLAGS.mode, checkpoint)))
        return
    with tempfile.TemporaryDirectory(prefix="jinfer-restore-") as directory:
        checkpoints = {layout: pathlib.Path(directory) / f"saved_on_{layout}" for layout in LAYOUTS}
        model_bytes = [_run(f"save_{layout}", path)[0]["model_bytes"] for layout, path in checkpoints.items()][0]
        print(f"{FLAGS.preset} cut to {FLAGS.num_layers} layer(s), vocab {FLAGS.vocab_size}, {FLAGS.dtype}: {model_bytes / MIB:.0f} MiB")
        print(f"{'restore':<14} {'saved on':<11} {'process':>7} {'peak RSS growth (MiB)':>22} {'x model':>8} {'device 0 (MiB)':>15}")
        for mode, layout in MEASUREMENTS:
            for index, result in enumerate(_run(mode, checkpoints[layout])):
                growth = result["rss_growth"]
                print(f"{mode:<14} {layout:<11} {index:>7} {growth / MIB:>22.0f} {growth / model_bytes:>8.2f} {result['device_bytes'] / MIB:>15.0f}")


if __name__ == "__main__":
    app.run(main)
