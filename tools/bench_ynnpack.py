"""Times the engine step compiled with and without YNNPACK on XLA:CPU, in one process, the two
programs called in turn on the same inputs (the evidence for `step_programs._compiler_options`).

    python tools/bench_ynnpack.py [--shapes=32x1x4,1x1x4,32x32x4,1x1x32,32x32x32,64x64x32] [--repeats=15]

A shape is TOKENSxROWSxPAGES: tokens in the step, rows (sequences) and pages per row of its page
table (pages of 16 tokens: 4 pages is a ~64-token context, 32 a ~512-token one). The model is the
default one (SmolLM2-135M-Instruct, float32). Medians of --repeats calls after one warm-up call.
"""

from __future__ import annotations

import statistics
import time

import jax
from absl import app, flags
from tqdm import tqdm

import jinfer
from jinfer.engine.batch import padding_batch
from jinfer.step import step

flags.DEFINE_list("shapes", ["32x1x4", "1x1x4", "32x32x4", "1x1x32", "32x32x32", "64x64x32"], "Steps as TOKENSxROWSxPAGES.")
flags.DEFINE_integer("repeats", 15, "Timed calls of each program; the median is reported.")
FLAGS = flags.FLAGS

VARIANTS = {"with YNNPACK": {}, "without": {"xla_cpu_experimental_ynn_fusion_type": ""}}


def time_shape(llm: jinfer.LLM, tokens: int, rows: int, pages: int) -> dict[str, float]:
    """Median ms a step of each variant; the KV pool is threaded through every call (it is donated)."""
    engine, model = llm.engine, llm.model
    batch = padding_batch(engine.config, tokens, rows, pages)
    lowered = step.lower(model.params, engine.kv_cache, batch, config=model.config, dtype=model.dtype)
    programs = {name: lowered.compile(compiler_options=options) for name, options in VARIANTS.items()}
    times = {name: [] for name in programs}
    cache = engine.kv_cache
    for run in range(FLAGS.repeats + 1):
        for name, program in programs.items():
            start = time.perf_counter()
            cache, output = program(model.params, cache, batch)
            jax.block_until_ready(output)
            if run:
                times[name].append(time.perf_counter() - start)
    engine.kv_cache = cache
    return {name: statistics.median(values) * 1e3 for name, values in times.items()}


def main(argv):
    del argv
    shapes = [tuple(int(part) for part in shape.split("x")) for shape in FLAGS.shapes]
    llm = jinfer.LLM(max_model_len=max(pages for _, _, pages in shapes) * 16, max_num_seqs=max(rows for _, rows, _ in shapes))
    rows = [(shape, time_shape(llm, *shape)) for shape in tqdm(shapes, desc="shapes")]
    print("| tokens x rows x pages | " + " | ".join(f"{name} (ms)" for name in VARIANTS) + " |")
    print("|---|" + "---|" * len(VARIANTS))
    for shape, times in rows:
        print(f"| {'x'.join(map(str, shape))} | " + " | ".join(f"{times[name]:.1f}" for name in VARIANTS) + " |")


if __name__ == "__main__":
    app.run(main)
