"""`jinfer bench --speculative=METHOD`: speculative against plain decoding, same model, same process.

Protocol (greedy, EOS ignored): at each batch size B, B requests of `decode_steps` tokens; the
prompts are, for n-gram lookup, a prose passage (`PASSAGES`, in turn) followed by a request to repeat
it (a summarisation-style prompt: the answer copies the prompt), and for the model drafters and the
draft heads the decode benchmark's chat prompt. (Windows of the benchmark's docstring corpus were tried first:
SmolLM2 answers them with code, not a copy, and n-gram acceptance fell from 0.74 to 0.40.) A pass prefills until every request has its first
token, then times the steps until all finish: decode tokens/s = tokens generated in those steps /
their time. One warm-up pass (it compiles), then `repeats` passes of plain and speculative decoding
in turn; medians. Acceptance = drafts kept / drafts proposed and tokens per pass = 1 + drafts kept
per row-pass with drafts, over the timed passes. The speculative tokens are checked equal to the
plain ones.
"""

from __future__ import annotations

import dataclasses
import statistics
import time

from jinfer.bench import DECODE_MESSAGE, BenchmarkOptions
from jinfer.config import EngineConfig
from jinfer.defaults import default_model_path
from jinfer.engine.engine import Engine
from jinfer.engine.speculation import SpeculationStats
from jinfer.model import Model, load
from jinfer.sampling import SamplingParams
from jinfer.speculative import SpeculativeConfig

REPEAT_REQUEST = "Repeat the passage above word for word."
PASSAGES = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk. He trimmed the wick, polished the great "
    "lens and wound the clockwork that turned the light. Ships far out at sea saw the beam sweep across the water and "
    "knew where the rocks were. In winter the storms came from the north, and the keeper stayed awake through the "
    "night to keep the lamp burning.",
    "The village market opens before sunrise on Saturdays. Farmers arrive with carts of apples, cheese and bread, and "
    "the baker sets out loaves that are still warm. By eight o'clock the square is full of people who come as much "
    "to talk with their neighbours as to shop, and the musicians by the fountain play until the stalls close at noon.",
    "A river begins as rain that falls on the mountains. The water gathers into small streams that join as they run "
    "downhill, cutting valleys through the rock over thousands of years. Near the sea the river slows down, drops the "
    "sand and mud it has carried, and spreads into a wide delta where birds and fish find food and shelter.",
    "The old library kept its rarest books in a room without windows. The air was kept cool and dry, and visitors had "
    "to wear cotton gloves before they could turn a page. Each book had a card that recorded who had read it and when, "
    "so that the librarians could tell which volumes were asked for most and which had not been opened in a century.",
)


def prompts_for(method: str, model: Model, batch: int) -> list[list[int]]:
    """`batch` prompts: passages to repeat (n-gram) or the decode benchmark's chat message."""
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise ValueError("the speculative benchmark needs a model with a tokenizer")
    if method != "ngram":
        messages = [[{"role": "user", "content": DECODE_MESSAGE}]] * batch
    else:
        passages = [PASSAGES[i % len(PASSAGES)] for i in range(batch)]
        messages = [[{"role": "user", "content": f"{passage}\n\n{REPEAT_REQUEST}"}] for passage in passages]
    return [tokenizer.encode(tokenizer.apply_chat_template(m), add_special_tokens=False) for m in messages]


def _pass(engine: Engine, prompts: list[list[int]], steps: int) -> tuple[float, list[list[int]]]:
    """Decode tokens/s of one pass, and the tokens generated."""
    params = SamplingParams(temperature=0.0, max_tokens=steps, ignore_eos=True)
    requests = [engine.add_request(p, params) for p in prompts]
    while not all(r.output_ids for r in requests):
        engine.step()
    before = sum(len(r.output_ids) for r in requests)
    start = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
    elapsed = time.perf_counter() - start
    return (sum(len(r.output_ids) for r in requests) - before) / elapsed, [r.output_ids for r in requests]


def run_speculative_benchmark(
    options: BenchmarkOptions, method: str, num_tokens: int, draft_model: str | None = None, draft_heads: str | None = None
) -> dict:
    model_path = str(options.model if options.model is not None else default_model_path())
    model = load(model_path, dtype=options.dtype)
    draft = load(draft_model, dtype=options.dtype) if draft_model else None
    spec = SpeculativeConfig(method=method, num_tokens=num_tokens, draft_model=draft_model, draft_heads=draft_heads)
    prompts = {batch: prompts_for(method, model, batch) for batch in options.batch_sizes}
    longest = max(len(p) for group in prompts.values() for p in group) + options.decode_steps + 1
    config = EngineConfig(
        max_num_seqs=max(options.batch_sizes),
        max_model_len=-(-longest // options.page_size) * options.page_size,
        max_num_batched_tokens=max(512, max(options.batch_sizes)),
        page_size=options.page_size,
        kv_cache_memory=options.kv_cache_memory,
        fused_decode_steps=options.fused_decode_steps,  # plain decoding as served; speculation runs single passes
    )
    plain = Engine(model, config, measure_step_memory=False)
    speculative = Engine(model, config, measure_step_memory=False, speculative=spec, draft_model=draft)
    results = {"model": model_path, "method": method, "num_tokens": num_tokens, "speculative_config": dataclasses.asdict(spec), "rows": []}
    for batch in options.batch_sizes:
        _pass(plain, prompts[batch], options.decode_steps)
        _pass(speculative, prompts[batch], options.decode_steps)
        speculative.speculator.stats = SpeculationStats()
        plain_runs, spec_runs, identical = [], [], True
        for _ in range(options.repeats):
            rate, expected = _pass(plain, prompts[batch], options.decode_steps)
            plain_runs.append(rate)
            rate, outputs = _pass(speculative, prompts[batch], options.decode_steps)
            spec_runs.append(rate)
            identical &= outputs == expected
        stats = speculative.speculator.stats
        results["rows"].append({
            "batch_size": batch,
            "prompt_tokens": len(prompts[batch][0]),
            "plain_tokens_per_s": statistics.median(plain_runs),
            "speculative_tokens_per_s": statistics.median(spec_runs),
            "plain_runs": plain_runs,
            "speculative_runs": spec_runs,
            "acceptance_rate": stats.acceptance_rate,
            "tokens_per_pass": stats.tokens_per_pass,
            "identical_to_plain": identical,
        })
    return results


def format_speculative_table(results: dict) -> str:
    header = ("batch", "plain tok/s", f"{results['method']} k={results['num_tokens']} tok/s", "speedup", "acceptance", "tokens/pass", "same tokens")
    rows = [
        (
            str(row["batch_size"]),
            f"{row['plain_tokens_per_s']:.1f}",
            f"{row['speculative_tokens_per_s']:.1f}",
            f"{row['speculative_tokens_per_s'] / row['plain_tokens_per_s']:.2f}x",
            f"{row['acceptance_rate']:.2f}",
            f"{row['tokens_per_pass']:.2f}",
            "yes" if row["identical_to_plain"] else "NO",
        )
        for row in results["rows"]
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
