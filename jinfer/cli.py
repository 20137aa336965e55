"""The `jinfer` command: generate, chat, bench, convert."""

from __future__ import annotations

import dataclasses
import os
import sys
import time

from absl import app, flags, logging

from jinfer.config import SERVING_DEFAULTS, EngineConfig

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "GGUF file, HF safetensors directory, jinfer checkpoint or preset (default: SmolLM2-135M-Instruct).")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Parameter and compute dtype.")
flags.DEFINE_enum("quantize", None, ["int8", "int4", "gguf", "w8a8", "w4a8", "w4a16"], "Quantization of the linear layers on load (gguf: a GGUF file's quantized weights as stored; w8a8: int8 weights and dynamically quantized int8 activations; w4a8 / w4a16: int4 weights in groups of --group_size and activations rounded to 8 / 16 bits); convert: write them quantized.")
flags.DEFINE_bool("quantize_lm_head", True, "With --quantize: quantize the LM head too (a tied head gets a quantized copy of the embedding).")
flags.DEFINE_integer("group_size", None, "Quantization group size (32, 64 or 128; int8 default: one scale per output channel).")
flags.DEFINE_enum("speculative", None, ["ngram", "self", "draft", "heads"], "Speculative decoding: n-gram prompt lookup, self-drafting (the first layers), --draft_model, or --draft_heads; bench: measure it against plain decoding.")
flags.DEFINE_integer("num_speculative_tokens", 4, "Speculative decoding: drafts per pass (k, 1 to 16).")
flags.DEFINE_string("draft_model", None, "Speculative decoding: the draft model (same vocabulary) for --speculative=draft.")
flags.DEFINE_string("draft_heads", None, "Speculative decoding: the draft heads checkpoint (tools/train_draft_heads.py) for --speculative=heads.")
flags.DEFINE_string("mesh", None, "Device mesh, e.g. data:1,model:8 (default: one device); convert: write the checkpoint laid out for it.")
flags.DEFINE_string("prompt", None, "generate: the prompt (else --prompt_file, else stdin).")
flags.DEFINE_string("prompt_file", None, "generate: a file with one prompt per line.")
flags.DEFINE_bool("chat_template", True, "generate: wrap each prompt as a user message in the model's chat template.")
flags.DEFINE_integer("max_tokens", 64, "Most tokens to generate per prompt.")
flags.DEFINE_float("temperature", 0.0, "Sampling temperature; 0 is greedy.")
flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0: off).")
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass.")
flags.DEFINE_float("min_p", 0.0, "Drop tokens below min_p times the top probability.")
flags.DEFINE_float("repetition_penalty", 1.0, "Penalty for tokens already in the prompt or output.")
flags.DEFINE_integer("seed", None, "Sampling seed.")
flags.DEFINE_multi_string("stop", [], "Stop string (repeatable).")
flags.DEFINE_bool("ignore_eos", False, "Keep generating past end-of-sequence tokens.")
flags.DEFINE_integer("num_prompts", 64, "bench: prompts in the offline-throughput run.")
flags.DEFINE_list("batch_sizes", ["1", "8", "32", "64"], "bench: decode batch sizes.")
flags.DEFINE_integer("decode_steps", 127, "bench: timed single-token decode steps after the first token.")
flags.DEFINE_integer("prefill_tokens", 512, "bench: prompt length of the prefill measurement.")
flags.DEFINE_integer("repeats", 3, "bench: timed passes per measurement; the median is reported.")
flags.DEFINE_bool("baseline", True, "bench: also measure transformers on the same weights.")
flags.DEFINE_string("json", None, "bench: also write the results to this JSON file.")
flags.DEFINE_bool("warm_start", True, "bench: also time a fresh `jinfer generate` process to its first token, caches filled.")
flags.DEFINE_string("output", None, "convert: directory for the jinfer checkpoint.")
flags.DEFINE_bool("parity", True, "convert: finish with a parity report against the source.")
flags.DEFINE_bool("distributed", False, "Join a multi-process run (one process per host); with no --coordinator_address, --num_processes or --process_id, JAX discovers them (JAX_COORDINATOR_ADDRESS, TPU VMs, Slurm, Open MPI, Kubernetes).")
flags.DEFINE_string("coordinator_address", None, "Multi-process run: HOST:PORT of process 0's coordinator (implies --distributed).")
flags.DEFINE_integer("num_processes", None, "Multi-process run: the number of processes (implies --distributed).")
flags.DEFINE_integer("process_id", None, "Multi-process run: this process's index, 0 to num_processes - 1 (implies --distributed).")
flags.DEFINE_string("compilation_cache", os.path.join(os.path.expanduser("~"), ".cache", "jinfer", "xla"), "Persistent XLA compilation cache directory ('' to disable).")
for _field in dataclasses.fields(EngineConfig):
    _define = flags.DEFINE_integer if _field.type in ("int", int) else flags.DEFINE_string
    _define(_field.name, SERVING_DEFAULTS.get(_field.name, _field.default), f"Engine: {_field.name} (EngineConfig).")

