"""The jitted speculative step: draft k tokens, verify them with the target in one pass, accept on device.

    speculative_step(params, kv_cache, batch) -> (kv_cache, SpeculativeOutput)

`batch.step` is an ordinary ragged StepBatch in which every speculating row runs the chunk
[last token, d_1 .. d_k] (positions, slots and kv_lens laid out by the host like a prefill chunk);
rows without drafts (prefill chunks, plain decodes) run as in `step.step`. Inside one program:

1. Drafting, by the static `method`:
   - "ngram": the drafts came from the host (prompt lookup) and are already in the chunk; q is one-hot.
   - "heads": likewise host drafts, which the previous pass computed (step 4); q is one-hot.
   - "self": k one-token passes through the target's first `draft_layers` layers + its final norm
     and LM head, writing their K/V into the target's own pool for those layers (the target's
     full pass over the same tokens and positions rewrites those slots right after).
   - "draft": a separate draft model with its own pool (same page table): one pass over the whole
     ragged batch (so prefill chunks fill its pool too, and each row's last token gives d_1), then
     k one-token passes feeding d_1 .. d_k (the last one only writes d_k's K/V).
   The draws of sampled rows use the row's temperature / top-k / top-p / min-p. The k draft passes
   are one `lax.scan`, so the program compiles one drafter pass whatever k is.
2. The target runs the chunk with the drafts in place and keeps logits at the k + 1 positions of
   every row (`verify_index`).
3. Acceptance (`jinfer.speculative`): greedy rows keep the drafts equal to the target's argmax,
   sampled rows use the rejection rule on the filtered distributions. Rows without drafts take one
   ordinary token: the argmax (as `step.step`), or a draw from their filtered, penalised
   distribution (the same distribution as `step.step`'s, though not the same draw for a seed).
4. Method "heads" only: the verification pass also returns the final hidden states at the k + 1
   positions; each row's state at its last accepted position (the one whose logits gave the row's
   newest token) goes through the draft heads (`jinfer.draft_heads`), whose argmaxes are the drafts
   of the row's next pass (`next_drafts`): they continue exactly the tokens this pass produced.

A batch whose rows are all greedy compiles without any of the sampling machinery (the static
`sampled` flag): XLA:CPU took about 3x longer to compile the program with it.

Nothing is copied for rejected drafts: their K/V stay in the pool past the row's committed length,
masked by position, and the host counts only the accepted tokens as computed.
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp
from jax import lax

from jinfer.cache import NULL_PAGE
from jinfer.config import ModelConfig
from jinfer.draft_heads import propose
from jinfer.models.transformer import Transformer
from jinfer.ops.attention import PagedAttention
from jinfer.ops.backend import kernel_scope
from jinfer.sampling import MAX_LOGPROBS, SamplingBatch, filtered_probs
from jinfer.speculative import accept_greedy, accept_sampled
from jinfer.step import StepBatch, penalised

NULL_SLOT = NULL_PAGE  # slot 0 lies in the null page (page 0) whatever the page size
ACCEPT_STREAM, DRAFT_STREAM = 1, 2  # fold_in streams of a row's key: acceptance draws, then one per draft


@flax.struct.dataclass
class SpeculativeBatch:
    step: StepBatch  # T tokens: each speculating row's chunk is [last token, d_1 .. d_k_r]
    verify_index: jax.Array  # [R, K+1] int32 index in T of each row's last token and its drafts (the last repeated past k_r)
    draft_tokens: jax.Array  # [R, K] int32 drafts proposed on the host ("ngram"; zeros otherwise)
    num_drafts: jax.Array  # [R] int32 k_r, drafts of each row (0: one ordinary token)
    method: str = flax.struct.field(pytree_node=False, default="ngram")  # static: "ngram" | "self" | "draft" | "heads"
    draft_layers: int = flax.struct.field(pytree_node=False, default=0)  # static: target layers the "self" drafter runs
    draft_config: ModelConfig | None = flax.struct.field(pytree_node=False, default=None)  # static: the "draft" model's config
    sampled: bool = flax.struct.field(pytree_node=False, default=True)  # static: some row samples (False: greedy-only program)


@flax.struct.dataclass
class SpeculativeOutput:
    tokens: jax.Array  # [R, K+1] int32: a row's new tokens are tokens[:num_accepted + 1]
    num_accepted: jax.Array  # [R] int32 drafts kept
    logprob: jax.Array  # [R, K+1] float32 of `tokens` under the target's log_softmax
    top_ids: jax.Array  # [R, K+1, n] int32, most likely first
    top_logprobs: jax.Array  # [R, K+1, n] float32
    next_drafts: jax.Array  # [R, K] int32 the next pass's drafts (method "heads"; zeros otherwise)


@functools.partial(jax.jit, static_argnames=("config", "dtype"), donate_argnames=("kv_cache",))
def speculative_step(params, kv_cache, batch: SpeculativeBatch, *, config: ModelConfig, dtype):
    """params, kv_cache: the target's, or (target, draft) pairs for method "draft"; for method "heads"
    params is (target, draft heads) and kv_cache the target's."""
    step_batch = batch.step
    if batch.method == "heads":
        params, heads = params
    with kernel_scope(step_batch.kernels):
        if batch.method == "draft":
            (params, draft_params), (kv_cache, draft_cache) = params, kv_cache
            drafts, draft_probs, draft_cache = _model_drafts(draft_params, draft_cache, batch, dtype)
        elif batch.method == "self":
            drafts, draft_probs, kv_cache = _self_drafts(params, kv_cache, batch, config, dtype)
        else:
            drafts, draft_probs = batch.draft_tokens, None
        rows, width = batch.verify_index.shape
        is_draft = jnp.arange(1, width)[None, :] <= batch.num_drafts[:, None]  # [R, K]
        tokens = step_batch.tokens.at[jnp.where(is_draft, batch.verify_index[:, 1:], step_batch.tokens.shape[0])].set(drafts, mode="drop")
        backend = PagedAttention(
            step_batch.slots, step_batch.page_table, step_batch.kv_lens, step_batch.query_start, step_batch.kernels
        )
        logits, kv_cache, *hidden = Transformer(config, dtype).apply(
            {"params": params}, tokens, step_batch.positions, backend, kv_cache, logits_index=batch.verify_index.reshape(-1),
            return_hidden=batch.method == "heads",
        )
        logits = logits.reshape(rows, width, -1)
        logits = logits.at[:, 0].set(penalised(logits[:, 0], step_batch))  # rows with penalties never have drafts
        output = _verify(logits, drafts, draft_probs, batch)
        if batch.method == "heads":
            next_drafts = _head_drafts(heads, params, hidden[0].reshape(rows, width, -1), output.num_accepted, config, dtype)
            output = output.replace(next_drafts=next_drafts)
    return (kv_cache, draft_cache) if batch.method == "draft" else kv_cache, output


