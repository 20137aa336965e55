"""Ragged paged attention and the KV-page write as Pallas kernels, for TPU (Mosaic) and GPU (Triton).

Both attention variants share one plan, computed with XLA ops before the kernel: each row's
queries are cut into blocks of `block_q`, and the blocks of all rows are laid out one after
the other (a row's last block is padded with unused query slots). A kernel program owns one
block: it reads the block's queries, walks only the pages its queries can see (causal, and the
window if any) with an online softmax, and writes the block's outputs, so blocks never overlap
and rows never mix. The outputs are then gathered back to the packed token order, padding tokens
set to 0.

TPU: kv_lens / page_table / query_start and the block plan are scalar-prefetched into SMEM; one
grid step per query block, all heads at once; the row's pages stay in HBM and are copied by DMA,
`pages_per_block` pages at a time, double-buffered, into VMEM; each KV head's keys are read out
of the page buffer by indexing its head (sublane) and meet the queries of its head group as one
[block_q * group, D] matrix. GPU: one program per (query block, query head); keys are gathered by
slot with masked loads, `pages_per_block` pages per loop step.

Requirements not checked (they are data): q_len <= kv_len <= P * page_size for every row,
query_start non-decreasing with query_start[R] <= T, page ids < num_pages.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(jnp.bfloat16))
MASKED = -1e30  # logit of a hidden key: finite, so an all-hidden block keeps the running max finite
LANES = 128


# ----------------------------------------------------------------------------- validation


def _fail(message: str):
    raise ValueError(message)


def check_attention_inputs(q, k_pages, v_pages, kv_lens, page_table, query_start, k_scales, v_scales, window, softcap):
    """Raises ValueError naming the first bad shape, dtype or setting; all arguments as in the public function."""
    if q.ndim != 3:
        _fail(f"q must be [T, H, D], got shape {q.shape}")
    if k_pages.ndim != 4:
        _fail(f"k_pages must be [num_pages, page_size, K, D], got shape {k_pages.shape}")
    if v_pages.shape != k_pages.shape:
        _fail(f"v_pages shape {v_pages.shape} != k_pages shape {k_pages.shape}")
    num_heads, head_dim = q.shape[1:]
    kv_heads = k_pages.shape[2]
    if k_pages.shape[3] != head_dim:
        _fail(f"k_pages head_dim {k_pages.shape[3]} != q head_dim {head_dim}")
    if num_heads % kv_heads:
        _fail(f"query heads H={num_heads} is not a multiple of KV heads K={kv_heads}")
    if page_table.ndim != 2:
        _fail(f"page_table must be [R, P], got shape {page_table.shape}")
    num_rows = page_table.shape[0]
    if kv_lens.shape != (num_rows,):
        _fail(f"kv_lens shape {kv_lens.shape} != (R,) = ({num_rows},)")
    if query_start.shape != (num_rows + 1,):
        _fail(f"query_start shape {query_start.shape} != (R + 1,) = ({num_rows + 1},)")
    for name, array in (("kv_lens", kv_lens), ("page_table", page_table), ("query_start", query_start)):
        if array.dtype != jnp.int32:
            _fail(f"{name} must be int32, got {array.dtype}")
    _check_page_dtypes(q, k_pages, v_pages, k_scales, v_scales)
    if window < 0:
        _fail(f"window must be >= 0, got {window}")
    if softcap is not None and softcap <= 0:
        _fail(f"softcap must be > 0 or None, got {softcap}")


def _check_page_dtypes(q, k_pages, v_pages, k_scales, v_scales):
    """q: [T, H, D]; pages: [num_pages, page_size, K, D]; scales: [num_pages, page_size, K] or None."""
    if np.dtype(q.dtype) not in FLOAT_DTYPES:
        _fail(f"q dtype must be float32 or bfloat16, got {q.dtype}")
    _check_scales(k_pages, v_pages, k_scales, v_scales)
    if k_scales is None and k_pages.dtype != q.dtype:
        _fail(f"k_pages dtype {k_pages.dtype} != q dtype {q.dtype}")


def _check_scales(k_pages, v_pages, k_scales, v_scales):
    """pages: [num_pages, page_size, K, D]; scales: [num_pages, page_size, K] float32, given iff the pages are int8."""
    if k_pages.dtype != v_pages.dtype:
        _fail(f"k_pages dtype {k_pages.dtype} != v_pages dtype {v_pages.dtype}")
    if (k_scales is None) != (v_scales is None):
        _fail("k_scales and v_scales must be given together")
    quantized = k_scales is not None
    if quantized != (k_pages.dtype == jnp.int8):
        _fail(f"scales must be given iff the pages are int8; pages are {k_pages.dtype}, scales given: {quantized}")
    if quantized:
        for name, scales in (("k_scales", k_scales), ("v_scales", v_scales)):
            if scales.shape != k_pages.shape[:3] or scales.dtype != jnp.float32:
                _fail(f"{name} must be float32 {k_pages.shape[:3]}, got {scales.dtype} {scales.shape}")
    elif np.dtype(k_pages.dtype) not in FLOAT_DTYPES:
        _fail(f"pages must be float32, bfloat16, or int8 with scales; got {k_pages.dtype}")


# ----------------------------------------------------------------------------- query blocks (XLA)


class QueryBlocks(NamedTuple):
    """How the packed queries map onto fixed-size blocks, each block holding queries of one row."""

    row: jax.Array  # [N] int32 row of each block (clamped to R - 1 for unused blocks)
    first_query: jax.Array  # [N] int32 index within its row of the block's first query (>= q_len: unused)
    source: jax.Array  # [N * block_q] int32 packed token read into each block slot
    slot: jax.Array  # [T] int32 block slot holding each token's output (0 for padding tokens)
    real: jax.Array  # [T] bool, False for padding tokens


def plan_query_blocks(query_start, num_tokens: int, block_q: int) -> QueryBlocks:
    """query_start: [R + 1] int32 -> the block plan; N = cdiv(T, block_q) + R blocks always suffice."""
    num_rows = query_start.shape[0] - 1
    num_blocks = pl.cdiv(num_tokens, block_q) + num_rows
    q_lens = query_start[1:] - query_start[:-1]
    counts = (q_lens + block_q - 1) // block_q
    ends = jnp.cumsum(counts).astype(jnp.int32)
    begins = ends - counts
    blocks = jnp.arange(num_blocks, dtype=jnp.int32)
    row = jnp.searchsorted(ends, blocks, side="right").astype(jnp.int32)
    used = row < num_rows
    row = jnp.minimum(row, num_rows - 1)
    first_query = jnp.where(used, (blocks - begins[row]) * block_q, num_tokens)
    offsets = jnp.arange(block_q, dtype=jnp.int32)
    source = jnp.clip(query_start[row, None] + first_query[:, None] + offsets, 0, num_tokens - 1).reshape(-1)

    tokens = jnp.arange(num_tokens, dtype=jnp.int32)
    token_row = jnp.minimum(jnp.searchsorted(query_start[1:], tokens, side="right"), num_rows - 1)
    local = tokens - query_start[token_row]
    real = tokens < query_start[num_rows]
    slot = jnp.where(real, (begins[token_row] + local // block_q) * block_q + local % block_q, 0)
    return QueryBlocks(row, first_query, source, slot, real)


def unblock(out_blocks, plan: QueryBlocks):
    """out_blocks: [N * block_q, H, D] -> [T, H, D] in packed token order, padding tokens exactly 0."""
    out = out_blocks[plan.slot]
    return jnp.where(plan.real[:, None, None], out, jnp.zeros((), out.dtype))


class BlockSpan(NamedTuple):
    """The keys a query block can see, as scalars computed inside a kernel."""

    count: jax.Array  # number of real queries in the block (0 for an unused block)
    first_position: jax.Array  # sequence position of the block's first query
    key_begin: jax.Array  # first visible key position
    key_end: jax.Array  # one past the last visible key position
    first_page: jax.Array  # index in the row's page list of the page holding key_begin
    end_page: jax.Array  # one past the index of the page holding the last visible key
    num_chunks: jax.Array  # number of chunks of pages_per_block pages covering [key_begin, key_end)


def block_span(q_len, kv_len, first_query, *, block_q: int, window: int, page_size: int, pages_per_block: int):
    """Scalars of one row (q_len, kv_len) and block (first_query) -> the block's BlockSpan.

    Divisions are lax.div (truncating) on non-negative values: jnp's floor division lowers through
    `sign`, which the TPU lowering can only emit knowing the chip generation.
    """
    count = jnp.clip(q_len - first_query, 0, block_q)
    first_position = kv_len - q_len + first_query
    key_end = first_position + count
    key_begin = jnp.maximum(first_position - window + 1, 0) if window else jnp.int32(0)
    first_page = lax.div(key_begin, page_size)
    end_page = jnp.where(count > 0, lax.div(jnp.maximum(key_end, 0) + page_size - 1, page_size), first_page)
    num_chunks = lax.div(end_page - first_page + pages_per_block - 1, pages_per_block)
    return BlockSpan(count, first_position, key_begin, key_end, first_page, end_page, num_chunks)


# ----------------------------------------------------------------------------- online softmax (shared)


class Softmax(NamedTuple):
    """Running state of an online softmax over key chunks, one entry per query row."""

    peak: jax.Array  # [rows, 1] float32 largest logit so far (MASKED until a key is seen)
    total: jax.Array  # [rows, 1] float32 sum of exp(logit - peak)
    acc: jax.Array  # [rows, D] float32 sum of exp(logit - peak) * value

    @classmethod
    def start(cls, rows: int, head_dim: int) -> Softmax:
        return cls(
            jnp.full((rows, 1), MASKED, jnp.float32),
            jnp.zeros((rows, 1), jnp.float32),
            jnp.zeros((rows, head_dim), jnp.float32),
        )

    def update(self, logits, visible, values) -> Softmax:
        """logits: [rows, n] float32; visible: [rows, n] bool; values: [n, D] (hidden keys' rows zeroed)."""
        logits = jnp.where(visible, logits, MASKED)
        peak = jnp.maximum(self.peak, jnp.max(logits, axis=1, keepdims=True))
        weights = jnp.where(visible, jnp.exp(logits - peak), 0.0)
        rescale = jnp.exp(self.peak - peak)
        total = rescale * self.total + jnp.sum(weights, axis=1, keepdims=True)
        acc = rescale * self.acc + jnp.dot(
            weights.astype(values.dtype), values, precision=_precision(values.dtype), preferred_element_type=jnp.float32
        )
        return Softmax(peak, total, acc)

    def result(self):
        """-> [rows, D] float32; rows that saw no key give 0."""
        return jnp.where(self.total > 0, self.acc / jnp.where(self.total > 0, self.total, 1.0), 0.0)


def _precision(dtype):
    """Full float32 products for float32 inputs (TPUs would otherwise multiply in bfloat16)."""
    return lax.Precision.HIGHEST if dtype == jnp.float32 else None


def score(queries, keys, *, scale: float, softcap: float | None):
    """queries: [rows, D]; keys: [n, D] -> [rows, n] float32 logits (scaled, soft-capped)."""
    logits = lax.dot_general(
        queries, keys, (((1,), (1,)), ((), ())), precision=_precision(queries.dtype), preferred_element_type=jnp.float32
    )
    logits = logits * scale
    if softcap:
        logits = jnp.tanh(logits / softcap) * softcap
    return logits


def visibility(query_positions, key_positions, span: BlockSpan, window: int):
    """query_positions: [rows, 1] (or [rows, n]); key_positions: [1, n] (or [rows, n]) -> [rows, n] bool."""
    last_query = span.first_position + span.count
    visible = (key_positions <= query_positions) & (query_positions < last_query)
    if window:
        visible &= key_positions > query_positions - window
    return visible


def dequantized(values, scales, dtype):
    """values: [n, D] int8 (or float); scales: [n, 1] float32 or None -> [n, D] in dtype."""
    if scales is None:
        return values.astype(dtype)
    return (values.astype(jnp.float32) * scales).astype(dtype)


# ----------------------------------------------------------------------------- TPU (Mosaic)


def _head_rows(buffer, head: int):
    """buffer: VMEM ref [pages, page_size, K, D] -> [pages * page_size, D] rows of one KV head."""
    pages, page_size, _, head_dim = buffer.shape
    return buffer[:, :, head, :].reshape(pages * page_size, head_dim)


def _head_scales(buffer, head: int):
    """buffer: VMEM ref [pages, page_size, K] float32 -> [pages * page_size, 1] scales of one KV head."""
    pages, page_size, _ = buffer.shape
    return buffer[:, :, head : head + 1].reshape(pages * page_size, 1)


class _PageFetcher:
    """Double-buffered DMA of a row's pages (K, V and, for int8, their scales) from HBM into VMEM."""

    def __init__(self, sources, buffers, sems, page_table_ref, row, span: BlockSpan, pages_per_block: int):
        """sources: HBM refs [num_pages, ...]; buffers: VMEM refs [2, pages_per_block, ...]; sems: DMA [2]."""
        self.sources, self.buffers, self.sems = sources, buffers, sems
        self.page_table_ref, self.row = page_table_ref, row
        self.first_page, self.end_page, self.pages_per_block = span.first_page, span.end_page, pages_per_block

    def _copies(self, chunk, slot):
        """-> [(condition, [async copies])] one entry per page of the chunk."""
        last = self.page_table_ref.shape[1] - 1
        entries = []
        for i in range(self.pages_per_block):
            index = self.first_page + chunk * self.pages_per_block + i
            page = self.page_table_ref[self.row, jnp.minimum(index, last)]
            copies = [
                pltpu.make_async_copy(source.at[page], buffer.at[slot, i], self.sems.at[slot])
                for source, buffer in zip(self.sources, self.buffers)
            ]
            entries.append((index < self.end_page, copies))
        return entries

    def start(self, chunk, slot):
        self._each(chunk, slot, lambda copy: copy.start())

    def wait(self, chunk, slot):
        self._each(chunk, slot, lambda copy: copy.wait())

    def _each(self, chunk, slot, action):
        for condition, copies in self._copies(chunk, slot):

            @pl.when(condition)
            def _(copies=copies):
                for copy in copies:
                    action(copy)


def _tpu_kernel(
    kv_lens_ref,  # SMEM [R]
    page_table_ref,  # SMEM [R, P]
    query_start_ref,  # SMEM [R + 1]
    block_row_ref,  # SMEM [N]
    block_first_ref,  # SMEM [N]
    q_ref,  # VMEM [block_q, H, D]
    *refs,
    scale: float,
    window: int,
    softcap: float | None,
    quantized: bool,
    pages_per_block: int,
):
    """One query block: refs are the HBM pages (and scales), the output block, VMEM buffers, DMA sems."""
    num_sources = 4 if quantized else 2
    sources, (o_ref,), buffers, (sems,) = (
        refs[:num_sources],
        refs[num_sources : num_sources + 1],
        refs[num_sources + 1 : -1],
        refs[-1:],
    )
    block_q, num_heads, head_dim = q_ref.shape
    page_size, kv_heads = buffers[0].shape[2], buffers[0].shape[3]
    groups = num_heads // kv_heads
    block = pl.program_id(0)
    row, first_query = block_row_ref[block], block_first_ref[block]
    q_len = query_start_ref[row + 1] - query_start_ref[row]
    span = block_span(
        q_len, kv_lens_ref[row], first_query,
        block_q=block_q, window=window, page_size=page_size, pages_per_block=pages_per_block,
    )
    fetcher = _PageFetcher(sources, buffers, sems, page_table_ref, row, span, pages_per_block)
    queries = [_group_queries(q_ref, h, groups) for h in range(kv_heads)]
    rows = block_q * groups
    query_positions = span.first_position + lax.div(lax.broadcasted_iota(jnp.int32, (rows, 1), 0), groups)
    chunk_len = pages_per_block * page_size

    def body(chunk, states):
        slot = lax.rem(chunk, 2)
        pl.when(chunk + 1 < span.num_chunks)(lambda: fetcher.start(chunk + 1, 1 - slot))
        fetcher.wait(chunk, slot)
        first_key = (span.first_page + chunk * pages_per_block) * page_size
        key_positions = first_key + lax.broadcasted_iota(jnp.int32, (1, chunk_len), 1)
        visible = visibility(query_positions, key_positions, span, window)
        key_rows = first_key + lax.broadcasted_iota(jnp.int32, (chunk_len, 1), 0)
        in_span = (key_rows >= span.key_begin) & (key_rows < span.key_end)
        return tuple(
            _tpu_head_step(states[h], queries[h], [b.at[slot] for b in buffers], h, visible, in_span, scale, softcap)
            for h in range(kv_heads)
        )

    pl.when(span.num_chunks > 0)(lambda: fetcher.start(0, 0))
    states = lax.fori_loop(0, span.num_chunks, body, tuple(Softmax.start(rows, head_dim) for _ in range(kv_heads)))
    for h in range(kv_heads):
        out = states[h].result().reshape(block_q, groups, head_dim)
        o_ref[:, h * groups : (h + 1) * groups, :] = out.astype(o_ref.dtype)


def _group_queries(q_ref, head: int, groups: int):
    """q_ref: [block_q, H, D] -> [block_q * groups, D] queries of KV head `head`, row = query * groups + g."""
    block_q, _, head_dim = q_ref.shape
    queries = q_ref[:, head * groups : (head + 1) * groups, :]
    if groups % (4 // queries.dtype.itemsize):
        return queries.astype(jnp.float32).reshape(block_q * groups, head_dim).astype(queries.dtype)
    return queries.reshape(block_q * groups, head_dim)


def _tpu_head_step(state: Softmax, queries, buffers, head: int, visible, in_span, scale, softcap) -> Softmax:
    """One chunk of one KV head. queries: [rows, D]; buffers: this slot's VMEM refs (K, V[, K scales, V scales]);
    visible: [rows, n] bool; in_span: [n, 1] bool, False for keys outside the block's span (stale buffer rows)."""
    k_scales = v_scales = None
    if len(buffers) == 4:
        k_scales, v_scales = _head_scales(buffers[2], head), _head_scales(buffers[3], head)
    keys = dequantized(_head_rows(buffers[0], head), k_scales, queries.dtype)
    values = dequantized(_head_rows(buffers[1], head), v_scales, queries.dtype)
    values = jnp.where(in_span, values, jnp.zeros((), values.dtype))
    return state.update(score(queries, keys, scale=scale, softcap=softcap), visible, values)


def ragged_paged_attention_tpu(
    q,  # [T, H, D]
    k_pages,  # [num_pages, page_size, K, D]
    v_pages,  # [num_pages, page_size, K, D]
    kv_lens,  # [R] int32
    page_table,  # [R, P] int32
    query_start,  # [R + 1] int32
    *,
    scale: float,
    window: int = 0,
    softcap: float | None = None,
    k_scales=None,  # [num_pages, page_size, K] float32, iff the pages are int8
    v_scales=None,  # [num_pages, page_size, K] float32, iff the pages are int8
    block_q: int = 16,
    pages_per_block: int | None = None,
    interpret: bool = False,
):
    """The Mosaic TPU variant -> [T, H, D] in q.dtype. pages_per_block defaults to 128 keys per chunk."""
    check_attention_inputs(q, k_pages, v_pages, kv_lens, page_table, query_start, k_scales, v_scales, window, softcap)
    num_tokens, num_heads, head_dim = q.shape
    page_size = k_pages.shape[1]
    pages_per_block = pages_per_block or max(1, LANES // page_size)
    plan = plan_query_blocks(query_start, num_tokens, block_q)
    quantized = k_scales is not None
    sources = (k_pages, v_pages, k_scales, v_scales) if quantized else (k_pages, v_pages)
    block_spec = pl.BlockSpec((block_q, num_heads, head_dim), lambda block, *_: (block, 0, 0))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=5,
        grid=(plan.row.shape[0],),
        in_specs=[block_spec] + [pl.BlockSpec(memory_space=pl.ANY)] * len(sources),
        out_specs=block_spec,
        scratch_shapes=[pltpu.VMEM((2, pages_per_block, *s.shape[1:]), s.dtype) for s in sources]
        + [pltpu.SemaphoreType.DMA((2,))],
    )
    kernel = functools.partial(
        _tpu_kernel, scale=scale, window=window, softcap=softcap, quantized=quantized, pages_per_block=pages_per_block
    )
    out_blocks = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((plan.source.shape[0], num_heads, head_dim), q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
        interpret=pltpu.InterpretParams() if interpret else False,
        name="ragged_paged_attention_tpu",
    )(kv_lens, page_table, query_start, plan.row, plan.first_query, q[plan.source], *sources)
    return unblock(out_blocks, plan)


# ----------------------------------------------------------------------------- GPU (Triton)


def _gpu_kernel(
    kv_lens_ref,  # [R]
    page_table_ref,  # [R, P]
    query_start_ref,  # [R + 1]
    block_row_ref,  # [N]
    block_first_ref,  # [N]
    q_ref,  # [block_q, D] one query head of one block
    *refs,
    scale: float,
    window: int,
    softcap: float | None,
    groups: int,
    pages_per_block: int,
):
    """One (query block, query head): refs are the pages [num_pages, page_size, K, D] (and, for int8,
    scales [num_pages, page_size, K]) followed by the output block [block_q, D]."""
    *sources, o_ref = refs
    block_q, head_dim = q_ref.shape
    page_size = sources[0].shape[1]
    block, kv_head = pl.program_id(0), lax.div(pl.program_id(1), groups)
    row, first_query = block_row_ref[block], block_first_ref[block]
    q_len = query_start_ref[row + 1] - query_start_ref[row]
    span = block_span(
        q_len, kv_lens_ref[row], first_query,
        block_q=block_q, window=window, page_size=page_size, pages_per_block=pages_per_block,
    )
    queries = q_ref[...]
    query_positions = span.first_position + lax.broadcasted_iota(jnp.int32, (block_q, 1), 0)
    chunk_len = pages_per_block * page_size

    def body(chunk, state: Softmax) -> Softmax:
        first_key = (span.first_page + chunk * pages_per_block) * page_size
        keys_at = first_key + lax.broadcasted_iota(jnp.int32, (chunk_len,), 0)
        in_span = (keys_at >= span.key_begin) & (keys_at < span.key_end)
        page_ids = plgpu.load(page_table_ref.at[row, lax.div(keys_at, page_size)], mask=in_span, other=0)
        keys, values = _gpu_gather_keys(sources, page_ids, lax.rem(keys_at, page_size), kv_head, in_span, queries.dtype)
        visible = visibility(query_positions, keys_at[None, :], span, window)
        return state.update(score(queries, keys, scale=scale, softcap=softcap), visible, values)

    state = lax.fori_loop(0, span.num_chunks, body, Softmax.start(block_q, head_dim))
    o_ref[...] = state.result().astype(o_ref.dtype)


def _gpu_gather_keys(sources, page_ids, offsets, kv_head, in_span, dtype):
    """page_ids, offsets: [n] int32 slot of each key; in_span: [n] bool -> keys, values [n, D] in dtype.

    Keys outside the span are not read: they come back as 0 (so NaN in stale slots never enters).
    """
    k_pages, v_pages = sources[:2]
    shape = (in_span.shape[0], k_pages.shape[3])
    # Every index is an [n, D] array (no slice): the one form both Triton and interpret mode gather with.
    index = (
        jnp.broadcast_to(page_ids[:, None], shape),
        jnp.broadcast_to(offsets[:, None], shape),
        jnp.broadcast_to(kv_head, shape),
        lax.broadcasted_iota(jnp.int32, shape, 1),
    )
    mask = jnp.broadcast_to(in_span[:, None], shape)

    def gather(pages):
        return plgpu.load(pages.at[index], mask=mask, other=0)

    def gather_scales(scales):
        return plgpu.load(scales.at[page_ids, offsets, kv_head], mask=in_span, other=0.0)[:, None]

    if len(sources) == 4:
        k_scales, v_scales = gather_scales(sources[2]), gather_scales(sources[3])
    else:
        k_scales = v_scales = None
    return dequantized(gather(k_pages), k_scales, dtype), dequantized(gather(v_pages), v_scales, dtype)


def ragged_paged_attention_gpu(
    q,  # [T, H, D]
    k_pages,  # [num_pages, page_size, K, D]
    v_pages,  # [num_pages, page_size, K, D]
    kv_lens,  # [R] int32
    page_table,  # [R, P] int32
    query_start,  # [R + 1] int32
    *,
    scale: float,
    window: int = 0,
    softcap: float | None = None,
    k_scales=None,  # [num_pages, page_size, K] float32, iff the pages are int8
    v_scales=None,  # [num_pages, page_size, K] float32, iff the pages are int8
    block_q: int = 16,
    pages_per_block: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
    interpret: bool = False,
):
    """The Triton GPU variant -> [T, H, D] in q.dtype. block_q, D and pages_per_block * page_size must
    be powers of two and >= 16 (Triton's dot); pages_per_block defaults to 64 keys per chunk."""
    check_attention_inputs(q, k_pages, v_pages, kv_lens, page_table, query_start, k_scales, v_scales, window, softcap)
    num_tokens, num_heads, head_dim = q.shape
    page_size, kv_heads = k_pages.shape[1], k_pages.shape[2]
    pages_per_block = pages_per_block or max(1, 64 // page_size)
    for name, size in (("block_q", block_q), ("head_dim", head_dim), ("keys per chunk", pages_per_block * page_size)):
        if size < 16 or size & (size - 1):
            _fail(f"the Triton variant needs {name} a power of two >= 16, got {size}")
    plan = plan_query_blocks(query_start, num_tokens, block_q)
    sources = (k_pages, v_pages) if k_scales is None else (k_pages, v_pages, k_scales, v_scales)
    block_spec = pl.BlockSpec((block_q, None, head_dim), lambda block, head: (block, head, 0))
    kernel = functools.partial(
        _gpu_kernel, scale=scale, window=window, softcap=softcap,
        groups=num_heads // kv_heads, pages_per_block=pages_per_block,
    )
    whole = pl.BlockSpec(memory_space=pl.ANY)
    out_blocks = pl.pallas_call(
        kernel,
        grid=(plan.row.shape[0], num_heads),
        in_specs=[whole] * 5 + [block_spec] + [whole] * len(sources),
        out_specs=block_spec,
        out_shape=jax.ShapeDtypeStruct((plan.source.shape[0], num_heads, head_dim), q.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="ragged_paged_attention_gpu",
    )(kv_lens, page_table, query_start, plan.row, plan.first_query, q[plan.source], *sources)
    return unblock(out_blocks, plan)


# ----------------------------------------------------------------------------- dispatch


def _implementation(implementation: str | None, interpret: bool) -> str:
    """-> "tpu" or "gpu": the named variant, or the one for jax.default_backend()."""
    if implementation in ("tpu", "gpu"):
        return implementation
    if implementation is not None:
        _fail(f"implementation must be None, 'tpu' or 'gpu', got {implementation!r}")
    backend = jax.default_backend()
    if backend in ("tpu", "gpu"):
        return backend
    if interpret:
        return "tpu"
    _fail(
        f"no Pallas kernel runs natively on backend {backend!r}: use the XLA reference "
        "(pallas_kernels.ragged_paged_attention.reference, or jinfer.ops.attention), "
        "or pass interpret=True to run the TPU-style kernel in interpret mode"
    )


def ragged_paged_attention(
    q,  # [T, H, D]
    k_pages,  # [num_pages, page_size, K, D]
    v_pages,  # [num_pages, page_size, K, D]
    kv_lens,  # [R] int32
    page_table,  # [R, P] int32
    query_start,  # [R + 1] int32
    *,
    scale: float,
    window: int = 0,
    softcap: float | None = None,
    k_scales=None,  # [num_pages, page_size, K] float32, iff the pages are int8
    v_scales=None,  # [num_pages, page_size, K] float32, iff the pages are int8
    implementation: str | None = None,
    interpret: bool = False,
):
    """Causal attention of each row's queries (the last q_len of its kv_len tokens) over its paged K/V.

    -> [T, H, D] in q.dtype; padding tokens (index >= query_start[R]) give exactly 0. implementation:
    None picks by jax.default_backend() (another backend needs interpret=True, which runs the
    TPU-style kernel interpreted), "tpu" or "gpu" forces a variant.
    """
    variant = {"tpu": ragged_paged_attention_tpu, "gpu": ragged_paged_attention_gpu}[
        _implementation(implementation, interpret)
    ]
    return variant(
        q, k_pages, v_pages, kv_lens, page_table, query_start,
        scale=scale, window=window, softcap=softcap, k_scales=k_scales, v_scales=v_scales, interpret=interpret,
    )


# ----------------------------------------------------------------------------- KV page write


def check_write_inputs(k_pages, v_pages, new_k, new_v, slots, k_scales, v_scales):
    """Raises ValueError naming the first bad shape or dtype; arguments as in write_kv_pages."""
    if k_pages.ndim != 4 or v_pages.shape != k_pages.shape:
        _fail(f"k_pages, v_pages must be one [num_pages, page_size, K, D] shape, got {k_pages.shape}, {v_pages.shape}")
    if new_k.shape != new_v.shape or new_k.ndim != 3 or new_k.shape[1:] != k_pages.shape[2:]:
        _fail(f"new_k, new_v must be [T, K, D] = [T, *{k_pages.shape[2:]}], got {new_k.shape}, {new_v.shape}")
    if slots.shape != new_k.shape[:1] or slots.dtype != jnp.int32:
        _fail(f"slots must be int32 [T] = [{new_k.shape[0]}], got {slots.dtype} {slots.shape}")
    for name, array in (("new_k", new_k), ("new_v", new_v)):
        if np.dtype(array.dtype) not in FLOAT_DTYPES:
            _fail(f"{name} dtype must be float32 or bfloat16, got {array.dtype}")
    _check_scales(k_pages, v_pages, k_scales, v_scales)
    if k_scales is None and new_k.dtype != k_pages.dtype:
        _fail(f"new_k dtype {new_k.dtype} != pages dtype {k_pages.dtype} (float pages are written as they are)")


def quantize_int8(values):
    """values: [..., D] float -> ([..., D] int8, [...] float32): the reference's symmetric per-vector scheme."""
    values = values.astype(jnp.float32)
    scales = jnp.max(jnp.abs(values), axis=-1) / 127.0
    safe = jnp.where(scales > 0, scales, 1.0)
    quantized = jnp.clip(jnp.floor(values / safe[..., None] + 0.5), -127.0, 127.0).astype(jnp.int8)
    return quantized, scales


def _tpu_write_kernel(slots_ref, new_k_ref, new_v_ref, *refs, quantized: bool):
    """One block of tokens. slots_ref: SMEM [T]; new_k_ref, new_v_ref: VMEM [block, K, D]; refs: the aliased
    HBM inputs (unused), the HBM outputs (pages [num_pages, page_size, K, D], then scales
    [num_pages, page_size, K] if quantized), VMEM buffers for the quantized block if quantized, a DMA sem."""
    num_outputs = 4 if quantized else 2
    outputs = refs[num_outputs : 2 * num_outputs]
    buffers, sem = refs[2 * num_outputs : -1], refs[-1]
    sources = (new_k_ref, new_v_ref)
    if quantized:
        for new_ref, int8_ref, scales_ref in zip(sources, buffers[:2], buffers[2:]):
            values, scales = quantize_int8(new_ref[...])
            int8_ref[...] = values
            scales_ref[...] = scales
        sources = buffers
    block_tokens, page_size = new_k_ref.shape[0], outputs[0].shape[1]
    copies = []
    for i in range(block_tokens):
        slot = slots_ref[pl.program_id(0) * block_tokens + i]
        page, offset = lax.div(slot, page_size), lax.rem(slot, page_size)
        copies += [pltpu.make_async_copy(s.at[i], o.at[page, offset], sem) for s, o in zip(sources, outputs)]
    for copy in copies:
        copy.start()
    for copy in copies:
        copy.wait()


def _write_kv_pages_tpu(k_pages, v_pages, new_k, new_v, slots, k_scales, v_scales, interpret: bool):
    """Arguments as in write_kv_pages -> the updated pages (and scales), written in place by DMA."""
    num_tokens, kv_heads, head_dim = new_k.shape
    block_tokens = math.gcd(num_tokens, 8)  # divides T: every block is full
    quantized = k_scales is not None
    pools = (k_pages, v_pages, k_scales, v_scales) if quantized else (k_pages, v_pages)
    new_spec = pl.BlockSpec((block_tokens, kv_heads, head_dim), lambda block, _: (block, 0, 0))
    anywhere = pl.BlockSpec(memory_space=pl.ANY)
    scratch = []
    if quantized:
        scratch = [pltpu.VMEM((block_tokens, kv_heads, head_dim), jnp.int8)] * 2
        scratch += [pltpu.VMEM((block_tokens, kv_heads), jnp.float32)] * 2
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(num_tokens // block_tokens,),
        in_specs=[new_spec, new_spec] + [anywhere] * len(pools),
        out_specs=[anywhere] * len(pools),
        scratch_shapes=scratch + [pltpu.SemaphoreType.DMA(())],
    )
    return pl.pallas_call(
        functools.partial(_tpu_write_kernel, quantized=quantized),
        grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct(p.shape, p.dtype) for p in pools],
        input_output_aliases={3 + i: i for i in range(len(pools))},
        compiler_params=pltpu.CompilerParams(dimension_semantics=("arbitrary",)),
        interpret=pltpu.InterpretParams() if interpret else False,
        name="write_kv_pages_tpu",
    )(slots, new_k, new_v, *pools)


def _gpu_write_kernel(slots_ref, new_k_ref, new_v_ref, *refs, quantized: bool):
    """One (token, KV head). slots_ref: [T]; new_k_ref, new_v_ref: [D]; refs: the aliased inputs (unused),
    then the outputs: pages [num_pages, page_size, K, D] and, if quantized, scales [num_pages, page_size, K]."""
    outputs = refs[len(refs) // 2 :]
    head = pl.program_id(1)
    page_size = outputs[0].shape[1]
    slot = slots_ref[pl.program_id(0)]
    page, offset = lax.div(slot, page_size), lax.rem(slot, page_size)
    for new_ref, pages_ref, scales_ref in zip((new_k_ref, new_v_ref), outputs[:2], outputs[2:] or (None, None)):
        values = new_ref[...]
        if scales_ref is not None:
            values, scale = quantize_int8(values)
            scales_ref[page, offset, head] = scale
        pages_ref[page, offset, head, :] = values.astype(pages_ref.dtype)


def _write_kv_pages_gpu(k_pages, v_pages, new_k, new_v, slots, k_scales, v_scales, interpret: bool):
    """Arguments as in write_kv_pages -> the updated pages (and scales), written in place by Triton stores."""
    num_tokens, kv_heads, head_dim = new_k.shape
    quantized = k_scales is not None
    pools = (k_pages, v_pages, k_scales, v_scales) if quantized else (k_pages, v_pages)
    whole = pl.BlockSpec(memory_space=pl.ANY)
    new_spec = pl.BlockSpec((None, None, head_dim), lambda token, head: (token, head, 0))
    return pl.pallas_call(
        functools.partial(_gpu_write_kernel, quantized=quantized),
        grid=(num_tokens, kv_heads),
        in_specs=[whole, new_spec, new_spec] + [whole] * len(pools),
        out_specs=[whole] * len(pools),
        out_shape=[jax.ShapeDtypeStruct(p.shape, p.dtype) for p in pools],
        input_output_aliases={3 + i: i for i in range(len(pools))},
        compiler_params=plgpu.CompilerParams(num_warps=1, num_stages=1),
        interpret=interpret,
        name="write_kv_pages_gpu",
    )(slots, new_k, new_v, *pools)


def write_kv_pages(
    k_pages,  # [num_pages, page_size, K, D]
    v_pages,  # [num_pages, page_size, K, D]
    new_k,  # [T, K, D]
    new_v,  # [T, K, D]
    slots,  # [T] int32 flat slot page * page_size + offset (padding tokens: slots of the null page 0)
    *,
    k_scales=None,  # [num_pages, page_size, K] float32, iff the pages are int8
    v_scales=None,  # [num_pages, page_size, K] float32, iff the pages are int8
    implementation: str | None = None,
    interpret: bool = False,
):
    """Stores each token's K/V at its slot, in place (the pools are aliased to the outputs; donate them
    under jit). int8 pages are written quantized (see reference.quantize_int8) with their scales.

    -> (k_pages, v_pages), or (k_pages, v_pages, k_scales, v_scales) for int8 pages. Tokens sharing a
    slot (padding) leave one of their values there. implementation as in ragged_paged_attention.
    """
    check_write_inputs(k_pages, v_pages, new_k, new_v, slots, k_scales, v_scales)
    variant = {"tpu": _write_kv_pages_tpu, "gpu": _write_kv_pages_gpu}[_implementation(implementation, interpret)]
    return tuple(variant(k_pages, v_pages, new_k, new_v, slots, k_scales, v_scales, interpret))
