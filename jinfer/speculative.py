"""Speculative decoding: draft proposals and the acceptance rules that keep the target's output.

A drafter proposes up to k tokens per sequence; the target scores the k + 1 positions (the last
accepted token and the k drafts) in one pass; acceptance keeps the longest prefix the target
agrees with, plus one token of the target's own, so each pass yields 1 to k + 1 tokens.

- Greedy rows keep draft i while it equals the target's argmax at i: the output is exactly plain
  greedy decoding.
- Sampled rows use the standard rejection rule: draft x_i drawn from q_i is kept with probability
  min(1, p_i(x_i) / q_i(x_i)); at the first rejection the token is drawn from
  normalise(max(p_i - q_i, 0)); when every draft is kept, a bonus token is drawn from p_k. The
  output is distributed exactly as sampling from p, whatever q is. p and q are the filtered
  distributions (temperature, top-k, top-p, min-p applied to both alike). A deterministic drafter
  (n-gram lookup, draft heads) has q_i = one-hot(x_i).

Everything on device is pure and fixed-shape: k is static, per-row draft counts are arrays
(rows without drafts have 0 and take one ordinary token).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

METHODS = ("ngram", "draft", "self", "heads")
MAX_NUM_TOKENS = 16


@dataclasses.dataclass(frozen=True)
class SpeculativeConfig:
    """method: "ngram" (prompt lookup), "draft" (a smaller model sharing the tokenizer), "self"
    (the target's first `self_layers` layers + its final norm and LM head) or "heads" (the
    Medusa-style heads saved at `draft_heads`, see `jinfer.draft_heads`, drafting the next pass from
    the target's hidden states); num_tokens: k, the most drafts per pass (1 to MAX_NUM_TOKENS, at
    most the number of heads). A request whose running acceptance (see
    `jinfer.engine.speculation`) falls below `min_acceptance` decodes plainly for a while."""

    method: str = "ngram"
    num_tokens: int = 4
    draft_model: str | None = None
    draft_heads: str | None = None
    max_ngram: int = 3
    min_ngram: int = 1
    self_layers: int | None = None  # None: a quarter of the target's layers (at least 1)
    min_acceptance: float = 0.3

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"speculative method {self.method!r} is not one of {METHODS}")
        if not isinstance(self.num_tokens, int) or not 1 <= self.num_tokens <= MAX_NUM_TOKENS:
            raise ValueError(f"num_tokens={self.num_tokens!r} must be an int between 1 and {MAX_NUM_TOKENS}")
        if (self.method == "draft") != (self.draft_model is not None):
            raise ValueError(f"draft_model={self.draft_model!r} must be given exactly when method is 'draft' (got {self.method!r})")
        if (self.method == "heads") != (self.draft_heads is not None):
            raise ValueError(f"draft_heads={self.draft_heads!r} must be given exactly when method is 'heads' (got {self.method!r})")
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise ValueError(f"n-gram sizes min_ngram={self.min_ngram}, max_ngram={self.max_ngram} need 1 <= min <= max")
        if self.self_layers is not None and self.self_layers < 1:
            raise ValueError(f"self_layers={self.self_layers} must be at least 1")
        if not 0 <= self.min_acceptance <= 1:
            raise ValueError(f"min_acceptance={self.min_acceptance} must be in [0, 1]")

    def draft_layers(self, num_layers: int) -> int:
        """How many of a `num_layers`-layer target's layers the self drafter runs; ValueError if too many."""
        layers = self.self_layers if self.self_layers is not None else max(1, num_layers // 4)
        if layers > num_layers:
            raise ValueError(f"self_layers={layers} exceeds the target's {num_layers} layers")
        return layers


def propose_ngram(token_ids: Sequence[int], num_tokens: int, max_ngram: int = 3, min_ngram: int = 1) -> list[int]:
    """Prompt lookup: the tokens that followed the latest earlier occurrence of the longest suffix
    (of max_ngram down to min_ngram tokens) of `token_ids`; [] when no suffix recurs. A continuation
    that runs into the end of the sequence goes on with the tokens it proposed (the copy overlaps
    itself, as in LZ77), so a repeating pattern proposes all `num_tokens`."""
    ids = np.asarray(token_ids, np.int64)
    for n in range(min(max_ngram, len(ids) - 1), min_ngram - 1, -1):
        windows = np.lib.stride_tricks.sliding_window_view(ids[:-1], n)  # every n-gram that has a successor
        matches = np.flatnonzero((windows == ids[-n:]).all(axis=1))
        if matches.size:
            start = int(matches[-1]) + n
            period = len(ids) - start
            return [int(ids[start + i % period]) for i in range(num_tokens)]
    return []


def accept_greedy(target_logits, draft_tokens, num_drafts):
    """Greedy verification.

    target_logits: [R, k+1, V] float32 at the last accepted token and each draft;
    draft_tokens: [R, k] int32; num_drafts: [R] int32 drafts actually proposed per row.
    Returns (num_accepted [R] int32, tokens [R, k+1] int32): the row's new tokens are tokens[:a + 1].
    """
    target = jnp.argmax(target_logits, axis=-1).astype(jnp.int32)  # [R, k+1]
    return _leading_run(target[:, :-1] == draft_tokens, num_drafts), target


def accept_sampled(target_probs, draft_probs, draft_tokens, num_drafts, key):
    """Rejection-sampling verification.

    target_probs: [R, k+1, V] filtered target distributions p_0..p_k; draft_probs: [R, k, V] the
    distributions q_i the drafts were drawn from (one-hot rows for a deterministic drafter);
    draft_tokens: [R, k] int32; num_drafts: [R] int32; key: a PRNG key.
    Returns (num_accepted [R] int32, tokens [R, k+1] int32): new tokens are tokens[:a + 1].
    """
    rows, k = draft_tokens.shape
    accept_key, resample_key = jax.random.split(key)
    p = jnp.take_along_axis(target_probs[:, :k], draft_tokens[..., None], axis=-1)[..., 0]  # [R, k]
    q = jnp.take_along_axis(draft_probs, draft_tokens[..., None], axis=-1)[..., 0]
    uniform = jax.random.uniform(accept_key, (rows, k))
    accepted = _leading_run(uniform * q < p, num_drafts)  # u < p/q without dividing by a zero q
    position = accepted[:, None, None]
    p_at = jnp.take_along_axis(target_probs, position, axis=1)[:, 0]  # [R, V]
    q_at = jnp.take_along_axis(jnp.pad(draft_probs, ((0, 0), (0, 1), (0, 0))), position, axis=1)[:, 0]
    residual = jnp.where((accepted < num_drafts)[:, None], jnp.maximum(p_at - q_at, 0.0), p_at)
    replacement = jax.random.categorical(resample_key, jnp.log(residual), axis=-1).astype(jnp.int32)
    tokens = jnp.concatenate([draft_tokens, jnp.zeros((rows, 1), jnp.int32)], axis=1)
    tokens = jnp.where(jnp.arange(k + 1)[None, :] == accepted[:, None], replacement[:, None], tokens)
    return accepted, tokens


def _leading_run(agrees, num_drafts):
    """agrees: [R, k] bool; num_drafts: [R] -> [R] int32 length of the leading run of True within the drafts."""
    valid = agrees & (jnp.arange(agrees.shape[1])[None, :] < num_drafts[:, None])
    return jnp.sum(jnp.cumprod(valid.astype(jnp.int32), axis=1), axis=1).astype(jnp.int32)
