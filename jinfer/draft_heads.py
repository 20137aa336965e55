"""Medusa-style draft heads: small residual blocks on the target's final hidden state that guess the
tokens after the next one, read out through the target's own LM head.

Head i (i = 1..H) maps h_t, the final hidden state at position t (after the final norm: the vector the
LM head reads to predict token t+1), to logits for token t+1+i:

    logits_i = lm_head(h_t + W2_i · silu(W1_i · h_t))

W2 starts at zero, so an untrained head is the LM head itself (it proposes token t+1 again) and
training only has to learn a correction. The speculative step (method "heads") gets h_t from the
target's verification pass at no extra cost; the drafts are argmaxes (deterministic, q one-hot), so
the acceptance rules stay exact for greedy rows and distribution-preserving for sampled ones.

Checkpoint: one safetensors file holding `w1` and `w2` [H, D, D] float32 (each matrix [out, in], like
`Linear`), with metadata recording the number of heads, the hidden size and the vocabulary size of the
target they were trained on. `train_heads` (optax adamw on cross-entropy against the target's own
greedy tokens) is what tools/train_draft_heads.py runs.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy

from jinfer.config import ModelConfig
from jinfer.models.transformer import Transformer, lm_head_logits
from jinfer.ops.backend import kernel_scope
from jinfer.ops.attention import FullSequenceAttention

FORMAT = "jinfer-draft-heads"
HIDDEN_BUCKET = 64  # sequences are right-padded to a multiple of this: one compile serves many lengths


@dataclasses.dataclass(frozen=True)
class DraftHeads:
    """params: {"w1": [H, D, D], "w2": [H, D, D]}; vocab_size: the target vocabulary they draft in."""

    params: dict[str, Any]
    vocab_size: int

    @property
    def num_heads(self) -> int:
        return int(self.params["w1"].shape[0])

    @property
    def hidden_size(self) -> int:
        return int(self.params["w1"].shape[-1])


def init_heads(num_heads: int, hidden_size: int, vocab_size: int, seed: int = 0) -> DraftHeads:
    """Untrained heads: W1 normal with variance 1 / D, W2 zero (every head equals the LM head)."""
    w1 = jax.random.normal(jax.random.key(seed), (num_heads, hidden_size, hidden_size), jnp.float32) * hidden_size**-0.5
    return DraftHeads({"w1": w1, "w2": jnp.zeros_like(w1)}, vocab_size)


def head_states(params, hidden):
    """hidden: [*lead, D] final hidden states -> [*lead, H, D] h + W2_i · silu(W1_i · h) for each head i."""
    inner = jax.nn.silu(jnp.einsum("hoi,...i->...ho", params["w1"], hidden))
    return hidden[..., None, :] + jnp.einsum("hoi,...hi->...ho", params["w2"], inner)


def head_logits(params, target_params, hidden, config: ModelConfig, dtype):
    """hidden: [*lead, D] -> [*lead, H, V] float32 logits of every head through the target's LM head."""
    return lm_head_logits(target_params, head_states(params, hidden).astype(dtype), config, dtype)


def propose(params, target_params, hidden, num_tokens: int, config: ModelConfig, dtype):
    """hidden: [R, D] -> [R, num_tokens] int32 greedy drafts of the first `num_tokens` heads (static)."""
    first = {name: weights[:num_tokens] for name, weights in params.items()}
    return jnp.argmax(head_logits(first, target_params, hidden, config, dtype), axis=-1).astype(jnp.int32)


def save_heads(path: str | pathlib.Path, heads: DraftHeads) -> pathlib.Path:
    """Writes the heads as float32 safetensors with their sizes in the metadata."""
    path = pathlib.Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: np.asarray(weights, np.float32) for name, weights in heads.params.items()}
    sizes = {"num_heads": heads.num_heads, "hidden_size": heads.hidden_size, "vocab_size": heads.vocab_size}
    safetensors.numpy.save_file(tensors, str(path), metadata={"format": FORMAT, **{k: str(v) for k, v in sizes.items()}})
    return path


def load_heads(path: str | pathlib.Path, dtype=jnp.float32) -> DraftHeads:
    """The heads saved by `save_heads`, cast to `dtype`; ValueError naming the path if there are none."""
    path = pathlib.Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"no draft heads checkpoint at {str(path)!r}")
    with safetensors.safe_open(str(path), framework="numpy") as reader:
        metadata = reader.metadata() or {}
        if metadata.get("format") != FORMAT or set(reader.keys()) != {"w1", "w2"}:
            raise ValueError(f"{str(path)!r} is not a draft heads checkpoint (format {FORMAT!r} with tensors w1, w2)")
        params = {name: jnp.asarray(reader.get_tensor(name), dtype) for name in ("w1", "w2")}
    heads = DraftHeads(params, int(metadata["vocab_size"]))
    expected = (int(metadata["num_heads"]), int(metadata["hidden_size"]), int(metadata["hidden_size"]))
    if any(weights.shape != expected for weights in params.values()):
        raise ValueError(f"{str(path)!r}: tensor shapes {[w.shape for w in params.values()]} differ from the recorded {expected}")
    return heads


def check_heads(heads: DraftHeads, config: ModelConfig, num_tokens: int, source: str) -> None:
    """Raises ValueError naming the values when the heads (from `source`) do not fit the target or k."""
    if heads.hidden_size != config.hidden_size:
        raise ValueError(f"the draft heads in {source!r} have hidden size {heads.hidden_size}; the target's is {config.hidden_size}")
    if heads.vocab_size != config.vocab_size:
        raise ValueError(f"the draft heads in {source!r} have vocabulary size {heads.vocab_size}; the target's is {config.vocab_size}")
    if num_tokens > heads.num_heads:
        raise ValueError(f"num_tokens={num_tokens} exceeds the {heads.num_heads} draft heads in {source!r}")


