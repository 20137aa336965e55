"""The serving benchmark: offline throughput, prefill and decode speed of the engine, next to transformers.

Protocol (greedy, EOS ignored):
- offline: `num_prompts` requests submitted at once, prompt and output lengths drawn log-uniformly
  from fixed-seed ranges, prompts cut from real text; input/output tokens/s, TTFT and TPOT percentiles;
- prefill: one `prefill_tokens`-token prompt from an empty cache, the one step that runs it all;
- decode at batch B: a 42-token chat prompt replicated B times, first token from the prefill, then
  `decode_steps` single-token steps timed; tokens/s = tokens generated in those steps / their time.
Prefill and decode take the median of `repeats` passes, jinfer and transformers alternating so that both
see the same machine load. Every jinfer measurement starts with a warm-up pass that compiles its shapes;
its extra time over a warm pass is its compile time. Models without a tokenizer get random token ids.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import json
import math
import os
import pathlib
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import jax
import numpy as np
from absl import logging
from tqdm import tqdm

from jinfer.cache import format_bytes
from jinfer.config import SERVING_DEFAULTS, EngineConfig
from jinfer.defaults import default_model_path
from jinfer.engine.engine import Engine
from jinfer.model import Model, load
from jinfer.sampling import SamplingParams

DECODE_MESSAGE = "Write a short story about a robot who learns to paint."  # 42 tokens in SmolLM2's chat template
DECODE_PROMPT_TOKENS = 42  # length of the random decode prompt of a model without a tokenizer
CORPUS_MODULES = ("argparse", "csv", "json", "unittest", "typing", "sqlite3", "collections")  # docstrings = real text
PERCENTILES = (50, 99)


@dataclasses.dataclass(frozen=True)
class BenchmarkOptions:
    """What to measure and on what; raises ValueError naming a bad value."""

    model: str | None = None  # GGUF file, HF safetensors directory, jinfer checkpoint or preset; None: SmolLM2
    dtype: str = "float32"
    num_prompts: int = 64
    prompt_lens: tuple[int, int] = (20, 400)
    output_lens: tuple[int, int] = (16, 256)
    prefill_tokens: int = 512
    batch_sizes: tuple[int, ...] = (1, 8, 32, 64)
    decode_steps: int = 127
    repeats: int = 3
    baseline: bool = True
    kv_cache_memory: str = "1GiB"
    page_size: int = 16
    fused_decode_steps: int = SERVING_DEFAULTS["fused_decode_steps"]  # EngineConfig.fused_decode_steps of the engine measured
    seed: int = 0
    progress: bool = True
    warm_start: bool = False  # also time `jinfer generate --max_tokens=1` in a fresh process, caches filled

    def __post_init__(self):
        object.__setattr__(self, "batch_sizes", tuple(self.batch_sizes))
        for name in ("num_prompts", "prefill_tokens", "decode_steps", "repeats", "page_size", "fused_decode_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
        for name in ("prompt_lens", "output_lens"):
            low, high = getattr(self, name)
            if not 1 <= low <= high:
                raise ValueError(f"{name}={getattr(self, name)} must be (low, high) with 1 <= low <= high")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError(f"batch_sizes={self.batch_sizes} must be one or more sizes >= 1")


def run_benchmark(options: BenchmarkOptions) -> dict:
    """Runs every measurement; see the module docstring for the protocol and `format_table` for a summary."""
    model_path = str(options.model if options.model is not None else default_model_path())
    start = time.perf_counter()
    model = load(model_path, dtype=options.dtype)
    load_s = time.perf_counter() - start
    workload = build_workload(options, model)
    engine = Engine(model, engine_config(options, workload), measure_step_memory=False, seed=options.seed)
    _check_decode_fits(options, engine, workload)
    results: dict = {"config": _config(options, model_path, engine, workload, load_s)}
    reference = _reference(options, model_path, workload, results["config"])
    tasks = _tasks(options, engine, reference, workload, results)
    with tqdm(tasks, desc="benchmark", unit="task", disable=not options.progress) as bar:
        for name, task in bar:
            bar.set_postfix_str(name)
            task()
    results["compile_s"] = sum(results[key]["compile_s"] for key in [*_measurement_keys(results), "offline"])
    results["config"]["compiled_shapes"] = len(engine.bucket_shapes_used)
    if options.warm_start:
        results["warm_start"] = _warm_start(model_path, options.dtype)
    return results


def _warm_start(model_path: str, dtype: str) -> dict:
    """Wall time of a fresh `jinfer generate` process to its first token (the first byte it prints), after
    a run that fills the caches (decoded model, step executables); the process starts, imports, loads,
    plans and prefills. `exit_s`: to the end of the process, interpreter shutdown included."""
    command = [
        sys.executable, "-c", "from jinfer.cli import run; run()", "generate",
        f"--model={model_path}", f"--dtype={dtype}", "--prompt=Hello", "--max_tokens=1", "--temperature=0",
    ]
    first_token, exit_ = [], []
    for _ in range(6):  # the first fills the caches; the median of the other five is reported
        start = time.perf_counter()
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL) as process:
            if not process.stdout.read(1):
                raise RuntimeError(f"{' '.join(command)} printed nothing (exit status {process.wait()})")
            first_token.append(time.perf_counter() - start)
            process.stdout.read()
        exit_.append(time.perf_counter() - start)
        if process.returncode:
            raise subprocess.CalledProcessError(process.returncode, command)
    return {"cold_s": first_token[0], "warm_s": statistics.median(first_token[1:]), "runs_s": first_token, "exit_s": statistics.median(exit_[1:])}


# Workload ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Workload:
    """Token-id prompts for every measurement."""

    prompts: list[list[int]]  # offline prompts
    output_lens: list[int]  # offline max_tokens, one per prompt
    prefill_prompt: list[int]
    decode_prompt: list[int]


def build_workload(options: BenchmarkOptions, model: Model) -> Workload:
    """Fixed-seed prompts: windows of real text with a tokenizer, random ids without."""
    rng = np.random.default_rng(options.seed)
    tokenizer = model.tokenizer
    if tokenizer is not None:
        corpus = np.asarray(tokenizer.encode(_corpus_text(), add_special_tokens=False))
        chat = tokenizer.apply_chat_template([{"role": "user", "content": DECODE_MESSAGE}]) if tokenizer.chat_template else DECODE_MESSAGE
        decode_prompt = tokenizer.encode(chat, add_special_tokens=not tokenizer.chat_template)
    else:
        corpus = rng.integers(model.config.vocab_size, size=4096)
        decode_prompt = rng.integers(model.config.vocab_size, size=DECODE_PROMPT_TOKENS).tolist()
    prompt_lens = _log_uniform(rng, options.prompt_lens, options.num_prompts)
    output_lens = _log_uniform(rng, options.output_lens, options.num_prompts)
    prompts = [_window(corpus, rng, length) for length in prompt_lens]
    return Workload(prompts, output_lens, _window(corpus, rng, options.prefill_tokens), list(decode_prompt))


def _corpus_text() -> str:
    return "\n\n".join(inspect.getdoc(importlib.import_module(name)) or "" for name in CORPUS_MODULES)


def _log_uniform(rng: np.random.Generator, bounds: tuple[int, int], count: int) -> list[int]:
    low, high = bounds
    values = np.exp(rng.uniform(math.log(low), math.log(high + 1), size=count))
    return np.clip(values.astype(int), low, high).tolist()


def _window(corpus: np.ndarray, rng: np.random.Generator, length: int) -> list[int]:
    """`length` consecutive corpus tokens from a random offset, wrapping around."""
    offset = int(rng.integers(len(corpus)))
    return np.take(corpus, np.arange(offset, offset + length), mode="wrap").tolist()


def engine_config(options: BenchmarkOptions, workload: Workload) -> EngineConfig:
    """One engine for every measurement: room for the largest batch, the prefill prompt, the longest request."""
    max_num_seqs = max(options.batch_sizes)
    budget = max(options.prefill_tokens, max_num_seqs)
    longest = max(
        options.prefill_tokens + 1,
        options.prompt_lens[1] + options.output_lens[1],
        len(workload.decode_prompt) + options.decode_steps + 1 + _decode_slack(len(workload.decode_prompt), max_num_seqs, budget),
    )
    max_model_len = -(-longest // options.page_size) * options.page_size
    return EngineConfig(max_num_seqs, max_model_len, budget, options.page_size, options.kv_cache_memory, fused_decode_steps=options.fused_decode_steps)


def _decode_slack(prompt_len: int, batch: int, budget: int) -> int:
    """Extra tokens early requests of a batch may decode while later ones are still prefilling."""
    return -(-batch * prompt_len // budget)


def _check_decode_fits(options: BenchmarkOptions, engine: Engine, workload: Workload) -> None:
    """Raises ValueError, before anything is measured, if the largest decode batch would not fit the KV pool."""
    batch, budget = max(options.batch_sizes), engine.config.max_num_batched_tokens
    tokens = len(workload.decode_prompt) + options.decode_steps + 1 + _decode_slack(len(workload.decode_prompt), batch, budget)
    needed = batch * -(-tokens // options.page_size)
    available = engine.plan.num_pages - 1
    if needed > available:
        raise ValueError(
            f"decode at batch {batch} needs {needed} KV pages of {options.page_size} tokens, but kv_cache_memory={options.kv_cache_memory!r} "
            f"holds {available}; raise kv_cache_memory to at least {format_bytes((needed + 1) * engine.plan.bytes_per_page)}"
        )


def _config(options: BenchmarkOptions, model_path: str, engine: Engine, workload: Workload, load_s: float) -> dict:
    device = jax.devices()[0]
    return {
        "model": model_path,
        "dtype": options.dtype,
        "architecture": engine.model.config.architecture,
        "load_s": load_s,
        "engine": dataclasses.asdict(engine.config),
        "kv_pages": engine.plan.num_pages,
        "options": {k: v for k, v in dataclasses.asdict(options).items() if k not in ("model", "dtype", "progress")},
        "decode_prompt_tokens": len(workload.decode_prompt),
        "jax": jax.__version__,
        "device": f"{device.platform}:{device.device_kind} x{jax.device_count()}",
        "cpu_threads": len(os.sched_getaffinity(0)),
    }


# Engine measurements ----------------------------------------------------------------------------------------


Pass = Callable[[], tuple[dict, float]]  # one timed pass -> (metrics with "tokens_per_s", wall seconds of the pass)


def _tasks(options: BenchmarkOptions, engine: Engine, reference: TransformersReference | None, workload: Workload, results: dict) -> list[tuple[str, Callable[[], None]]]:
    """(name, task) pairs; each prefill/decode task measures jinfer and transformers side by side."""

    def measure(key: str, ours: Pass, theirs: Callable[[], dict] | None) -> Callable[[], None]:
        def task() -> None:
            results[key], baseline = side_by_side(ours, theirs, options.repeats)
            logging.info("jinfer %s: %s", key, results[key])
            if baseline is not None:
                results.setdefault("baseline", {})[key] = baseline
                logging.info("transformers %s: %s", key, baseline)

        return task

    def offline() -> None:
        results["offline"], _ = side_by_side(functools.partial(_offline_pass, engine, workload), None, 1)
        logging.info("jinfer offline: %s", results["offline"])

    key = f"prefill_{options.prefill_tokens}"
    theirs = None if reference is None else functools.partial(reference.prefill, workload.prefill_prompt)
    tasks = [(key, measure(key, functools.partial(prefill_pass, engine, workload.prefill_prompt), theirs))]
    for batch in options.batch_sizes:
        key = f"decode_b{batch}"
        ours = functools.partial(decode_pass, engine, workload.decode_prompt, batch, options.decode_steps)
        theirs = None if reference is None else functools.partial(reference.decode, workload.decode_prompt, batch, options.decode_steps)
        tasks.append((key, measure(key, ours, theirs)))
    return tasks + [("offline", offline)]


def side_by_side(ours: Pass, theirs: Callable[[], dict] | None, repeats: int) -> tuple[dict, dict | None]:
    """One warm-up pass of ours (it compiles), then `repeats` rounds of ours and theirs in turn, so that both
    see the same machine load. Each side reports its median run; ours adds compile_s, the warm-up's excess."""
    _, first_wall = ours()
    our_runs, their_runs = [], []
    for _ in range(repeats):
        our_runs.append(ours())
        if theirs is not None:
            their_runs.append(theirs())
    compile_s = max(first_wall - statistics.median(wall for _, wall in our_runs), 0.0)
    return {**_median_run([m for m, _ in our_runs]), "compile_s": compile_s}, (_median_run(their_runs) if their_runs else None)


