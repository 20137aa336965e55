"""Per-row token sampling: every sequence of a step has its own parameters, all in one compiled program.

`SamplingParams` is what a request asks for. `SamplingBatch.from_params` turns the requests of a step into
arrays (one row each), so any mix of requests runs through the same jitted `sample` without recompiling.

The filters are cut-offs on the temperature-scaled logits, found without sorting the vocabulary:
top-k keeps the k largest, top-p then keeps the fewest most likely tokens whose probability reaches p
(the most likely token always survives), and min-p keeps tokens at least min_p times as likely as the
most likely one. Tokens tied with a cut-off are kept. Cut-offs inside the `CANDIDATES` most likely tokens
come from one `lax.top_k`; rows that cut deeper take an exact binary search over the float bit patterns,
which is only run when some row needs it. The draw is a two-stage Gumbel-max: a chunk of the vocabulary by
its total probability, then a token inside that chunk, so a row needs V / CHUNK + CHUNK random numbers, not V.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jinfer import native
from jinfer.ops import backend as kernel_backend

MAX_LOGPROBS = 20
CANDIDATES = 256  # top-k / top-p cut-offs within this many most likely tokens need no vocabulary-wide search
CHUNK = 512  # vocabulary chunk of the two-stage draw


def _require(ok: bool, name: str, value, requirement: str) -> None:
    if not ok:
        raise ValueError(f"{name} must be {requirement}, got {value!r}")


def _is_int(value) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick the tokens of one request; raises ValueError on a bad value."""

    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # seen in prompt or output: logit / penalty if logit > 0 else logit * penalty
    presence_penalty: float = 0.0  # subtracted from every token generated at least once
    frequency_penalty: float = 0.0  # subtracted once per time a token was generated
    seed: int | None = None  # None: the engine picks one
    max_tokens: int = 16
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()  # stop strings, matched on the host
    ignore_eos: bool = False
    logprobs: int | None = None  # how many top logprobs to return per token; None: none
    n: int = 1  # samples per prompt

    def __post_init__(self):
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        object.__setattr__(self, "stop", tuple(self.stop))
        _require(self.temperature >= 0, "temperature", self.temperature, ">= 0")
        _require(_is_int(self.top_k) and self.top_k >= 0, "top_k", self.top_k, "an int >= 0 (0 turns it off)")
        _require(0 < self.top_p <= 1, "top_p", self.top_p, "in (0, 1]")
        _require(0 <= self.min_p <= 1, "min_p", self.min_p, "in [0, 1]")
        _require(self.repetition_penalty > 0, "repetition_penalty", self.repetition_penalty, "> 0")
        _require(-2 <= self.presence_penalty <= 2, "presence_penalty", self.presence_penalty, "in [-2, 2]")
        _require(-2 <= self.frequency_penalty <= 2, "frequency_penalty", self.frequency_penalty, "in [-2, 2]")
        seed_ok = self.seed is None or (_is_int(self.seed) and 0 <= self.seed < 2**64)
        _require(seed_ok, "seed", self.seed, "None or an int in [0, 2**64)")
        _require(_is_int(self.max_tokens) and self.max_tokens >= 1, "max_tokens", self.max_tokens, "an int >= 1")
        ids_ok = all(_is_int(i) and i >= 0 for i in self.stop_token_ids)
        _require(ids_ok, "stop_token_ids", self.stop_token_ids, "ints >= 0")
        _require(all(isinstance(s, str) and s for s in self.stop), "stop", self.stop, "non-empty strings")
        logprobs_ok = self.logprobs is None or (_is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS)
        _require(logprobs_ok, "logprobs", self.logprobs, f"None or an int in [0, {MAX_LOGPROBS}]")
        _require(_is_int(self.n) and self.n >= 1, "n", self.n, "an int >= 1")


def _threefry2x32(k0, k1, x0, x1):
    """The 20-round Threefry-2x32 block cipher that jax.random is built on; all arguments [N] uint32."""
    schedule = (k0, k1, k0 ^ k1 ^ np.uint32(0x1BD11BDA))
    x0, x1 = x0 + schedule[0], x1 + schedule[1]
    for group in range(5):
        for rotation in ((13, 15, 26, 6), (17, 29, 16, 24))[group % 2]:
            x0 = x0 + x1
            x1 = x0 ^ ((x1 << np.uint32(rotation)) | (x1 >> np.uint32(32 - rotation)))
        x0 = x0 + schedule[(group + 1) % 3]
        x1 = x1 + schedule[(group + 2) % 3] + np.uint32(group + 1)
    return x0, x1