def _head_drafts(heads, params, hidden, num_accepted, config: ModelConfig, dtype):
    """The draft heads on each row's hidden state at its last accepted position, whose LM-head logits
    gave the row's newest token: heads 1..K guess the K tokens after it. hidden: [R, K+1, embed];
    num_accepted: [R] int32 -> [R, K] int32."""
    last = jnp.take_along_axis(hidden, num_accepted[:, None, None], axis=1)[:, 0]  # [R, embed]
    return propose(heads, params, last, hidden.shape[1] - 1, config, dtype)


def _verify(logits, drafts, draft_probs, batch: SpeculativeBatch) -> SpeculativeOutput:
    """logits: [R, K+1, V] target logits; drafts: [R, K] int32; draft_probs: [R, K, V] the distributions
    sampled drafts were drawn from (None: deterministic drafts)."""
    rows, width, vocab = logits.shape
    sampling = batch.step.sampling
    num_drafts = batch.num_drafts
    greedy_accepted, greedy_tokens = accept_greedy(logits, drafts, num_drafts)
    is_greedy = sampling.temperature == 0

    def sampled():
        target_probs = filtered_probs(logits.reshape(rows * width, vocab), _repeat_rows(sampling, width)).reshape(logits.shape)
        q = jax.nn.one_hot(drafts, vocab, dtype=target_probs.dtype) if draft_probs is None else draft_probs
        keys = jax.vmap(lambda key: jax.random.fold_in(_key(key), ACCEPT_STREAM))(sampling.keys)
        accepted, tokens = jax.vmap(_accept_row)(target_probs, q, drafts, num_drafts, keys)
        return jnp.where(is_greedy, greedy_accepted, accepted), jnp.where(is_greedy[:, None], greedy_tokens, tokens)

    accepted, tokens = sampled() if batch.sampled else (greedy_accepted, greedy_tokens)
    normalizer = jax.nn.logsumexp(logits, axis=-1)  # [R, K+1]
    logprob = jnp.take_along_axis(logits, tokens[..., None], axis=-1)[..., 0] - normalizer
    top_values, top_ids = lax.cond(
        jnp.any(sampling.top_logprobs > 0),
        lambda: tuple(lax.top_k(logits, MAX_LOGPROBS)),
        lambda: (jnp.zeros((rows, width, MAX_LOGPROBS), logits.dtype), jnp.zeros((rows, width, MAX_LOGPROBS), jnp.int32)),
    )
    return SpeculativeOutput(tokens, accepted, logprob, top_ids, top_values - normalizer[..., None], jnp.zeros_like(drafts))


def _accept_row(target_probs, draft_probs, drafts, num_drafts, key):
    """One row of `accept_sampled`: [K+1, V], [K, V], [K], [] and a key -> ([] accepted, [K+1] tokens)."""
    accepted, tokens = accept_sampled(target_probs[None], draft_probs[None], drafts[None], num_drafts[None], key)
    return accepted[0], tokens[0]


def _key(raw):
    """raw: [2] uint32 threefry key data -> a typed key."""
    return jax.random.wrap_key_data(raw, impl="threefry2x32")


