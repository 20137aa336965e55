"""Sampling: validation, per-row keys, greedy rows, filtered distributions, penalties, logprobs, no recompiles.

Expected values come from direct numpy computations; distributions are checked with a chi-square statistic
over many rows with the same logits, each row drawing with its own key.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jinfer import sampling
from jinfer.sampling import SamplingBatch, SamplingParams, apply_penalties, sample, step_keys, token_counts

sample_jit = jax.jit(sample, static_argnums=2)


def make_batch(params, steps=None, seed=7, pad_to=None):
    steps = range(len(params)) if steps is None else steps
    return SamplingBatch.from_params(params, [(seed, s) for s in steps], pad_to or len(params))


def draw(logits, params, pad_to=None, **kwargs):
    """Tokens for `params`, one row each; `logits` is [V] (shared by every row) or [len(params), V]."""
    pad_to = pad_to or len(params)
    rows = np.zeros((pad_to, np.shape(logits)[-1]), np.float32)
    rows[: len(params)] = logits
    batch = make_batch(params, pad_to=pad_to, **kwargs)
    return np.asarray(sample_jit(jnp.asarray(rows), batch, 0).tokens)[: len(params)]


def softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def log_softmax(x):
    x = np.asarray(x, np.float64)
    return x - x.max(axis=-1, keepdims=True) - np.log(np.exp(x - x.max(axis=-1, keepdims=True)).sum(-1, keepdims=True))


def reference_distribution(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    """The filtered distribution, in float64, step by step on a sorted copy."""
    probs = softmax(np.asarray(logits, np.float64) / temperature)
    order = np.argsort(-probs, kind="stable")
    keep = np.ones(len(probs), bool)
    if top_k:
        keep[order[top_k:]] = False
    renormed = probs * keep / (probs * keep).sum()
    mass_above = np.cumsum(renormed[order]) - renormed[order]
    keep[order[mass_above >= top_p]] = False
    renormed = probs * keep / (probs * keep).sum()
    keep &= renormed >= min_p * renormed.max()
    return probs * keep / (probs * keep).sum()


def chi_square(tokens, expected):
    """Pearson statistic over the tokens `expected` gives mass; tokens it rules out must never appear."""
    counts = np.bincount(tokens, minlength=len(expected))
    assert counts[expected == 0].sum() == 0, f"drew excluded tokens {np.flatnonzero((expected == 0) & (counts > 0))}"
    live = expected > 0
    predicted = len(tokens) * expected[live]
    return float(np.sum((counts[live] - predicted) ** 2 / predicted))


def chi_square_limit(categories: int) -> float:
    """A fixed bar about six standard deviations above the mean of a chi-square with categories - 1 dof."""
    dof = categories - 1
    return dof + 6 * np.sqrt(2 * dof)


# ---------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", -0.1),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", -1),
        ("min_p", 1.5),
        ("max_tokens", 0),
        ("n", 0),
        ("logprobs", 21),
        ("repetition_penalty", 0.0),
        ("presence_penalty", 2.5),
        ("frequency_penalty", -3.0),
        ("seed", -1),
        ("stop_token_ids", (3, -2)),
        ("stop", ("",)),
    ],
)
def test_bad_value_names_field_and_value(field, value):
    with pytest.raises(ValueError) as error:
        SamplingParams(**{field: value})
    assert field in str(error.value) and repr(value) in str(error.value)


def test_lists_become_tuples():
    params = SamplingParams(stop_token_ids=[1, 2], stop=["\n\n"], logprobs=20)
    assert params.stop_token_ids == (1, 2) and params.stop == ("\n\n",)
    assert hash(params) == hash(SamplingParams(stop_token_ids=(1, 2), stop=("\n\n",), logprobs=20))


def test_sample_rejects_too_many_logprobs():
    with pytest.raises(ValueError, match="num_top_logprobs.*21"):
        sample(jnp.zeros((1, 30)), make_batch([SamplingParams()]), 21)


# ------------------------------------------------------------------------------------------------ keys


@pytest.mark.parametrize(
    ("seed", "step"), [(0, 0), (1, 5), (2**31 - 1, 123456), (2**32 - 1, 2**32 - 1), (2**40 + 3, 9)]
)
def test_step_keys_are_jax_fold_in(seed, step):
    key = jax.random.wrap_key_data(jnp.array([seed >> 32, seed & 0xFFFFFFFF], jnp.uint32))
    expected = jax.random.key_data(jax.random.fold_in(key, step))
    np.testing.assert_array_equal(step_keys([seed], [step])[0], expected)
    if seed < 2**32:
        np.testing.assert_array_equal(expected, jax.random.key_data(jax.random.fold_in(jax.random.PRNGKey(seed), step)))


def test_padding_rows_are_greedy_without_penalties():
    batch = make_batch([SamplingParams(temperature=0.5, top_k=3, repetition_penalty=1.3)], pad_to=4)
    np.testing.assert_allclose(batch.temperature, [0.5, 0, 0, 0])
    np.testing.assert_allclose(batch.repetition_penalty, [1.3, 1, 1, 1], rtol=1e-6)
    np.testing.assert_array_equal(batch.top_k, [3, 0, 0, 0])
    np.testing.assert_array_equal(batch.top_p, [1, 1, 1, 1])
    assert batch.keys.shape == (4, 2) and batch.keys.dtype == np.uint32


# ---------------------------------------------------------------------------------------------- greedy
# Most tests below run at [8, VOCAB] or [256, VOCAB] logits so they share two compiled programs.
VOCAB = 1000


def test_greedy_rows_are_argmax_even_beside_sampled_rows():
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((8, VOCAB)).astype(np.float32)
    logits[0, [17, 400]] = 9.0  # a tie: the lower id wins
    greedy = SamplingParams(temperature=0, top_k=5, top_p=0.5, min_p=0.9)
    expected = np.argmax(logits, axis=-1)
    assert expected[0] == 17
    np.testing.assert_array_equal(draw(logits, [greedy] * 8), expected)

    mixed = [greedy, SamplingParams(temperature=2.0)] * 3
    tokens = draw(logits[:6], mixed, pad_to=8)
    np.testing.assert_array_equal(tokens[::2], expected[:6:2])
    assert np.any(tokens[1::2] != expected[1:6:2])  # the hot rows really sample


# ------------------------------------------------------------------------------------------- per-row keys


def test_same_seed_and_step_same_token_whatever_else_is_in_the_batch():
    rng = np.random.default_rng(2)
    logits = rng.standard_normal(VOCAB).astype(np.float32)
    target = SamplingParams(temperature=1.3, top_k=100)
    alone = draw(logits, [target], steps=[11], seed=42, pad_to=8)[0]

    others = [SamplingParams(temperature=t, top_p=p) for t, p in [(0.0, 1.0), (0.7, 0.5), (1.0, 1.0), (2.0, 0.9)]]
    for position, size, pad_to in [(0, 3, 8), (4, 5, 8), (2, 8, 8), (77, 100, 256)]:
        params = [others[i % len(others)] for i in range(size)]
        params[position] = target
        seeds_and_steps = [(1000 + i, i) for i in range(size)]
        seeds_and_steps[position] = (42, 11)
        batch = SamplingBatch.from_params(params, seeds_and_steps, pad_to)
        rows = np.broadcast_to(logits, (pad_to, VOCAB))
        assert int(sample_jit(jnp.asarray(rows), batch, 0).tokens[position]) == alone


def test_different_seeds_give_different_draws():
    logits = np.zeros(VOCAB, np.float32)
    params = [SamplingParams()] * 256
    first, again = draw(logits, params, seed=1), draw(logits, params, seed=1)
    second = draw(logits, params, seed=2)
    np.testing.assert_array_equal(first, again)
    assert np.mean(first != second) > 0.95
    assert len(np.unique(first)) > 200  # the steps of one seed differ too


# ----------------------------------------------------------------------------------------- distributions

LOGITS = np.array([1.2, 0.9, 0.6, 0.4, 0.1, -0.3, -0.8, -1.5], np.float32)
DRAWS = 10000
CASES = {
    "temperature 0.5": dict(temperature=0.5),
    "temperature 2": dict(temperature=2.0),
    "top_k 3": dict(top_k=3),
    "top_p 0.7": dict(top_p=0.7),
    "min_p 0.3": dict(min_p=0.3),
    "combined": dict(temperature=0.8, top_k=6, top_p=0.9, min_p=0.3),
}


@pytest.fixture(scope="module")
def small_vocab_draws():
    """DRAWS rows per case, all cases in one batch so every row runs with its own parameters."""
    params = [SamplingParams(**kwargs) for kwargs in CASES.values() for _ in range(DRAWS)]
    tokens = draw(LOGITS, params)
    return dict(zip(CASES, tokens.reshape(len(CASES), DRAWS)))


@pytest.mark.parametrize("case", CASES)
def test_small_vocab_distribution(small_vocab_draws, case):
    tokens = small_vocab_draws[case]
    expected = reference_distribution(LOGITS, **CASES[case])
    assert chi_square(tokens, expected) < chi_square_limit(np.count_nonzero(expected))

    # The same statistic rejects the plain softmax: the check has the power to see a wrong distribution.
    plain = reference_distribution(LOGITS)
    counts = np.bincount(tokens, minlength=len(LOGITS))
    assert np.sum((counts - DRAWS * plain) ** 2 / (DRAWS * plain)) > 10 * chi_square_limit(len(LOGITS))


CHUNKED_CASES = [dict(), dict(top_k=4, temperature=0.7), dict(top_p=0.8, min_p=0.2)]


def test_filters_across_vocabulary_chunks():
    """Eight live tokens spread over the draw chunks of a vocabulary larger than the candidate set."""
    vocab, draws = 2 * sampling.CHUNK + 100, 8000
    live = np.array([3, 511, 512, 700, 900, 1000, 1030, vocab - 1])
    logits = np.full(vocab, -1e4, np.float32)
    logits[live] = LOGITS[[4, 0, 6, 2, 5, 1, 7, 3]]
    params = [SamplingParams(**kwargs) for kwargs in CHUNKED_CASES for _ in range(draws)]
    tokens = draw(logits, params).reshape(len(CHUNKED_CASES), draws)
    for kwargs, case_tokens in zip(CHUNKED_CASES, tokens):
        expected = reference_distribution(logits, **kwargs)
        assert chi_square(case_tokens, expected) < chi_square_limit(np.count_nonzero(expected)), kwargs


DEEP_CASES = {
    "top_k 300": dict(top_k=300),
    "top_p 0.4": dict(top_p=0.4),
    "both": dict(top_k=700, top_p=0.5, temperature=0.9),
}
DEEP_LOGITS = (-np.arange(1024) / 1000).astype(np.float32)
DEEP_DRAWS = 6000


@pytest.fixture(scope="module")
def deep_draws():
    params = [SamplingParams(**kwargs) for kwargs in DEEP_CASES.values() for _ in range(DEEP_DRAWS)]
    return dict(zip(DEEP_CASES, draw(DEEP_LOGITS, params).reshape(len(DEEP_CASES), DEEP_DRAWS)))


@pytest.mark.parametrize("case", DEEP_CASES)
def test_deep_cutoffs_are_exact(deep_draws, case):
    """Cut-offs beyond the candidate set: no token past the boundary, the last one inside is drawn."""
    expected = reference_distribution(DEEP_LOGITS, **DEEP_CASES[case])
    boundary = np.count_nonzero(expected)
    assert boundary > sampling.CANDIDATES
    tokens = deep_draws[case]
    assert tokens.max() == boundary - 1
    bins = np.arange(len(DEEP_LOGITS)) * 16 // boundary  # 16 bins of neighbouring tokens over the kept range
    binned = np.bincount(bins[expected > 0], weights=expected[expected > 0])
    assert chi_square(bins[tokens], binned) < chi_square_limit(16)


def test_candidate_path_and_full_search_agree(monkeypatch):
    """The same draws when every cut-off is found by the vocabulary-wide search instead of the candidates."""
    rng = np.random.default_rng(3)
    logits = jnp.asarray(rng.standard_normal((256, VOCAB)).astype(np.float32) * 2)
    params = [
        SamplingParams(temperature=0.5 + i % 5 / 2, top_k=int(rng.integers(0, 200)), top_p=float(rng.uniform(0.05, 1)))
        for i in range(256)
    ]
    batch = make_batch(params)
    fast = sample_jit(logits, batch, 0).tokens
    monkeypatch.setattr(sampling, "CANDIDATES", 2)
    np.testing.assert_array_equal(jax.jit(lambda x, b: sample(x, b, 0))(logits, batch).tokens, fast)


# ---------------------------------------------------------------------------------------------- penalties


def test_penalties_follow_the_formulas():
    rng = np.random.default_rng(4)
    rows, vocab = 4, 50
    logits = rng.standard_normal((rows, vocab)).astype(np.float32) * 3
    prompt_mask = rng.random((rows, vocab)) < 0.2
    output_counts = rng.integers(0, 4, (rows, vocab)) * (rng.random((rows, vocab)) < 0.3)
    params = [
        SamplingParams(repetition_penalty=1.5),
        SamplingParams(repetition_penalty=0.8, presence_penalty=0.5),
        SamplingParams(frequency_penalty=0.7, presence_penalty=-1.0),
        SamplingParams(repetition_penalty=1.2, presence_penalty=1.5, frequency_penalty=-0.4),
    ]
    counts = jnp.asarray(output_counts, jnp.int32)
    got = apply_penalties(jnp.asarray(logits), make_batch(params), jnp.asarray(prompt_mask), counts)

    expected = logits.astype(np.float64)
    for b, p in enumerate(params):
        for v in range(vocab):
            if prompt_mask[b, v] or output_counts[b, v] > 0:
                r = p.repetition_penalty
                expected[b, v] = expected[b, v] / r if expected[b, v] > 0 else expected[b, v] * r
            expected[b, v] -= p.frequency_penalty * output_counts[b, v] + p.presence_penalty * (output_counts[b, v] > 0)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


def test_token_counts_ignore_padding():
    rng = np.random.default_rng(5)
    ids = rng.integers(0, 20, (3, 12)).astype(np.int32)
    lengths = np.array([12, 5, 0], np.int32)
    got = np.asarray(token_counts(jnp.asarray(ids), jnp.asarray(lengths), 20))
    for b in range(3):
        np.testing.assert_array_equal(got[b], np.bincount(ids[b, : lengths[b]], minlength=20))


# ---------------------------------------------------------------------------------------------- logprobs


@pytest.mark.parametrize("count", [0, 5])
def test_logprobs_are_log_softmax_of_the_given_logits(count):
    rng = np.random.default_rng(6)
    logits = rng.standard_normal((8, VOCAB)).astype(np.float32) * 4
    params = [SamplingParams(temperature=t, top_k=k, logprobs=count) for t, k in [(0, 0), (0.5, 10), (1, 0), (2, 3), (1.5, 0)] * 2][:8]
    result = sample_jit(jnp.asarray(logits), make_batch(params), count)
    reference = log_softmax(logits)
    tokens = np.asarray(result.tokens)
    np.testing.assert_allclose(result.logprob, reference[np.arange(8), tokens], rtol=1e-5, atol=1e-5)
    order = np.argsort(-logits, axis=-1, kind="stable")[:, :count]
    assert result.top_ids.shape == result.top_logprobs.shape == (8, count)
    np.testing.assert_array_equal(result.top_ids, order)
    np.testing.assert_allclose(result.top_logprobs, np.take_along_axis(reference, order, -1), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------- compilation


def test_new_parameter_mixes_do_not_recompile():
    rng = np.random.default_rng(7)
    traces = []

    def step(logits, batch):
        traces.append(None)
        return sample(logits, batch, 3)

    step = jax.jit(step)
    logits = jnp.asarray(rng.standard_normal((8, VOCAB)).astype(np.float32))
    mixes = [
        [SamplingParams(temperature=0)] * 3,
        [SamplingParams()] * 8,
        [SamplingParams(top_k=40, top_p=0.9, min_p=0.05, seed=3)] * 5 + [SamplingParams(temperature=0)],
        [SamplingParams(top_p=0.99), SamplingParams(top_k=900, temperature=0.3), SamplingParams(min_p=0.5)],
    ]
    for i, params in enumerate(mixes):
        jax.block_until_ready(step(logits, make_batch(params, seed=i, pad_to=8)))
    assert len(traces) == 1
    assert step._cache_size() == 1
