"""Speed and memory of each quantization mode on this machine, side by side in one run.

    python tools/bench_quantization.py [--model=PATH] [--modes=f32,bf16,int8,w8a8,int4-g32,gguf,int8-kv]
        [--prefill_tokens=512] [--decode_steps=31] [--repeats=1] [--kv_cache_memory=1GiB] [--nodisk]
        [--fused_decode_steps=1,8]

For each mode (jinfer.eval.modes): the weights' bytes resident on the device, their bytes on disk (a
GGUF file's size for `gguf`, else the Orbax checkpoint `jinfer convert` writes for that mode, written
to a temporary directory and measured), the KV pages that fit `--kv_cache_memory`, and the engine's
prefill tokens/s (one `--prefill_tokens` prompt) and decode tokens/s at batch 1 and 32, measured as
`jinfer bench` measures them (jinfer.bench: a warm-up pass compiles, then the median of `--repeats`),
once per value of `--fused_decode_steps` (EngineConfig.fused_decode_steps; one row each).
Modes run one after the other in one process; on a shared machine the numbers are indicative.
"""

import dataclasses
import functools
import pathlib
import tempfile

from absl import app, flags

from jinfer.bench import BenchmarkOptions, decode_pass, prefill_pass, side_by_side, build_workload, engine_config
from jinfer.cache import format_bytes
from jinfer.config import SERVING_DEFAULTS
from jinfer.checkpoint import orbax_io
from jinfer.defaults import default_model_path
from jinfer.engine.engine import Engine
from jinfer.eval.modes import MODES, check_modes_flag, load_mode
from jinfer.quantize import parameter_bytes, quantization_record

flags.DEFINE_string("model", None, "GGUF file, HF directory or jinfer checkpoint (default: the SmolLM2 GGUF).")
flags.DEFINE_list("modes", ["f32", "bf16", "int8", "w8a8", "int4-g32", "gguf", "int8-kv"], f"Modes, in order: {', '.join(MODES)}.")
flags.DEFINE_integer("prefill_tokens", 512, "Prompt length of the prefill measurement.")
flags.DEFINE_integer("decode_steps", 31, "Timed single-token decode steps.")
flags.DEFINE_list("batch_sizes", ["1", "32"], "Decode batch sizes.")
flags.DEFINE_integer("repeats", 1, "Timed passes per measurement (median).")
flags.DEFINE_string("kv_cache_memory", "1GiB", "KV pool budget of every mode.")
flags.DEFINE_list("fused_decode_steps", [str(SERVING_DEFAULTS["fused_decode_steps"])], "Engine decode steps fused in one program; each value is a row of every mode.")
flags.DEFINE_bool("disk", True, "Measure bytes on disk by writing each mode's checkpoint to a temporary directory.")
FLAGS = flags.FLAGS


def disk_bytes(model_path: pathlib.Path, mode: str, model) -> int:
    """Bytes the mode's weights take on disk: the GGUF file as shipped, or its jinfer checkpoint."""
    if MODES[mode].load_options.get("quantize") == "gguf":
        return model_path.stat().st_size
    quantize = MODES[mode].load_options.get("quantize")
    record = None if quantize is None else quantization_record(model.params, quantize, MODES[mode].load_options.get("group_size"))
    with tempfile.TemporaryDirectory() as directory:
        orbax_io.save(directory, model.params, model.config, record)
        return sum(path.stat().st_size for path in pathlib.Path(directory, orbax_io.PARAMS_DIR).rglob("*") if path.is_file())


def measure(model_path: pathlib.Path, mode: str, options: BenchmarkOptions) -> list[dict]:
    model = load_mode(model_path, mode)
    disk = disk_bytes(model_path, mode, model) if FLAGS.disk else None
    return [measure_engine(model, mode, dataclasses.replace(options, fused_decode_steps=int(steps)), disk) for steps in FLAGS.fused_decode_steps]


def measure_engine(model, mode: str, options: BenchmarkOptions, disk: int | None) -> dict:
    workload = build_workload(options, model)
    config = dataclasses.replace(engine_config(options, workload), kv_cache_dtype=MODES[mode].kv_cache_dtype)
    engine = Engine(model, config, measure_step_memory=False, seed=options.seed)
    row = {
        "mode": mode,
        "fused_decode_steps": options.fused_decode_steps,
        "weights": parameter_bytes(model.params),
        "disk": disk,
        "kv_pages": engine.plan.num_pages,
    }
    prefill, _ = side_by_side(functools.partial(prefill_pass, engine, workload.prefill_prompt), None, options.repeats)
    row["prefill"] = prefill["tokens_per_s"]
    for batch in options.batch_sizes:
        ours = functools.partial(decode_pass, engine, workload.decode_prompt, batch, options.decode_steps)
        decode, _ = side_by_side(ours, None, options.repeats)
        row[f"decode_b{batch}"] = decode["tokens_per_s"]
    print(f"{mode}, {options.fused_decode_steps} fused steps: {row}", flush=True)
    return row


def main(argv):
    del argv
    check_modes_flag(FLAGS.modes)
    model_path = pathlib.Path(FLAGS.model or default_model_path())
    options = BenchmarkOptions(
        model=str(model_path), prefill_tokens=FLAGS.prefill_tokens, batch_sizes=tuple(int(b) for b in FLAGS.batch_sizes),
        decode_steps=FLAGS.decode_steps, repeats=FLAGS.repeats, baseline=False, kv_cache_memory=FLAGS.kv_cache_memory,
    )
    rows = [row for mode in FLAGS.modes for row in measure(model_path, mode, options)]
    decode_columns = [f"decode_b{b}" for b in options.batch_sizes]
    header = ["mode", "fused steps", "weights resident", "on disk", f"KV pages ({FLAGS.kv_cache_memory})", f"prefill {FLAGS.prefill_tokens} (tok/s)"]
    header += [f"decode b{b} (tok/s)" for b in options.batch_sizes]
    print(f"model {model_path.name}; {FLAGS.decode_steps} decode steps, {FLAGS.repeats} repeat(s)")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        disk = "-" if row["disk"] is None else format_bytes(row["disk"])
        cells = [row["mode"], str(row["fused_decode_steps"]), format_bytes(row["weights"]), disk, str(row["kv_pages"]), f"{row['prefill']:.1f}"]
        cells += [f"{row[column]:.1f}" for column in decode_columns]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    app.run(main)