# ------------------------------------------------------------------------------------------ training


@functools.partial(jax.jit, static_argnames=("config", "dtype"))
def final_hidden_states(params, tokens, *, config: ModelConfig, dtype):
    """tokens: [B, S] int32, every sequence from position 0 -> [B, S, D] the final hidden states (after
    the final norm) the LM head reads; XLA drops the unused logits."""
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    _, _, hidden = Transformer(config, dtype).apply({"params": params}, tokens, positions, FullSequenceAttention(), return_hidden=True)
    return hidden


def training_examples(params, config: ModelConfig, dtype, sequences: Sequence[Sequence[int]], prompt_lens: Sequence[int], num_heads: int):
    """The positions whose next token the target generated, from full sequences (prompt + output).

    Returns (hidden [N, D] float32: h_t for t from the last prompt token to the second-to-last token;
    targets [N, H] int32: token t+1+i for head i, -1 past the end of the sequence)."""
    hidden, targets = [], []
    for sequence, prompt_len in zip(sequences, prompt_lens):
        length = len(sequence)
        padded = np.zeros((1, -(-length // HIDDEN_BUCKET) * HIDDEN_BUCKET), np.int32)
        padded[0, :length] = sequence
        states = np.asarray(final_hidden_states(params, jnp.asarray(padded), config=config, dtype=dtype), np.float32)[0]
        positions = np.arange(prompt_len - 1, length - 1)
        ahead = positions[:, None] + 1 + np.arange(1, num_heads + 1)[None, :]  # [N, H]
        tokens = np.asarray(sequence, np.int32)
        targets.append(np.where(ahead < length, tokens[np.minimum(ahead, length - 1)], -1))
        hidden.append(states[positions])
    return np.concatenate(hidden), np.concatenate(targets).astype(np.int32)


def head_loss(params, target_params, hidden, targets, config: ModelConfig, dtype):
    """Mean cross-entropy of every head against its target token. hidden: [N, D]; targets: [N, H] int32 (-1: none)."""
    import optax  # training only: serving never imports it

    logits = head_logits(params, target_params, hidden, config, dtype)  # [N, H, V]
    valid = targets >= 0
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(targets, 0))
    return jnp.sum(jnp.where(valid, losses, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


@functools.partial(jax.jit, static_argnames=("config", "dtype"))
def _correct(params, target_params, hidden, targets, *, config: ModelConfig, dtype):
    """hidden: [N, D]; targets: [N, H] -> [H] int32 positions where each head's argmax is its target."""
    guesses = jnp.argmax(head_logits(params, target_params, hidden, config, dtype), axis=-1)
    return jnp.sum(guesses == targets, axis=0)


def head_accuracy(heads: DraftHeads, target_params, config: ModelConfig, dtype, hidden, targets, chunk: int = 256) -> np.ndarray:
    """Top-1 accuracy of each head. hidden: [N, D]; targets: [N, H] int32 (-1: none) -> [H] float."""
    targets = targets[:, : heads.num_heads]
    correct = np.zeros(heads.num_heads, np.int64)
    for start in range(0, len(hidden), chunk):
        rows = slice(start, start + chunk)
        padded_hidden, padded_targets = _pad_rows(hidden[rows], chunk), _pad_rows(targets[rows], chunk, fill=-1)
        correct += np.asarray(_correct(heads.params, target_params, padded_hidden, padded_targets, config=config, dtype=dtype))
    return correct / np.maximum((targets >= 0).sum(axis=0), 1)


def _pad_rows(array: np.ndarray, rows: int, fill=0) -> np.ndarray:
    """array: [n, ...] with n <= rows -> [rows, ...] (one compiled shape for every chunk)."""
    return np.pad(array, [(0, rows - len(array))] + [(0, 0)] * (array.ndim - 1), constant_values=fill)


def train_heads(
    heads: DraftHeads,
    target_params,
    config: ModelConfig,
    dtype,
    hidden,
    targets,
    *,
    steps: int,
    learning_rate: float,
    batch_size: int,
    seed: int = 0,
    on_step: Callable[[int, float], None] | None = None,
) -> DraftHeads:
    """`steps` adamw steps (cosine-decayed learning rate) on random batches of `batch_size` positions.
    hidden: [N, D]; targets: [N, H] int32 (-1: none); the target's parameters stay fixed.
    `on_step(step, loss)` reports progress."""
    import optax  # training only: serving never imports it

    optimizer = optax.adamw(optax.cosine_decay_schedule(learning_rate, steps))
    params = jax.tree.map(lambda weights: jnp.asarray(weights, jnp.float32), heads.params)
    state = optimizer.init(params)

    @jax.jit
    def update(params, state, target_params, hidden, targets):  # hidden: [B, D]; targets: [B, H] int32
        with kernel_scope("reference"):  # differentiable ops only (the native CPU kernels have no gradient)
            loss, grads = jax.value_and_grad(head_loss)(params, target_params, hidden, targets, config, dtype)
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    rng = np.random.default_rng(seed)
    targets = np.asarray(targets)[:, : heads.num_heads]
    for step in range(steps):
        rows = rng.integers(0, len(hidden), batch_size)
        params, state, loss = update(params, state, target_params, jnp.asarray(hidden[rows]), jnp.asarray(targets[rows]))
        if on_step is not None:
            on_step(step, float(loss))
    return DraftHeads(params, heads.vocab_size)