def step_keys(seeds, steps) -> np.ndarray:
    """Raw key data of `fold_in(PRNGKey(seed), step)`, in numpy.

    seeds: [N] ints below 2**64; steps: [N] ints below 2**32 -> [N, 2] uint32.

    A seed is split into two 32-bit words like a 64-bit seed is by jax, so seeds below 2**32 match
    `jax.random.PRNGKey` with or without x64.
    """
    seeds = np.asarray(seeds, np.uint64)
    steps = np.asarray(steps, np.uint32)
    hi = (seeds >> np.uint64(32)).astype(np.uint32)
    lo = (seeds & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    return np.stack(_threefry2x32(hi, lo, np.zeros_like(steps), steps), axis=-1)


@flax.struct.dataclass
class SamplingBatch:
    """The sampling parameters of every row of a step, one entry per row (numpy on the host, jit moves them)."""

    temperature: jax.Array  # [B] float32, 0: greedy
    top_k: jax.Array  # [B] int32, 0: off
    top_p: jax.Array  # [B] float32
    min_p: jax.Array  # [B] float32
    repetition_penalty: jax.Array  # [B] float32
    presence_penalty: jax.Array  # [B] float32
    frequency_penalty: jax.Array  # [B] float32
    keys: jax.Array  # [B, 2] uint32 raw threefry key data for this step
    top_logprobs: jax.Array  # [B] int32 top logprobs wanted (0: none)

    @classmethod
    def from_params(
        cls, params: Sequence[SamplingParams], seeds_and_steps: Sequence[tuple[int, int]], pad_to: int
    ) -> SamplingBatch:
        """Rows for `params` with keys from (seed, step), then greedy rows without penalties up to `pad_to`.

        Row i's key is `fold_in(PRNGKey(seed_i), step_i)` (see `step_keys`): it depends on nothing else in the batch.
        """
        if len(seeds_and_steps) != len(params):
            raise ValueError(f"got {len(params)} params but {len(seeds_and_steps)} (seed, step) pairs")
        if pad_to < len(params):
            raise ValueError(f"pad_to must be at least the number of rows ({len(params)}), got {pad_to}")
        for seed, step in seeds_and_steps:
            _require(_is_int(seed) and 0 <= seed < 2**64, "seed", seed, "an int in [0, 2**64)")
            _require(_is_int(step) and 0 <= step < 2**32, "step", step, "an int in [0, 2**32)")
        padding = pad_to - len(params)

        def column(field: str, dtype, pad_value) -> np.ndarray:
            return np.asarray([getattr(p, field) for p in params] + [pad_value] * padding, dtype)

        keys = np.zeros((pad_to, 2), np.uint32)
        if params:
            keys[: len(params)] = step_keys(*zip(*seeds_and_steps))
        return cls(
            temperature=column("temperature", np.float32, 0.0),
            top_k=np.minimum(column("top_k", np.int64, 0), np.iinfo(np.int32).max).astype(np.int32),
            top_p=column("top_p", np.float32, 1.0),
            min_p=column("min_p", np.float32, 0.0),
            repetition_penalty=column("repetition_penalty", np.float32, 1.0),
            presence_penalty=column("presence_penalty", np.float32, 0.0),
            frequency_penalty=column("frequency_penalty", np.float32, 0.0),
            keys=keys,
            top_logprobs=np.asarray([p.logprobs or 0 for p in params] + [0] * padding, np.int32),
        )


def token_counts(token_ids, lengths, vocab_size: int):
    """How often each id occurs in each row. token_ids: [B, L] int32, padded; lengths: [B] int32 -> [B, V] int32."""
    rows, width = token_ids.shape
    valid = jnp.arange(width)[None, :] < lengths[:, None]
    row_ids = jnp.broadcast_to(jnp.arange(rows)[:, None], token_ids.shape)
    counts = jnp.zeros((rows, vocab_size), jnp.int32)
    return counts.at[row_ids, jnp.where(valid, token_ids, 0)].add(valid.astype(jnp.int32))


def apply_penalties(logits, batch: SamplingBatch, prompt_mask, output_counts):
    """Repetition, then frequency and presence penalties.

    logits: [B, V] float32; prompt_mask: [B, V] bool (in the prompt); output_counts: [B, V] int32 (times generated).
    Returns [B, V] float32.
    """
    generated = output_counts > 0
    penalty = batch.repetition_penalty[:, None]
    repeated = jnp.where(logits > 0, logits / penalty, logits * penalty)
    logits = jnp.where(prompt_mask | generated, repeated, logits)
    logits = logits - batch.frequency_penalty[:, None] * output_counts.astype(jnp.float32)
    return logits - batch.presence_penalty[:, None] * generated.astype(jnp.float32)


@flax.struct.dataclass
class SampleResult:
    """One sampled token per row with logprobs under log_softmax of the logits given to `sample`."""

    tokens: jax.Array  # [B] int32
    logprob: jax.Array  # [B] float32, of `tokens`
    top_ids: jax.Array  # [B, n] int32, most likely first
    top_logprobs: jax.Array  # [B, n] float32


def sample(logits, batch: SamplingBatch, num_top_logprobs: int) -> SampleResult:
    """Pick one token per row; pure and jittable with `num_top_logprobs` static (0..MAX_LOGPROBS).

    logits: [B, V] float32, already penalised. Rows with temperature 0 take the argmax (lowest id on ties)
    whatever their filters; the others are scaled by temperature, filtered by top-k, top-p and min-p, and
    drawn with the row's key. Logprobs are reported under log_softmax(logits): before temperature and filters.
    In kernel mode "native" (the enclosing `kernel_scope`'s) the argmax and the log-normalizer come from
    one CPU kernel (`jinfer.native.logit_stats`) instead of three reductions over the logits.
    """
    _require(0 <= num_top_logprobs <= MAX_LOGPROBS, "num_top_logprobs", num_top_logprobs, f"in [0, {MAX_LOGPROBS}]")
    if kernel_backend.resolve() == "native" and native.supports_logit_stats(logits):
        _, greedy, normalizer = native.logit_stats(logits)
    else:
        best = jnp.max(logits, axis=-1, keepdims=True)  # [B, 1]
        greedy = _first_index_of(logits == best)
        normalizer = best[:, 0] + jnp.log(jnp.sum(jnp.exp(logits - best), axis=-1))
    is_greedy = batch.temperature == 0
    tokens = lax.cond(
        jnp.all(is_greedy), lambda: greedy, lambda: jnp.where(is_greedy, greedy, _draw(logits, batch))
    )
    logprob = jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0] - normalizer
    rows = logits.shape[0]
    top_values, top_ids = lax.cond(
        jnp.any(batch.top_logprobs > 0),
        lambda: tuple(lax.top_k(logits, num_top_logprobs)),
        lambda: (jnp.zeros((rows, num_top_logprobs), logits.dtype), jnp.zeros((rows, num_top_logprobs), jnp.int32)),
    )
    return SampleResult(tokens, logprob, top_ids, top_values - normalizer[:, None])


