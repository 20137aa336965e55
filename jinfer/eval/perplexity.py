"""Perplexity of a model over a token sequence, scored in overlapping windows.

A sequence longer than the model's window is cut into windows of `window` tokens whose starts
are `stride` apart. Each window scores only the targets no earlier window scored, its newest
tokens, so every token after the first is predicted exactly once, and (past the first window)
with at least `window - stride` tokens of context: the sliding-window evaluation of Hugging
Face's perplexity guide.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from jinfer.model import Model, check_vocabulary, full_forward


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
    """Negative log-likelihood (nats) of the scored tokens, and what follows from it."""

    num_tokens: int  # targets scored: every token but the first
    nll: float  # sum over the scored tokens of -log p(token | the tokens before it in its window)

    @property
    def mean_nll(self) -> float:
        return self.nll / self.num_tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_nll)


@dataclasses.dataclass(frozen=True)
class Window:
    """Tokens [start, end) go in; the targets [first_target, end) are scored."""

    start: int
    end: int
    first_target: int


def plan_windows(num_tokens: int, window: int, stride: int) -> list[Window]:
    """The windows covering `num_tokens` tokens, `stride` apart, the last one ending at the end."""
    if num_tokens < 2:
        raise ValueError(f"perplexity needs at least 2 tokens, got {num_tokens}")
    if window < 2:
        raise ValueError(f"window={window} must be at least 2 tokens")
    if not 0 < stride < window:
        # Consecutive windows must overlap, so a window's first scored target has context in it.
        raise ValueError(f"stride={stride} must be in 1..window - 1 = {window - 1}")
    windows, scored_until = [], 1
    for start in range(0, num_tokens, stride):
        end = min(start + window, num_tokens)
        windows.append(Window(start, end, scored_until))
        scored_until = end
        if end == num_tokens:
            break
    return windows


@functools.partial(jax.jit, static_argnames=("config", "dtype", "kv_cache_dtype"))
def _token_nll(
    params,
    tokens: jax.Array,  # [B, S] int32
    targets: jax.Array,  # [B, S] int32, targets[b, s] = the token after tokens[b, s]
    *,
    config,
    dtype,
    kv_cache_dtype: str,
) -> jax.Array:  # [B, S] float32
    """-log p(targets[b, s] | tokens[b, : s + 1]) from one full-sequence forward."""
    logits = full_forward(params, tokens, config=config, dtype=dtype, kv_cache_dtype=kv_cache_dtype)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]


def _window_arrays(
    token_ids: np.ndarray,  # [N] int
    windows: list[Window],
    width: int,
    rows: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inputs, targets (int32) and scored mask (bool), each [rows, width]: window i in row i,
    right-padded with token 0; rows past the windows are all padding."""
    inputs = np.zeros((rows, width), np.int32)
    targets = np.zeros((rows, width), np.int32)
    scored = np.zeros((rows, width), bool)
    for row, w in enumerate(windows):
        length = w.end - w.start
        inputs[row, :length] = token_ids[w.start : w.end]
        targets[row, : length - 1] = token_ids[w.start + 1 : w.end]
        # Position p predicts token start + p + 1.
        scored[row, w.first_target - w.start - 1 : length - 1] = True
    return inputs, targets, scored


def perplexity(
    model: Model,
    token_ids,  # [N] ints
    window: int,
    stride: int,
    batch_size: int = 1,
    progress: bool = False,
    kv_cache_dtype: str = "auto",
) -> PerplexityResult:
    """Perplexity of `model` over `token_ids`, in windows of `window` tokens `stride` apart.

    `batch_size` windows go through one forward; every forward has the shape
    [batch_size, min(window, N)] (a short last window and the last batch are padded), so it
    compiles once. The NLL is summed in float64 on the host. `progress` shows a progress bar
    over the batches. `kv_cache_dtype="int8"` scores with K/V as the int8 KV cache stores them.
    """
    token_ids = np.asarray(token_ids)
    if token_ids.ndim != 1 or not np.issubdtype(token_ids.dtype, np.integer):
        raise ValueError(f"token_ids must be a 1-D integer array, got shape {token_ids.shape} dtype {token_ids.dtype}")
    check_vocabulary(token_ids, model.config.vocab_size)
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1")
    if window > model.config.max_position_embeddings:
        raise ValueError(f"window={window} exceeds the model's context of {model.config.max_position_embeddings} tokens")
    windows = plan_windows(len(token_ids), window, stride)
    rows = -(-len(windows) // batch_size) * batch_size
    width = max(w.end - w.start for w in windows)
    inputs, targets, scored = _window_arrays(token_ids, windows, width, rows)
    nll = 0.0
    for first in tqdm.trange(0, rows, batch_size, desc="windows", unit="batch", disable=not progress):
        batch = slice(first, first + batch_size)
        token_nll = _token_nll(
            model.params, inputs[batch], targets[batch], config=model.config, dtype=model.dtype, kv_cache_dtype=kv_cache_dtype
        )
        nll += float(np.asarray(token_nll, np.float64)[scored[batch]].sum())
    return PerplexityResult(num_tokens=int(scored.sum()), nll=nll)
