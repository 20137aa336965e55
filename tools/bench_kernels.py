"""Times each Pallas kernel (on CPU: each native kernel) against the XLA reference the engine runs
without it, at serving shapes.

    python tools/bench_kernels.py [--shapes=small|large] [--dtype=float32|bfloat16] [--repeats=5] [--interpret]

On a TPU or GPU backend both are timed (medians over --repeats calls after a warm-up) and the
kernel's achieved memory bandwidth and FLOP rate are reported, as a share of the device's peak when
its kind is in PEAKS (else the achieved rates only). Bytes are the least each op must move (weights,
the K/V it attends to, its inputs and outputs) and FLOPs the useful multiply-adds, so the shares are
roofline fractions. On CPU the native kernels of `jinfer/native` (few-row matmuls) are timed against
the references, and the other ops' references alone: Pallas kernels have no CPU backend;
--interpret runs the Pallas kernels in Pallas's interpreter instead, which exercises this tool end to
end but says nothing about kernel speed.

Shapes: "large" is Llama-3-8B attention and int8/int4 MLP weights, Mixtral-8x7B experts (the default
on accelerators); "small" is SmolLM2-135M-sized (the default on CPU, where the large ones take minutes).
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from tqdm import tqdm

from jinfer.ops import moe
from jinfer.ops.attention import LayerAttention, paged_attention_reference, write_kv
from jinfer.ops.matmul import dense_matmul, quantized_matmul
from pallas_kernels import quantized_matmul as qmm
from pallas_kernels.ragged_paged_attention import ragged_paged_attention, write_kv_pages
from pallas_kernels.testing import scaled_error

flags.DEFINE_enum("shapes", None, ["small", "large"], "Shape set (default: large on TPU/GPU, small on CPU).")
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Activation dtype (default: bfloat16 on TPU/GPU, float32 on CPU).")
flags.DEFINE_integer("repeats", 5, "Timed calls per op after one warm-up call; the median is reported.")
flags.DEFINE_bool("interpret", False, "On CPU, also run the kernels in Pallas's interpreter (checks the tool, not speed).")
FLAGS = flags.FLAGS

# device_kind substring -> (HBM bytes/s, dense bf16 FLOP/s); the first match wins.
PEAKS = (
    ("H100 PCIe", 2.0e12, 756e12),
    ("H100", 3.35e12, 989e12),
    ("H200", 4.8e12, 989e12),
    ("A100", 2.039e12, 312e12),
    ("TPU v4", 1.228e12, 275e12),
    ("TPU v5 lite", 819e9, 197e12),
    ("TPU v5e", 819e9, 197e12),
    ("TPU v5p", 2.765e12, 459e12),
    ("TPU v5", 2.765e12, 459e12),
    ("TPU v6 lite", 1.64e12, 918e12),
    ("TPU v6e", 1.64e12, 918e12),
)
ACCELERATORS = ("tpu", "gpu", "cuda", "rocm")


@dataclasses.dataclass(frozen=True)
class Shapes:
    """One model's serving shapes."""

    label: str
    heads: int
    kv_heads: int
    head_dim: int
    page_size: int
    decode_rows: int  # decode batch: rows of one token each
    context: int  # tokens in each row's cache
    prefill_rows: int  # rows of one prefill chunk each, at the end of `context` tokens
    prefill_chunk: int
    embed: int  # MLP input features
    mlp: int  # MLP hidden features (dense)
    experts: int
    expert_mlp: int  # hidden features of one expert
    experts_per_token: int
    moe_embed: int
    prefill_tokens: int  # rows of the prefill matmuls


SHAPES = {
    "large": Shapes("Llama-3-8B / Mixtral-8x7B", 32, 8, 128, 16, 64, 2048, 4, 128, 4096, 14336, 8, 14336, 2, 4096, 512),
    "small": Shapes("SmolLM2-135M", 9, 3, 64, 16, 32, 1024, 2, 128, 576, 1536, 8, 1536, 2, 576, 256),
}


@dataclasses.dataclass(frozen=True)
class Case:
    """One op: `make()` builds its inputs; the first `carry` inputs are pools updated in place (donated
    and fed back), the rest read only. reference / kernel(interpret) (the Pallas kernel) / native (the
    CPU kernel) map the inputs to outputs; an op without a Pallas or native kernel has None."""

    name: str
    shape: str
    make: Callable[[], tuple]
    reference: Callable
    kernel: Callable[[bool], Callable] | None
    bytes: int
    flops: int
    carry: int = 0
    native: Callable | None = None


# ----------------------------------------------------------------------------- inputs


def _normal(key: int, shape: tuple[int, ...], dtype) -> jax.Array:
    return jax.random.normal(jax.random.key(key), shape, jnp.float32).astype(dtype)