COMMANDS = ("generate", "chat", "bench", "convert")


def _model_path() -> str:
    from jinfer.defaults import default_model_path

    return FLAGS.model or str(default_model_path())


def _engine_options() -> dict:
    """EngineConfig from the flags; step programs are kept beside the compilation cache unless set."""
    options = {field.name: getattr(FLAGS, field.name) for field in dataclasses.fields(EngineConfig)}
    if not FLAGS["program_cache"].present and FLAGS.compilation_cache:
        options["program_cache"] = os.path.join(os.path.dirname(os.path.normpath(FLAGS.compilation_cache)), "programs")
    return options


def _mesh():
    if not FLAGS.mesh:
        return None
    from jinfer.sharding import make_mesh, parse_mesh_flag

    return make_mesh(parse_mesh_flag(FLAGS.mesh))


def _sampling_params():
    from jinfer.sampling import SamplingParams

    return SamplingParams(
        temperature=FLAGS.temperature,
        top_k=FLAGS.top_k,
        top_p=FLAGS.top_p,
        min_p=FLAGS.min_p,
        repetition_penalty=FLAGS.repetition_penalty,
        seed=FLAGS.seed,
        max_tokens=FLAGS.max_tokens,
        stop=tuple(FLAGS.stop),
        ignore_eos=FLAGS.ignore_eos,
    )


def _llm():
    from jinfer.api import LLM
    from jinfer.step_programs import prefetch_first

    options = _engine_options()
    if options["program_cache"] and not FLAGS.mesh and not _joins_distributed():
        prefetch_first(options["program_cache"])  # overlaps loading the first step's executable with loading the model
    return LLM(_model_path(), dtype=FLAGS.dtype, mesh=_mesh(), quantize=FLAGS.quantize, group_size=FLAGS.group_size, quantize_lm_head=FLAGS.quantize_lm_head, speculative=_speculative(), **options)


def _speculative():
    if FLAGS.speculative is None:
        return None
    from jinfer.speculative import SpeculativeConfig

    return SpeculativeConfig(method=FLAGS.speculative, num_tokens=FLAGS.num_speculative_tokens, draft_model=FLAGS.draft_model, draft_heads=FLAGS.draft_heads)


def _prompts() -> list[str]:
    if FLAGS.prompt is not None:
        return [FLAGS.prompt]
    source = open(FLAGS.prompt_file, encoding="utf-8") if FLAGS.prompt_file else sys.stdin
    with source:
        return [line.rstrip("\n") for line in source if line.strip()]


def _serve(command) -> None:
    """Runs `command(llm)` on process 0; the other processes of a multi-process run follow its steps."""
    from jinfer.distributed import is_leader

    llm = _llm()
    if not is_leader():
        llm.follow()
        return
    try:
        command(llm)
    finally:
        llm.stop_followers()


def generate(llm) -> None:
    """One prompt streams its tokens; several are batched and printed in order."""
    params = _sampling_params()
    prompts = _prompts()
    wrap = FLAGS.chat_template and llm.tokenizer is not None and llm.tokenizer.chat_template
    if len(prompts) == 1:
        start = time.perf_counter()
        prompt = llm.tokenizer.encode(llm.tokenizer.apply_chat_template([{"role": "user", "content": prompts[0]}]), add_special_tokens=False) if wrap else prompts[0]
        count = 0
        for chunk in llm.stream(prompt, params):
            print(chunk.text, end="", flush=True)
            count += 1
        print()
        logging.info("%d tokens in %.2f s", count, time.perf_counter() - start)
        return
    outputs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params) if wrap else llm.generate(prompts, params)
    for output in outputs:
        print(output.outputs[0].text)