def _first_index_of(hits):
    """hits: [B, V] bool -> [B] int32 lowest index of a hit per row (the last index if none, e.g. NaN logits).

    With a max beforehand this is argmax as two plain reductions, which XLA:CPU runs much faster than
    argmax's reduction over (value, index) pairs.
    """
    last = hits.shape[-1] - 1
    ids = lax.broadcasted_iota(jnp.int32, hits.shape, 1)
    return jnp.min(jnp.where(hits, ids, last), axis=-1)


def _draw(logits, batch: SamplingBatch):
    """Temperature, the three filters, then one categorical draw per row. logits: [B, V] -> [B] int32."""
    scaled, cutoff = _scaled_and_cutoff(logits, batch)
    return _two_stage_gumbel(scaled, cutoff, batch.keys)


def filtered_probs(logits, batch: SamplingBatch):
    """The distribution a sampled row draws from: softmax of the temperature-scaled logits over the
    tokens top-k, top-p and min-p keep. logits: [B, V] float32 -> [B, V] float32 (greedy rows:
    temperature 1, filtered)."""
    scaled, cutoff = _scaled_and_cutoff(logits, batch)
    return jax.nn.softmax(jnp.where(scaled >= cutoff[:, None], scaled, -jnp.inf), axis=-1)


def _scaled_and_cutoff(logits, batch: SamplingBatch):
    """logits: [B, V] -> (temperature-scaled logits [B, V], the lowest scaled logit each row keeps [B])."""
    temperature = jnp.where(batch.temperature > 0, batch.temperature, 1.0)
    scaled = logits / temperature[:, None]
    filtered = (batch.top_k > 0) | (batch.top_p < 1) | (batch.min_p > 0)
    cutoff = lax.cond(
        jnp.any(filtered & (batch.temperature > 0)),
        lambda: _cutoff(scaled, batch),
        lambda: jnp.full(temperature.shape, -jnp.inf),
    )
    return scaled, cutoff


