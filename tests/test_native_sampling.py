"""jinfer's native CPU logit statistics (jinfer/native/sampling.cc) against the jnp formulas of
`jinfer.sampling.sample`: the same greedy tokens (first index on ties, the last on NaN rows) and
logprobs within float32 tolerance, whatever the vocabulary size."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jinfer import native
from jinfer.ops import backend
from jinfer.sampling import SamplingBatch, SamplingParams, sample
from pallas_kernels.testing import assert_close, random_normal

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="CPU kernels")


def logits_with_ties_and_nan(vocab: int) -> np.ndarray:
    """[5, vocab]: a tie for the maximum (the first must win), a maximum in the last column, a NaN row, -inf entries."""
    x = random_normal(0, (5, vocab), scale=4.0)
    x[0, [3, vocab - 2]] = x[0].max() + 1.0
    x[1, vocab - 1] = x[1].max() + 0.5
    x[2, 1] = np.nan
    x[3, ::3] = -np.inf
    return x


@pytest.mark.parametrize("vocab", [16, 37, 49152])
def test_logit_stats_match_numpy(vocab):
    x = logits_with_ties_and_nan(vocab)
    best, index, normalizer = (np.asarray(a) for a in native.logit_stats(jnp.asarray(x)))
    finite = [0, 1, 3, 4]
    expected_best = x[finite].max(axis=1)
    np.testing.assert_array_equal(best[finite], expected_best)
    np.testing.assert_array_equal(index[finite], [int(np.flatnonzero(row == row.max())[0]) for row in x[finite]])
    expected_normalizer = expected_best + np.log(np.exp(x[finite].astype(np.float64) - expected_best[:, None]).sum(axis=1))
    assert_close(normalizer[finite], expected_normalizer)
    assert np.isnan(best[2]) and np.isnan(normalizer[2]) and index[2] == vocab - 1


@pytest.mark.parametrize("vocab", [37, 49152])
def test_sample_gives_the_same_tokens_and_logprobs_in_both_modes(vocab):
    logits = jnp.asarray(logits_with_ties_and_nan(vocab))
    params = [SamplingParams(temperature=0.0, logprobs=2), SamplingParams(temperature=0.0), SamplingParams(temperature=0.0),
              SamplingParams(temperature=0.8, seed=3), SamplingParams(temperature=0.0, logprobs=1)]
    batch = SamplingBatch.from_params(params, [(i, 0) for i in range(len(params))], len(params))
    results = {}
    for mode in ("native", "reference"):
        with backend.kernel_scope(mode):  # the mode is read while tracing: a function of its own per mode
            program = jax.jit(lambda logits, batch: sample(logits, batch, 2))
            assert ("jinfer_logit_stats" in program.lower(logits, batch).as_text()) == (mode == "native")
            results[mode] = program(logits, batch)
    native_result, reference_result = results["native"], results["reference"]
    rows = [0, 1, 3, 4]  # row 2 holds a NaN (XLA's max over a long row does not always propagate it)
    np.testing.assert_array_equal(np.asarray(native_result.tokens)[rows], np.asarray(reference_result.tokens)[rows])
    assert native_result.tokens[2] == vocab - 1
    assert_close(np.asarray(native_result.logprob)[rows], np.asarray(reference_result.logprob)[rows])
    assert_close(np.asarray(native_result.top_logprobs)[rows], np.asarray(reference_result.top_logprobs)[rows])
