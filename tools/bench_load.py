"""Times loading SmolLM2-135M-Instruct from its GGUF file and from the converted Orbax checkpoint.

    python tools/bench_load.py [--model=PATH] [--repeats=3]
"""

import pathlib
import statistics
import tempfile
import time

import jax
from absl import app, flags

import jinfer
from jinfer.checkpoint.convert import convert
from jinfer.defaults import default_model_path

flags.DEFINE_string("model", None, "GGUF file or HF directory (default: the SmolLM2 GGUF).")
flags.DEFINE_integer("repeats", 3, "Loads per format; the median is reported.")
FLAGS = flags.FLAGS


def _median_load_seconds(path) -> float:
    times = []
    for _ in range(FLAGS.repeats):
        start = time.perf_counter()
        model = jinfer.load(path)
        jax.block_until_ready(model.params)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv):
    del argv
    source = pathlib.Path(FLAGS.model or default_model_path())
    with tempfile.TemporaryDirectory() as scratch:
        converted = pathlib.Path(scratch) / "converted"
        convert(source, converted)
        rows = [(source.name, _median_load_seconds(source)), ("jinfer Orbax (converted)", _median_load_seconds(converted))]
    print(f"{'format':<40} {'load (s), median of ' + str(FLAGS.repeats):>24}")
    for name, seconds in rows:
        print(f"{name:<40} {seconds:>24.2f}")


if __name__ == "__main__":
    app.run(main)
