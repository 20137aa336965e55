"""Speculative decoding's pieces: n-gram proposals, greedy verification (exactly plain greedy) and the
rejection rule, which must leave the target's distribution unchanged (chi-square over 10^5 draws)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy.special import gammaincc

from jinfer.speculative import SpeculativeConfig, accept_greedy, accept_sampled, propose_ngram

VOCAB = 6
DRAWS = 100_000
P_VALUE_FLOOR = 1e-4  # a correct rule fails this one time in 10^4; the seeds are fixed


# ----------------------------------------------------------------------------------------- proposals


@pytest.mark.parametrize(
    "ids, k, expected",
    [
        ([1, 2, 3, 4, 1, 2], 3, [3, 4, 1]),  # suffix [1, 2] occurred at 0
        ([5, 1, 2, 9, 7, 1, 2, 8, 1, 2], 2, [8, 1]),  # the latest earlier occurrence wins
        ([1, 2, 3, 9, 2, 3, 7, 1, 2, 3], 1, [9]),  # the 3-gram [1, 2, 3] beats the later 2-gram [2, 3]
        ([4, 5, 6, 7], 3, []),  # nothing recurs
        ([3, 3], 4, [3, 3, 3, 3]),  # the continuation runs into the suffix and copies its own proposal
        ([4, 5, 6, 4, 5], 5, [6, 4, 5, 6, 4]),  # a repeating pattern proposes all k
        ([7], 2, []),
    ],
)
def test_ngram_proposals(ids, k, expected):
    assert propose_ngram(ids, k) == expected


def test_ngram_sizes_are_bounded():
    ids = [1, 2, 3, 8, 9, 3]
    assert propose_ngram(ids, 2, max_ngram=3, min_ngram=1) == [8, 9]
    assert propose_ngram(ids, 2, max_ngram=3, min_ngram=2) == []


@pytest.mark.parametrize(
    "options, message",
    [
        ({"method": "medusa"}, "medusa"),
        ({"num_tokens": 0}, "num_tokens=0"),
        ({"method": "draft"}, "draft_model=None"),
        ({"method": "ngram", "draft_model": "small.gguf"}, "small.gguf"),
        ({"min_ngram": 3, "max_ngram": 2}, "min_ngram=3"),
    ],
)
def test_bad_configs_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        SpeculativeConfig(**options)


# ------------------------------------------------------------------------------------------ greedy


def test_greedy_keeps_the_drafts_the_target_agrees_with_then_its_own_token():
    logits = np.full((3, 4, 10), -1.0, np.float32)
    target = np.array([[5, 6, 7, 8], [5, 6, 7, 8], [1, 2, 3, 4]])
    np.put_along_axis(logits, target[..., None], 1.0, axis=-1)
    drafts = np.array([[5, 6, 0], [5, 6, 7], [1, 2, 3]], np.int32)
    accepted, tokens = accept_greedy(jnp.asarray(logits), jnp.asarray(drafts), jnp.asarray([3, 3, 1]))
    np.testing.assert_array_equal(accepted, [2, 3, 1])  # a mismatch, all three, and only one draft proposed
    np.testing.assert_array_equal(tokens, target)


# -------------------------------------------------------------------------------- distribution tests


def _distributions(seed):
    """A two-token target p (first token, second given first, bonus given both) and a different drafter q."""
    rng = np.random.default_rng(seed)

    def softmax(x):
        e = np.exp(x - x.max(-1, keepdims=True))
        return (e / e.sum(-1, keepdims=True)).astype(np.float32)

    p0, p1, p2 = softmax(rng.normal(size=VOCAB)), softmax(rng.normal(size=(VOCAB, VOCAB))), softmax(rng.normal(size=(VOCAB, VOCAB, VOCAB)))
    q0, q1 = softmax(rng.normal(size=VOCAB) * 2), softmax(rng.normal(size=(VOCAB, VOCAB)) * 2)
    return p0, p1, p2, q0, q1


def _speculate(drafts, draft_probs, p0, p1, p2, key):
    """Verifies k=2 drafts per row; rows that accepted nothing get their second token by plain sampling."""
    x0, x1 = drafts[:, 0], drafts[:, 1]
    target_probs = jnp.stack([jnp.broadcast_to(p0, (DRAWS, VOCAB)), p1[x0], p2[x0, x1]], axis=1)
    verify_key, next_key = jax.random.split(key)
    accepted, tokens = accept_sampled(target_probs, draft_probs, drafts, jnp.full((DRAWS,), 2, jnp.int32), verify_key)
    plain_second = jax.random.categorical(next_key, jnp.log(p1[tokens[:, 0]]), axis=-1)
    return tokens[:, 0], jnp.where(accepted >= 1, tokens[:, 1], plain_second)


def _p_value(counts, probs):
    expected = probs * counts.sum()
    chi2 = float(np.sum((counts - expected) ** 2 / expected))
    return float(gammaincc((counts.size - 1) / 2, chi2 / 2))


def _joint_p_values(first, second, p0, p1):
    first, second = np.asarray(first), np.asarray(second)
    first_counts = np.bincount(first, minlength=VOCAB)
    joint_counts = np.bincount(first * VOCAB + second, minlength=VOCAB * VOCAB)
    return _p_value(first_counts, p0), _p_value(joint_counts, (p0[:, None] * p1).ravel())


def _model_drafts(q0, q1, key):
    k0, k1 = jax.random.split(key)
    x0 = jax.random.categorical(k0, jnp.log(q0), shape=(DRAWS,))
    x1 = jax.random.categorical(k1, jnp.log(q1[x0]), axis=-1)
    return jnp.stack([x0, x1], axis=1).astype(jnp.int32), jnp.stack([jnp.broadcast_to(q0, (DRAWS, VOCAB)), q1[x0]], axis=1)


def test_sampled_verification_keeps_the_target_distribution_for_a_model_drafter():
    p0, p1, p2, q0, q1 = map(jnp.asarray, _distributions(0))
    drafts, draft_probs = _model_drafts(q0, q1, jax.random.PRNGKey(1))
    first, second = _speculate(drafts, draft_probs, p0, p1, p2, jax.random.PRNGKey(2))
    assert min(_joint_p_values(first, second, np.asarray(p0), np.asarray(p1))) > P_VALUE_FLOOR


def test_sampled_verification_keeps_the_target_distribution_for_a_deterministic_drafter():
    p0, p1, p2, _, _ = map(jnp.asarray, _distributions(3))
    drafts = jnp.tile(jnp.asarray([[2, 4]], jnp.int32), (DRAWS, 1))  # what an n-gram lookup would propose
    first, second = _speculate(drafts, jax.nn.one_hot(drafts, VOCAB), p0, p1, p2, jax.random.PRNGKey(4))
    assert min(_joint_p_values(first, second, np.asarray(p0), np.asarray(p1))) > P_VALUE_FLOOR


def test_the_statistical_test_catches_a_wrong_acceptance_rule():
    """Accepting with the ratio against the wrong q (uniform instead of the drafter's) skews the output."""
    p0, p1, p2, q0, q1 = map(jnp.asarray, _distributions(0))
    drafts, _ = _model_drafts(q0, q1, jax.random.PRNGKey(1))
    wrong = jnp.full((DRAWS, 2, VOCAB), 1.0 / VOCAB)
    first, second = _speculate(drafts, wrong, p0, p1, p2, jax.random.PRNGKey(2))
    assert min(_joint_p_values(first, second, np.asarray(p0), np.asarray(p1))) < P_VALUE_FLOOR
    unverified = _joint_p_values(drafts[:, 0], drafts[:, 1], np.asarray(p0), np.asarray(p1))
    assert min(unverified) < P_VALUE_FLOOR  # the drafts alone are far from the target


def test_rows_without_drafts_sample_one_ordinary_token():
    p0, p1, p2, _, _ = map(jnp.asarray, _distributions(5))
    drafts = jnp.zeros((DRAWS, 2), jnp.int32)
    target_probs = jnp.stack([jnp.broadcast_to(p0, (DRAWS, VOCAB))] * 3, axis=1)
    accepted, tokens = accept_sampled(target_probs, jax.nn.one_hot(drafts, VOCAB), drafts, jnp.zeros((DRAWS,), jnp.int32), jax.random.PRNGKey(6))
    assert not np.any(accepted)
    assert _p_value(np.bincount(np.asarray(tokens[:, 0]), minlength=VOCAB), np.asarray(p0)) > P_VALUE_FLOOR