def chat(llm) -> None:
    """An interactive conversation, streamed token by token."""
    params = _sampling_params()
    messages = []
    print("chat with the model; an empty line ends the conversation", flush=True)
    for line in sys.stdin:
        if not line.strip():
            break
        messages.append({"role": "user", "content": line.strip()})
        prompt = llm.tokenizer.encode(llm.tokenizer.apply_chat_template(messages), add_special_tokens=False)
        reply = ""
        for chunk in llm.stream(prompt, params):
            print(chunk.text, end="", flush=True)
            reply += chunk.text
        print(flush=True)
        messages.append({"role": "assistant", "content": reply})


def bench() -> None:
    from jinfer.bench import BenchmarkOptions, format_table, run_benchmark, write_json

    options = BenchmarkOptions(
        model=FLAGS.model,
        dtype=FLAGS.dtype,
        num_prompts=FLAGS.num_prompts,
        prefill_tokens=FLAGS.prefill_tokens,
        batch_sizes=tuple(int(size) for size in FLAGS.batch_sizes),
        decode_steps=FLAGS.decode_steps,
        repeats=FLAGS.repeats,
        baseline=FLAGS.baseline,
        kv_cache_memory=FLAGS.kv_cache_memory if FLAGS["kv_cache_memory"].present else BenchmarkOptions.kv_cache_memory,
        page_size=FLAGS.page_size,
        fused_decode_steps=FLAGS.fused_decode_steps,
        seed=FLAGS.seed or 0,
        warm_start=FLAGS.warm_start,
    )
    if FLAGS.speculative:
        from jinfer.bench_speculative import format_speculative_table, run_speculative_benchmark

        results = run_speculative_benchmark(options, FLAGS.speculative, FLAGS.num_speculative_tokens, FLAGS.draft_model, FLAGS.draft_heads)
        if FLAGS.json:
            write_json(results, FLAGS.json)
        print(format_speculative_table(results))
        return
    results = run_benchmark(options)
    if FLAGS.json:
        write_json(results, FLAGS.json)
    print(format_table(results))


def convert() -> None:
    from jinfer import load
    from jinfer.checkpoint.convert import convert as convert_checkpoint
    from jinfer.checkpoint.convert import format_report, parity_report

    if not FLAGS.output:
        raise app.UsageError("convert needs --output=DIRECTORY")
    source = _model_path()
    mesh = _mesh()
    convert_checkpoint(source, FLAGS.output, FLAGS.dtype, mesh, FLAGS.quantize, FLAGS.group_size, FLAGS.quantize_lm_head)
    if FLAGS.parity:
        print(format_report(*parity_report(source, load(FLAGS.output, dtype=FLAGS.dtype, mesh=mesh))))


def _enable_compilation_cache() -> None:
    if FLAGS.compilation_cache:
        import jax

        jax.config.update("jax_compilation_cache_dir", FLAGS.compilation_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


def _joins_distributed() -> bool:
    return FLAGS.distributed or any(value is not None for value in (FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id))


def _initialize_distributed(command: str) -> None:
    """Joins a multi-process run when a flag asks for one; only generate and chat can be served so."""
    addressing = (FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    if not _joins_distributed():
        return
    if command not in ("generate", "chat"):
        raise app.UsageError(f"{command} runs in one process; multi-process flags are for generate and chat")
    from jinfer import distributed

    distributed.initialize(*addressing)


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[1] not in COMMANDS:
        raise app.UsageError(f"usage: jinfer {{{'|'.join(COMMANDS)}}} [--flags]; got {argv[1:]}")
    if len(argv) > 2:
        raise app.UsageError(f"unexpected arguments {argv[2:]}")
    _enable_compilation_cache()
    _initialize_distributed(argv[1])
    commands = {"generate": lambda: _serve(generate), "chat": lambda: _serve(chat), "bench": bench, "convert": convert}
    commands[argv[1]]()


def run() -> None:
    """The `jinfer` console script. A single-process run ends with os._exit once its output and logs
    are flushed: the interpreter's teardown (freeing the model and the executables, joining XLA's
    thread pools) took ~0.6 s after the work was done. A multi-process run exits normally: JAX shuts
    its distributed runtime down at exit."""
    try:
        app.run(main)
    except SystemExit as done:
        if (FLAGS.is_parsed() and _joins_distributed()) or not isinstance(done.code, int | None):
            raise
        sys.stdout.flush()
        logging.flush()
        sys.stderr.flush()
        os._exit(done.code or 0)


if __name__ == "__main__":
    run()