def _repeat_rows(sampling: SamplingBatch, times: int) -> SamplingBatch:
    """Each row's parameters `times` times in a row: [R] -> [R * times]."""
    return jax.tree.map(lambda column: jnp.repeat(column, times, axis=0), sampling)


def _pick_drafts(logits, spec: SpeculativeBatch, active, draft):
    """The draft of each row from the drafter's logits: argmax for greedy rows, a draw from the filtered
    distribution for sampled ones. logits: [R, V]; active: [R] bool rows still drafting; draft: the
    scalar int32 draft number. Returns (tokens [R] int32, q [R, V] float32 the distribution sampled
    rows drew from; zeros elsewhere)."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if not spec.sampled:
        return greedy, jnp.zeros_like(logits)
    batch = spec.step.sampling
    is_sampled = (batch.temperature > 0) & active
    q = filtered_probs(logits, batch)
    keys = jax.vmap(lambda key: jax.random.fold_in(_key(key), DRAFT_STREAM + draft))(batch.keys)
    drawn = jax.vmap(lambda key, p: jax.random.categorical(key, jnp.log(p)))(keys, q).astype(jnp.int32)
    return jnp.where(is_sampled, drawn, greedy), jnp.where(is_sampled[:, None], q, 0.0)


def _one_token_pass(config: ModelConfig, dtype, params, cache, tokens, batch: SpeculativeBatch, draft, writes):
    """One token per row through a drafter: row r's token at its `draft`-th verify position (draft: a
    scalar int32). tokens: [R] int32; writes: [R] bool rows whose K/V go to the pool (the others write
    the null page).
    Returns (logits [R, V] float32, cache).
    """
    step_batch = batch.step
    index = batch.verify_index[:, draft]  # [R]
    positions = step_batch.positions[index]
    slots = jnp.where(writes, step_batch.slots[index], NULL_SLOT)
    query_start = jnp.arange(index.shape[0] + 1, dtype=jnp.int32)
    backend = PagedAttention(slots, step_batch.page_table, positions + 1, query_start, step_batch.kernels)
    return Transformer(config, dtype).apply({"params": params}, tokens, positions, backend, cache)


def _self_drafts(params, kv_cache, batch: SpeculativeBatch, config: ModelConfig, dtype):
    """Layer-skip drafting: k passes through the target's first `batch.draft_layers` layers.
    Returns (drafts [R, K] int32, q [R, K, V] float32, kv_cache)."""
    layers = batch.draft_layers
    draft_config = config.replace(num_layers=layers, layer_windows=config.layer_windows[:layers], moe_layers=config.moe_layers[:layers])
    def one_draft(carry, draft):
        token, cache = carry
        active = draft < batch.num_drafts
        logits, cache = _one_token_pass(draft_config, dtype, params, cache, token, batch, draft, active)
        token, q = _pick_drafts(logits, batch, active, draft)
        return (token, cache), (token, q)

    last_tokens = batch.step.tokens[batch.verify_index[:, 0]]  # [R]
    draft_ids = jnp.arange(batch.draft_tokens.shape[1], dtype=jnp.int32)
    (_, cache), (drafts, probs) = lax.scan(one_draft, (last_tokens, list(kv_cache[:layers])), draft_ids)
    return drafts.T, probs.transpose(1, 0, 2), cache + list(kv_cache[layers:])


def _model_drafts(draft_params, draft_cache, batch: SpeculativeBatch, dtype):
    """Drafting with a separate model and pool: the whole ragged batch (d_1 from each row's last token),
    then k one-token passes feeding d_1 .. d_k. Returns (drafts [R, K], q [R, K, V], draft_cache)."""
    step_batch = batch.step
    config = batch.draft_config
    backend = PagedAttention(step_batch.slots, step_batch.page_table, step_batch.kv_lens, step_batch.query_start, step_batch.kernels)
    logits, cache = Transformer(config, dtype).apply(
        {"params": draft_params}, step_batch.tokens, step_batch.positions, backend, draft_cache, logits_index=batch.verify_index[:, 0]
    )
    first, first_q = _pick_drafts(logits, batch, 0 < batch.num_drafts, 0)

    def one_draft(carry, draft):  # feeds d_draft, draws d_(draft + 1)
        token, cache = carry
        logits, cache = _one_token_pass(config, dtype, draft_params, cache, token, batch, draft, draft <= batch.num_drafts)
        token, q = _pick_drafts(logits, batch, draft < batch.num_drafts, draft)
        return (token, cache), (token, q)

    width = batch.draft_tokens.shape[1]
    (last, cache), (drafts, probs) = lax.scan(one_draft, (first, cache), jnp.arange(1, width, dtype=jnp.int32))
    _, cache = _one_token_pass(config, dtype, draft_params, cache, last, batch, width, width <= batch.num_drafts)  # d_K's K/V only
    drafts = jnp.concatenate([first[:, None], drafts.T], axis=1)
    return drafts, jnp.concatenate([first_q[:, None], probs.transpose(1, 0, 2)], axis=1), cache