def _cutoff(x, batch: SamplingBatch):
    """The lowest logit each row keeps: top-k, top-p and min-p keep exactly the tokens with x >= cutoff.

    x: [B, V] float32, temperature-scaled -> [B] float32.
    """
    vocab = x.shape[-1]
    width = min(CANDIDATES, vocab)
    top = lax.top_k(x, width)[0]  # [B, width], descending
    best = jnp.max(x, axis=-1, keepdims=True)  # not top[:, :1]: slicing it turns top_k into a full sort on CPU

    # top-k: the k-th largest value.
    k_on = (batch.top_k > 0) & (batch.top_k < vocab)
    k_near = k_on & (batch.top_k <= width)
    kth = jnp.take_along_axis(top, jnp.clip(batch.top_k, 1, width)[:, None] - 1, axis=-1)[:, 0]
    k_cut = _fast_or_search(
        jnp.where(k_on, kth, -jnp.inf),
        ~k_on | k_near,
        lambda: jnp.where(k_on, _search_cutoff(x, jnp.ones_like(x), batch.top_k.astype(jnp.float32)), -jnp.inf),
    )

    # top-p: the least likely token still needed to reach p of the probability that top-k left.
    weights = jnp.where(x >= k_cut[:, None], jnp.exp(x - best), 0.0)  # [B, V] unnormalised top-k probabilities
    target = batch.top_p * weights.sum(axis=-1)
    top_weights = jnp.where(top >= k_cut[:, None], jnp.exp(top - best), 0.0)
    above = jnp.cumsum(top_weights, axis=-1) - top_weights  # mass of the more likely candidates
    kept = jnp.sum((above < target[:, None]) & (top >= k_cut[:, None]), axis=-1)  # >= 1: the best always stays
    p_on = batch.top_p < 1
    p_cut = _fast_or_search(
        jnp.where(p_on, jnp.take_along_axis(top, kept[:, None] - 1, axis=-1)[:, 0], -jnp.inf),
        ~p_on | (kept < width) | k_near,
        lambda: jnp.where(p_on, _search_cutoff(x, weights, target), -jnp.inf),
    )

    # min-p: p_i >= min_p * p_max, i.e. x_i >= x_max + log(min_p); renormalising does not change the ratio.
    min_p_cut = best[:, 0] + jnp.log(batch.min_p)
    return jnp.maximum(jnp.maximum(k_cut, p_cut), min_p_cut)


def _fast_or_search(fast, fits, search):
    """`fast` where `fits`, else `search()`, which only runs when some row needs it. fast, fits: [B] -> [B]."""
    return lax.cond(jnp.all(fits), lambda: fast, lambda: jnp.where(fits, fast, search()))


def _search_cutoff(x, weights, target):
    """Per row, the largest value c of x with sum(weights[x >= c]) >= target: 32 masked sums, one per bit.

    x, weights: [B, V] float32; target: [B] float32 -> [B] float32 (-inf if even all of x falls short).
    """
    sign = jnp.uint32(0x80000000)
    bits = lax.bitcast_convert_type(x, jnp.uint32)
    order = jnp.where(bits >= sign, ~bits, bits | sign)  # uint32 order == float order

    def try_bit(i, found):
        trial = found | (jnp.uint32(1) << (31 - i).astype(jnp.uint32))
        mass = jnp.sum(jnp.where(order >= trial[:, None], weights, 0.0), axis=-1)
        return jnp.where(mass >= target, trial, found)

    found = lax.fori_loop(0, 32, try_bit, jnp.zeros(target.shape, jnp.uint32))
    value = lax.bitcast_convert_type(jnp.where(found >= sign, found ^ sign, ~found), jnp.float32)
    return jnp.where(found == 0, -jnp.inf, value)


def _two_stage_gumbel(x, cutoff, keys):
    """One draw per row from softmax(x) over the tokens with x >= cutoff.

    Gumbel-max picks a chunk of the vocabulary by its total probability, then a token inside that chunk.
    x: [B, V] float32; cutoff: [B] float32; keys: [B, 2] uint32 -> [B] int32.
    """
    rows, vocab = x.shape
    chunk = min(CHUNK, vocab)
    x = jnp.where(x >= cutoff[:, None], x, -jnp.inf)
    x = jnp.pad(x, ((0, 0), (0, -vocab % chunk)), constant_values=-jnp.inf).reshape(rows, -1, chunk)
    num_chunks = x.shape[1]
    best = jnp.max(x, axis=(1, 2), keepdims=True)
    log_mass = jnp.log(jnp.sum(jnp.exp(x - best), axis=-1))  # [B, num_chunks]

    def gumbel(key):
        return jax.random.gumbel(jax.random.wrap_key_data(key, impl="threefry2x32"), (num_chunks + chunk,))

    noise = jax.vmap(gumbel)(keys)  # [B, num_chunks + chunk]
    picked = jnp.argmax(log_mass + noise[:, :num_chunks], axis=-1)
    inside = jnp.take_along_axis(x, picked[:, None, None], axis=1)[:, 0]  # [B, chunk]
    offset = jnp.argmax(inside + noise[:, num_chunks:], axis=-1)
    return (picked * chunk + offset).astype(jnp.int32)