def _ragged_batch(rows: list[tuple[int, int]], shapes: Shapes, dtype) -> dict:
    """rows: [(q_len, kv_len)] -> the arrays of a ragged attention batch: q [T, H, D], pools
    [num_pages, page_size, K, D], page_table [R, P], kv_lens [R], query_start [R + 1], and the engine's
    positions / token_rows [T]. Each row owns its own (shuffled) pages; page 0 is the null page."""
    q_lens, kv_lens = (np.array(v, np.int32) for v in zip(*rows))
    pages_per_row = -(-int(kv_lens.max()) // shapes.page_size)
    num_pages = len(rows) * pages_per_row + 1
    page_table = np.random.default_rng(0).permutation(np.arange(1, num_pages)).reshape(len(rows), pages_per_row)
    token_rows = np.repeat(np.arange(len(rows)), q_lens)
    query_start = np.concatenate([[0], np.cumsum(q_lens)])
    positions = kv_lens[token_rows] - q_lens[token_rows] + (np.arange(len(token_rows)) - query_start[token_rows])
    pool = (num_pages, shapes.page_size, shapes.kv_heads, shapes.head_dim)
    return dict(
        q=_normal(0, (len(token_rows), shapes.heads, shapes.head_dim), dtype),
        k_pages=_normal(1, pool, dtype),
        v_pages=_normal(2, pool, dtype),
        page_table=jnp.asarray(page_table, jnp.int32),
        kv_lens=jnp.asarray(kv_lens),
        query_start=jnp.asarray(query_start, jnp.int32),
        positions=jnp.asarray(positions, jnp.int32),
        token_rows=jnp.asarray(token_rows, jnp.int32),
    )


# ----------------------------------------------------------------------------- cases


def attention_case(name: str, rows: list[tuple[int, int]], shapes: Shapes, dtype) -> Case:
    layer = LayerAttention(scale=shapes.head_dim**-0.5)
    itemsize = jnp.dtype(dtype).itemsize
    tokens = sum(q for q, _ in rows)
    visible_keys = sum(sum(range(kv - q + 1, kv + 1)) for q, kv in rows)  # causal: a query at p sees p + 1 keys

    def make():
        batch = _ragged_batch(rows, shapes, dtype)
        keys = ("q", "k_pages", "v_pages", "positions", "token_rows", "page_table", "kv_lens", "query_start")
        return tuple(batch[k] for k in keys)

    def reference(q, k_pages, v_pages, positions, token_rows, page_table, kv_lens, query_start):
        return paged_attention_reference(q, k_pages, v_pages, positions, query_start, kv_lens, page_table, layer)

    def kernel(interpret):
        def run(q, k_pages, v_pages, positions, token_rows, page_table, kv_lens, query_start):
            return ragged_paged_attention(
                q, k_pages, v_pages, kv_lens, page_table, query_start, scale=layer.scale, interpret=interpret
            )

        return run

    kv_bytes = 2 * sum(kv for _, kv in rows) * shapes.kv_heads * shapes.head_dim * itemsize
    return Case(
        name,
        f"{len(rows)} rows x {rows[0][0]} q / {rows[0][1]} kv, H={shapes.heads} K={shapes.kv_heads} D={shapes.head_dim}",
        make,
        reference,
        kernel,
        bytes=kv_bytes + 2 * tokens * shapes.heads * shapes.head_dim * itemsize,
        flops=4 * visible_keys * shapes.heads * shapes.head_dim,
    )


def kv_write_case(shapes: Shapes, dtype) -> Case:
    rows = [(shapes.prefill_chunk, shapes.context)] * shapes.prefill_rows
    tokens = shapes.prefill_rows * shapes.prefill_chunk
    itemsize = jnp.dtype(dtype).itemsize

    def make():
        batch = _ragged_batch(rows, shapes, dtype)
        page_size = shapes.page_size
        slots = batch["page_table"][batch["token_rows"], batch["positions"] // page_size] * page_size + batch["positions"] % page_size
        new = (tokens, shapes.kv_heads, shapes.head_dim)
        return batch["k_pages"], batch["v_pages"], _normal(3, new, dtype), _normal(4, new, dtype), slots

    def reference(k_pages, v_pages, new_k, new_v, slots):
        return write_kv(k_pages, new_k, slots), write_kv(v_pages, new_v, slots)

    def kernel(interpret):
        return functools.partial(write_kv_pages, interpret=interpret)

    return Case(
        "kv write (in place)",
        f"{tokens} tokens, K={shapes.kv_heads} D={shapes.head_dim}, page {shapes.page_size}",
        make,
        reference,
        kernel,
        bytes=2 * 2 * tokens * shapes.kv_heads * shapes.head_dim * itemsize,
        flops=0,
        carry=2,
    )


def moe_case(shapes: Shapes, dtype) -> Case:
    rows = shapes.prefill_tokens * shapes.experts_per_token
    itemsize = jnp.dtype(dtype).itemsize

    def make():
        experts = jax.random.randint(jax.random.key(5), (rows,), 0, shapes.experts)
        group_sizes = jnp.bincount(experts, length=shapes.experts).astype(jnp.int32)
        lhs = _normal(6, (rows, shapes.moe_embed), dtype)
        rhs = _normal(7, (shapes.experts, shapes.expert_mlp, shapes.moe_embed), dtype) * 0.02  # [E, N, K], HF layout
        return lhs, rhs, group_sizes

    def run(kernels, lhs, rhs, group_sizes):
        return moe.grouped_matmul(lhs, rhs, group_sizes, transpose_rhs=True, kernels=kernels)

    return Case(
        "moe grouped matmul",
        f"{rows} rows x {shapes.moe_embed} -> {shapes.expert_mlp}, {shapes.experts} experts",
        make,
        functools.partial(run, "reference"),
        lambda interpret: functools.partial(run, "interpret" if interpret else "pallas"),
        bytes=(shapes.experts * shapes.expert_mlp * shapes.moe_embed + rows * (shapes.moe_embed + shapes.expert_mlp)) * itemsize,
        flops=2 * rows * shapes.moe_embed * shapes.expert_mlp,
    )


def quantized_case(kind: str, rows: int, shapes: Shapes, dtype) -> Case:
    """kind: "int8" (one scale per output channel) or "int4" (groups of 32 input features)."""
    n, k = shapes.mlp, shapes.embed

    def make():
        w = _normal(8, (n, k), jnp.float32) * 0.02
        weights = qmm.quantize_int8(w) if kind == "int8" else qmm.quantize_int4(w, 32)
        return _normal(9, (rows, k), dtype), weights

    def run(kernels, x, weights):
        return quantized_matmul(x, weights, kernels=kernels)

    weight_bytes = n * k if kind == "int8" else n * k // 2 + n * (k // 32) * 4
    return Case(
        f"{kind} matmul",
        f"{rows} x {k} -> {n}" + (" (per channel)" if kind == "int8" else " (groups of 32)"),
        make,
        functools.partial(run, "reference"),
        lambda interpret: functools.partial(run, "interpret" if interpret else "pallas"),
        bytes=weight_bytes + rows * (k + n) * jnp.dtype(dtype).itemsize,
        flops=2 * rows * k * n,
        native=functools.partial(run, "native"),
    )


def dense_case(rows: int, shapes: Shapes, dtype) -> Case:
    """A float matmul of the MLP's shape: XLA's product against the native CPU kernel."""
    n, k = shapes.mlp, shapes.embed

    def make():
        return _normal(10, (rows, k), dtype), _normal(11, (n, k), dtype) * 0.02

    def run(kernels, x, w):
        return dense_matmul(x, w, kernels=kernels)

    return Case(
        "float matmul",
        f"{rows} x {k} -> {n}",
        make,
        functools.partial(run, "reference"),
        None,
        bytes=(n * k + rows * (k + n)) * jnp.dtype(dtype).itemsize,
        flops=2 * rows * k * n,
        native=functools.partial(run, "native"),
    )


SPECULATIVE_ROWS = 5  # a batch-1 verification pass with 4 drafted tokens


def cases(shapes: Shapes, dtype) -> list[Case]:
    decode = [(1, shapes.context)] * shapes.decode_rows
    prefill = [(shapes.prefill_chunk, shapes.context)] * shapes.prefill_rows
    return [
        attention_case("paged attention, decode", decode, shapes, dtype),
        attention_case("paged attention, prefill", prefill, shapes, dtype),
        kv_write_case(shapes, dtype),
        moe_case(shapes, dtype),
        quantized_case("int8", 1, shapes, dtype),
        quantized_case("int8", SPECULATIVE_ROWS, shapes, dtype),
        quantized_case("int8", shapes.prefill_tokens, shapes, dtype),
        quantized_case("int4", 1, shapes, dtype),
        quantized_case("int4", SPECULATIVE_ROWS, shapes, dtype),
        quantized_case("int4", shapes.prefill_tokens, shapes, dtype),
        dense_case(1, shapes, dtype),
        dense_case(SPECULATIVE_ROWS, shapes, dtype),
        dense_case(32, shapes, dtype),
    ]


# ----------------------------------------------------------------------------- timing


def time_op(fn: Callable, inputs: tuple, carry: int, repeats: int) -> tuple[float, object]:
    """-> (median seconds per call, last outputs); the first `carry` inputs are donated and replaced
    by the first `carry` outputs after every call, as the engine feeds its KV pool back."""
    compiled = jax.jit(fn, donate_argnums=tuple(range(carry)))

    def call(args):
        out = jax.block_until_ready(compiled(*args))
        return out, (*out[:carry], *args[carry:]) if carry else args

    out, inputs = call(inputs)  # compile and warm up
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        out, inputs = call(inputs)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), out


def device_peak(device_kind: str) -> tuple[float, float] | None:
    """(HBM bytes/s, bf16 FLOP/s) of the first PEAKS entry in `device_kind`, or None."""
    return next(((bw, flops) for name, bw, flops in PEAKS if name in device_kind), None)


@dataclasses.dataclass
class Row:
    case: Case
    reference_s: float
    kernel_s: float | None = None
    error: float | None = None


def kernel_for(case: Case, accelerated: bool, interpret: bool) -> Callable | None:
    """The Pallas kernel on an accelerator or with --interpret, else the native CPU kernel (or None)."""
    if accelerated or interpret:
        return None if case.kernel is None else case.kernel(interpret)
    return case.native


def measure(case: Case, kernel: Callable | None, repeats: int) -> Row:
    reference_s, expected = time_op(case.reference, case.make(), case.carry, repeats)
    if kernel is None:
        return Row(case, reference_s)
    kernel_s, out = time_op(kernel, case.make(), case.carry, repeats)
    error = max(scaled_error(a, b) for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(expected)))
    return Row(case, reference_s, kernel_s, error)


