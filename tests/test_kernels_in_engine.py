"""The Pallas kernels inside the engine: the batch carries what they need, and greedy outputs with
the kernels (interpret mode, on CPU) equal those of the XLA reference path, on a mixed workload
(prompts of several lengths, chunked prefill, decodes, prefill chunks sharing steps with decodes)
for a dense model with windows and soft-caps (Gemma 2) and a mixture-of-experts model (Mixtral)."""

import dataclasses

import numpy as np
import pytest

import jinfer
from hf_reference import save_tiny_model
from jinfer.config import EngineConfig
from jinfer.engine.batch import build_batch, padding_batch
from jinfer.engine.engine import Engine
from jinfer.engine.request import Request
from jinfer.engine.scheduler import Schedule, ScheduledRow
from jinfer.sampling import SamplingParams
from pallas_kernels.testing import assert_close

# Interpret mode compiles slowly, so the workload is shaped to need two buckets only: tokens 2 and
# rows 1, then tokens 2 and rows 2. Prompt A (3 tokens) is prefilled in chunks of 2; from the second
# step on, each step decodes A and runs one more token of prompt B (6 tokens, chunked prefill beside
# a decode); A generates 5 tokens more than B, so both finish on the same step.
TINY = EngineConfig(max_num_seqs=2, max_model_len=32, max_num_batched_tokens=2, page_size=8, kv_cache_memory="96KiB")
PROMPTS = ([11, 200, 37], [5, 81, 129, 64, 250, 3])
PARAMS = (SamplingParams(temperature=0.0, max_tokens=8), SamplingParams(temperature=0.0, max_tokens=3))


def test_batch_gives_each_row_its_cache_length_and_first_token():
    params = SamplingParams()
    decoding = Request("decode", list(range(10)), params, seed=0, arrival_order=0, pages=[3, 4], output_ids=[7])
    prefilling = Request("prefill", list(range(12)), params, seed=0, arrival_order=1, pages=[5, 6])
    starting = Request("start", [1, 2, 3], params, seed=0, arrival_order=2, pages=[7])
    rows = [ScheduledRow(decoding, 10, 1), ScheduledRow(prefilling, 4, 5), ScheduledRow(starting, 0, 1)]
    config = EngineConfig(max_num_seqs=4, max_model_len=32, max_num_batched_tokens=8, page_size=8, kernels="interpret")
    batch = build_batch(Schedule(rows, preempted=[]), config)  # 7 tokens in a bucket of 8, 3 rows in a bucket of 4
    np.testing.assert_array_equal(batch.kv_lens, [11, 9, 1, 0])
    np.testing.assert_array_equal(batch.query_start, [0, 1, 6, 7, 7])
    assert batch.kernels == "interpret"
    padding = padding_batch(config, 8, 4, 4)
    np.testing.assert_array_equal(padding.kv_lens, [0, 0, 0, 0])
    np.testing.assert_array_equal(padding.query_start, [0, 0, 0, 0, 0])
    assert padding.kernels == "interpret"


def _run(model, kernels: str) -> tuple[list[list[int]], np.ndarray, set]:
    """The workload on a pool filled with NaN -> (greedy tokens of each prompt, [steps' rows, V] logits
    of every step's rows, bucket shapes run)."""
    engine = Engine(model, dataclasses.replace(TINY, kernels=kernels), measure_step_memory=False, cache_fill=float("nan"))
    requests = [engine.add_request(prompt, params) for prompt, params in zip(PROMPTS, PARAMS)]
    logits = []
    while engine.has_unfinished():
        engine.step()
        logits.append(np.asarray(engine.last_output.logits))
    return [r.output_ids for r in requests], np.concatenate(logits), engine.bucket_shapes_used


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("gemma2", {"num_hidden_layers": 1}),  # a windowed layer with soft-capped logits
        ("mixtral", {"num_hidden_layers": 1, "sliding_window": None}),  # MoE, global attention
    ],
)
def test_interpreted_kernels_give_the_reference_tokens(tmp_path, name, overrides):
    save_tiny_model(name, tmp_path, overrides=overrides)
    model = jinfer.load(tmp_path)
    reference_tokens, reference_logits, reference_shapes = _run(model, "reference")
    tokens, logits, shapes = _run(model, "interpret")
    assert [len(t) for t in tokens] == [params.max_tokens for params in PARAMS]
    assert tokens == reference_tokens
    assert_close(logits, reference_logits)
    assert shapes == reference_shapes
    assert (2, 2, 4, 0) in shapes, "no step ran a decode beside a prefill chunk"