def _median_run(runs: list[dict]) -> dict:
    """The run with the median tokens/s (the lower middle one for an even count), with every run's rate."""
    ordered = sorted(runs, key=lambda run: run["tokens_per_s"])
    return {**ordered[(len(ordered) - 1) // 2], "runs_tokens_per_s": [run["tokens_per_s"] for run in runs]}


def _greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def prefill_pass(engine: Engine, prompt: list[int]) -> tuple[dict, float]:
    request = engine.add_request(prompt, _greedy(1))
    start = time.perf_counter()
    events = engine.step()
    elapsed = time.perf_counter() - start
    if len(events) != 1 or not request.finished:
        raise RuntimeError(f"the {len(prompt)}-token prefill did not finish in one step (max_num_batched_tokens={engine.config.max_num_batched_tokens})")
    return {"tokens_per_s": len(prompt) / elapsed, "ms": elapsed * 1e3, "tokens": len(prompt)}, elapsed


def decode_pass(engine: Engine, prompt: list[int], batch: int, steps: int) -> tuple[dict, float]:
    """Prefills `batch` copies of `prompt` until each has its first token, then times `steps` decode
    steps (tokens per request; a fused decode run counts as its steps)."""
    pass_start = time.perf_counter()
    slack = _decode_slack(len(prompt), batch, engine.config.max_num_batched_tokens)
    requests = [engine.add_request(prompt, _greedy(steps + 1 + slack)) for _ in range(batch)]
    while not all(r.output_ids for r in requests):
        engine.step()
    start = time.perf_counter()
    generated, calls = 0, 0
    while generated < batch * steps:
        produced = len(engine.step())
        if produced == 0:
            raise RuntimeError(f"decode at batch {batch} stalled after {generated} of {batch * steps} tokens: is the KV pool too small?")
        generated, calls = generated + produced, calls + 1
    elapsed = time.perf_counter() - start
    for request in requests:
        if not request.finished:
            engine.abort(request.request_id)
    per_request = generated / batch
    metrics = {
        "tokens_per_s": generated / elapsed,
        "ms_per_step": elapsed / per_request * 1e3,
        "batch_size": batch,
        "steps": per_request,
        "engine_steps": calls,
        "prompt_tokens": len(prompt),
    }
    return metrics, time.perf_counter() - pass_start


def _offline_pass(engine: Engine, workload: Workload) -> tuple[dict, float]:
    start = time.perf_counter()
    requests = [engine.add_request(p, _greedy(n)) for p, n in zip(workload.prompts, workload.output_lens)]
    while engine.has_unfinished():
        engine.step()
    elapsed = time.perf_counter() - start
    input_tokens = sum(len(r.prompt_ids) for r in requests)
    output_tokens = sum(len(r.output_ids) for r in requests)
    ttft = [r.first_token_time - r.arrival_time for r in requests]
    tpot = [(r.finish_time - r.first_token_time) / (len(r.output_ids) - 1) for r in requests if len(r.output_ids) > 1]
    metrics = {
        "tokens_per_s": output_tokens / elapsed,
        "input_tokens_per_s": input_tokens / elapsed,
        "output_tokens_per_s": output_tokens / elapsed,
        "requests_per_s": len(requests) / elapsed,
        "elapsed_s": elapsed,
        "num_prompts": len(requests),
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "preemptions": sum(r.num_preemptions for r in requests),
        **_percentiles("ttft_ms", ttft),
        **_percentiles("tpot_ms", tpot),
    }
    return metrics, elapsed


def _percentiles(name: str, seconds: list[float]) -> dict:
    if not seconds:
        return {f"{name}_p{p}": float("nan") for p in PERCENTILES}
    return {f"{name}_p{p}": float(np.percentile(seconds, p)) * 1e3 for p in PERCENTILES}


def _measurement_keys(results: dict) -> list[str]:
    """The keys measured by both sides, in table order: prefill_N, then decode_bB by batch size."""
    prefill = [k for k in results if k.startswith("prefill_")]
    decode = sorted((k for k in results if k.startswith("decode_b")), key=lambda k: int(k.removeprefix("decode_b")))
    return prefill + decode


# transformers baseline ----------------------------------------------------------------------------------------


def _reference(options: BenchmarkOptions, model_path: str, workload: Workload, config: dict) -> TransformersReference | None:
    """The warmed-up transformers model, or None (the reason goes to `config["baseline"]`)."""
    reason = _reference_unavailable(model_path) if options.baseline else "--nobaseline"
    if reason is not None:
        config["baseline"] = f"not run: {reason}"
        logging.info("transformers baseline not run: %s", reason)
        return None
    reference = TransformersReference(model_path, options.dtype)
    config["baseline"] = reference.description
    reference.prefill(workload.prefill_prompt)
    reference.decode(workload.decode_prompt, 1, 2)
    return reference


def _reference_unavailable(model_path: str) -> str | None:
    """Why transformers cannot run this model, or None if it can."""
    try:
        importlib.import_module("torch")
        importlib.import_module("transformers")
    except ImportError as error:
        return f"{error.name} is not installed"
    path = pathlib.Path(model_path)
    if path.is_file() and path.suffix == ".gguf":
        return None
    if path.is_dir() and (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return None
    return f"{model_path!r} is neither a GGUF file nor a Hugging Face safetensors directory"


class TransformersReference:
    """The same weights in transformers (a GGUF file or a safetensors directory), torch on this process's cores."""

    def __init__(self, model_path: str, dtype: str):
        import torch
        import transformers

        torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
        threads = len(os.sched_getaffinity(0))
        torch.set_num_threads(threads)
        path = pathlib.Path(model_path)
        start = time.perf_counter()
        if path.is_file():
            model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch_dtype)
        else:
            model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
        self.model = model.eval()
        self.description = {
            "library": f"transformers {transformers.__version__}, torch {torch.__version__}",
            "dtype": dtype,
            "torch_threads": threads,
            "load_s": time.perf_counter() - start,
        }

    def prefill(self, prompt: list[int]) -> dict:
        """One forward over the prompt (logits of the last position only, as the engine computes)."""
        import torch

        with torch.inference_mode():
            start = time.perf_counter()
            self.model(torch.tensor([prompt]), use_cache=True, logits_to_keep=1)
            elapsed = time.perf_counter() - start
        return {"tokens_per_s": len(prompt) / elapsed, "ms": elapsed * 1e3, "tokens": len(prompt)}

    def decode(self, prompt: list[int], batch: int, steps: int) -> dict:
        """Prefill with the KV cache, then `steps` greedy single-token forwards, timed."""
        import torch

        with torch.inference_mode():
            output = self.model(torch.tensor([prompt] * batch), use_cache=True, logits_to_keep=1)
            token = output.logits[:, -1].argmax(-1, keepdim=True)
            start = time.perf_counter()
            for _ in range(steps):
                output = self.model(token, past_key_values=output.past_key_values, use_cache=True)
                token = output.logits[:, -1].argmax(-1, keepdim=True)
            elapsed = time.perf_counter() - start
        return {"tokens_per_s": batch * steps / elapsed, "ms_per_step": elapsed / steps * 1e3, "batch_size": batch, "steps": steps, "prompt_tokens": len(prompt)}


# Reporting ---------------------------------------------------------------------------------------------------


def format_table(results: dict) -> str:
    """One row per measurement: jinfer, transformers (where run), and their ratio."""
    baseline = results.get("baseline", {})
    rows = []
    for key in _measurement_keys(results):
        ours, theirs = results[key]["tokens_per_s"], baseline.get(key, {}).get("tokens_per_s")
        rows.append((_label(key) + " (tok/s)", f"{ours:.1f}", _number(theirs), "-" if theirs is None else f"{ours / theirs:.2f}x"))
    offline = results["offline"]
    for label, field, digits in (
        ("offline input (tok/s)", "input_tokens_per_s", 1),
        ("offline output (tok/s)", "output_tokens_per_s", 1),
        ("offline TTFT p50 (ms)", "ttft_ms_p50", 0),
        ("offline TTFT p99 (ms)", "ttft_ms_p99", 0),
        ("offline TPOT p50 (ms)", "tpot_ms_p50", 1),
        ("offline TPOT p99 (ms)", "tpot_ms_p99", 1),
    ):
        rows.append((label, f"{offline[field]:.{digits}f}", "-", "-"))
    rows.append(("compile, all shapes (s)", f"{results['compile_s']:.1f}", "-", "-"))
    if "warm_start" in results:
        rows.append(("warm start to first token (s)", f"{results['warm_start']['warm_s']:.2f}", "-", "-"))
        rows.append(("warm start to process exit (s)", f"{results['warm_start']['exit_s']:.2f}", "-", "-"))
    header = ("measurement", "jinfer", "transformers", "ratio")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))) for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _label(key: str) -> str:
    if key.startswith("prefill_"):
        return f"prefill {key.removeprefix('prefill_')} tokens"
    return f"decode batch {key.removeprefix('decode_b')}"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def write_json(results: dict, path: str | os.PathLike) -> None:
    pathlib.Path(path).write_text(json.dumps(results, indent=2) + "\n")