# ----------------------------------------------------------------------------- report


def _cell(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _cells(row: Row, peak: tuple[float, float] | None, with_kernel: bool) -> dict[str, str]:
    """The table cells of one row; rates are the kernel's, or the reference's when the kernel was not timed."""
    seconds = row.reference_s if row.kernel_s is None else row.kernel_s
    bandwidth, flop_rate = row.case.bytes / seconds, row.case.flops / seconds
    cells = {"op": row.case.name, "shape": row.case.shape, "ref ms": f"{row.reference_s * 1e3:.3f}"}
    if with_kernel:
        timed = row.kernel_s is not None
        cells["kernel ms"] = _cell(row.kernel_s * 1e3 if timed else None, ".3f")
        cells["speed-up"] = _cell(row.reference_s / row.kernel_s if timed else None, ".2f")
    cells["GB/s"] = f"{bandwidth / 1e9:.1f}"
    cells["GFLOP/s"] = _cell(flop_rate / 1e9 if row.case.flops else None, ".1f")
    if peak is not None:
        cells["% peak BW"] = f"{100 * bandwidth / peak[0]:.1f}"
        cells["% peak FLOP"] = _cell(100 * flop_rate / peak[1] if row.case.flops else None, ".1f")
    if with_kernel:
        cells["max err"] = _cell(row.error, ".1e")
    return cells


def format_table(rows: list[Row], peak: tuple[float, float] | None) -> str:
    """A text table; kernel columns only if a kernel ran, peak shares only with a known peak."""
    with_kernel = any(row.kernel_s is not None for row in rows)
    lines = [_cells(row, peak, with_kernel) for row in rows]
    header = list(lines[0])
    widths = {key: max(len(key), *(len(line[key]) for line in lines)) for key in header}
    text = [" | ".join(key.ljust(widths[key]) for key in header), "-+-".join("-" * widths[key] for key in header)]
    text += [" | ".join(line[key].ljust(widths[key]) for key in header) for line in lines]
    return "\n".join(text)


def main(argv):
    del argv
    backend = jax.default_backend()
    accelerated = backend in ACCELERATORS
    shapes = SHAPES[FLAGS.shapes or ("large" if accelerated else "small")]
    dtype = jnp.dtype(FLAGS.dtype or ("bfloat16" if accelerated else "float32"))
    interpret = FLAGS.interpret and not accelerated
    device_kind = jax.devices()[0].device_kind
    peak = device_peak(device_kind) if accelerated else None
    timed = tqdm(cases(shapes, dtype), desc="ops", unit="op")
    rows = [measure(case, kernel_for(case, accelerated, interpret), FLAGS.repeats) for case in timed]
    print(f"device: {device_kind} ({backend}); shapes: {shapes.label}; dtype: {dtype.name}; median of {FLAGS.repeats} calls")
    if not accelerated and FLAGS.interpret:
        print("CPU: kernels run interpreted, a check of results, not of speed; GB/s and GFLOP/s are the interpreter's")
    elif not accelerated:
        print("CPU: native kernels where an op has one, else the XLA reference alone; GB/s and GFLOP/s are the kernel's, else the reference's")
    elif peak is None:
        print(f"no peak figures for {device_kind!r}: achieved rates only")
    print(format_table(rows, peak))


if __name__ == "__main__":
    app.run(main)
