"""The KV page pool: per-layer device arrays of static shape, sized by a printed memory plan.

Layout per layer: k and v each `[num_pages, page_size, num_kv_heads, head_dim]`. A token's K/V
lives at flat slot `page * page_size + offset`; page 0 is the null page that padding points to.
With a mesh the pool is sharded over KV heads (`sharding.kv_pool_sharding`) and the plan counts
the bytes one device holds.

An int8 pool (`EngineConfig.kv_cache_dtype="int8"`) holds int8 k and v plus float32 `k_scale` and
`v_scale` `[num_pages, page_size, num_kv_heads]`: each token's K (V) of each KV head is stored as
`round(x / scale)` with `scale = max|x| / 127` (pallas_kernels.ragged_paged_attention.reference.
quantize_int8), 68 bytes per head of 64 values instead of 256 (float32) or 128 (bfloat16).
"""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jinfer import sharding as sharding_lib
from jinfer.config import KV_CACHE_DTYPES, ModelConfig

NULL_PAGE = 0
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def kv_budget_bytes(text: str | int, device: jax.Device) -> int:
    """'512MiB' / '2GB' / 1048576 -> bytes; '0.8' -> that fraction of the device's free memory."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in _UNITS:
        raise ValueError(f"cannot read a memory size from kv_cache_memory={text!r}; write e.g. 512MiB, 2GB or a fraction like 0.8")
    value, unit = float(match.group(1)), match.group(2)
    if unit or value > 1:
        return int(value * _UNITS[unit.upper()])
    stats = device.memory_stats()
    if not stats or "bytes_limit" not in stats:
        raise ValueError(f"kv_cache_memory={text!r} is a fraction of free memory, but {device.platform} reports none; give a size like 512MiB")
    return int(value * (stats["bytes_limit"] - stats.get("bytes_in_use", 0)))


def format_bytes(count: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= size:
            return f"{count / size:.2f} {unit}"
    return f"{count} B"


def kv_dtype(model_dtype, kv_cache_dtype: str) -> jnp.dtype:
    """The dtype of the pool's K/V values: the model's for "auto", int8 for "int8"."""
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype={kv_cache_dtype!r} is not one of {KV_CACHE_DTYPES} ('auto': the model's dtype)")
    return jnp.dtype(jnp.int8) if kv_cache_dtype == "int8" else jnp.dtype(model_dtype)


def _scale_sharding(sharding: NamedSharding | None) -> NamedSharding | None:
    """The sharding of the [num_pages, page_size, K] scales beside K/V pages sharded as `sharding`."""
    return None if sharding is None else NamedSharding(sharding.mesh, PartitionSpec(*tuple(sharding.spec)[:3]))


def pool_sharding(config: ModelConfig, mesh: Mesh | None) -> NamedSharding | None:
    """Where each K/V pool array lives: the default device without a mesh (None)."""
    return None if mesh is None else sharding_lib.kv_pool_sharding(config.num_kv_heads, config.head_dim, mesh)


def page_bytes(config: ModelConfig, page_size: int, dtype, sharding: NamedSharding | None = None) -> int:
    """Bytes one page takes across all layers (K and V, and their scales for int8) on one device of `sharding`."""
    one_page = abstract_cache(config, 1, page_size, dtype, sharding)[0]
    return config.num_layers * sum(_device_bytes(spec, spec.sharding) for spec in one_page.values())


def _device_bytes(spec: jax.ShapeDtypeStruct, sharding: NamedSharding | None) -> int:
    per_device = spec.shape if sharding is None else sharding.shard_shape(spec.shape)
    return int(np.prod(per_device)) * jnp.dtype(spec.dtype).itemsize


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Bytes on one device: with a mesh, each device's shard of the weights and of the pool."""

    weight_bytes: int
    page_size: int
    num_pages: int  # including the null page
    bytes_per_page: int
    step_temp_bytes: int | None

    @property
    def kv_bytes(self) -> int:
        return self.num_pages * self.bytes_per_page

    @property
    def max_tokens_in_flight(self) -> int:
        return (self.num_pages - 1) * self.page_size

    def table(self) -> str:
        rows = [
            ("weights", format_bytes(self.weight_bytes)),
            ("KV pages", f"{format_bytes(self.kv_bytes)} ({self.num_pages} pages x {format_bytes(self.bytes_per_page)}, page 0 reserved)"),
            ("page size", f"{self.page_size} tokens"),
            ("max tokens in flight", str(self.max_tokens_in_flight)),
            ("step temporaries", "n/a" if self.step_temp_bytes is None else format_bytes(self.step_temp_bytes)),
        ]
        width = max(len(name) for name, _ in rows)
        return "memory plan (per device)\n" + "\n".join(f"  {name:<{width}}  {value}" for name, value in rows)


def plan_memory(
    config: ModelConfig,
    params,
    page_size: int,
    kv_cache_memory: int,
    dtype,
    step_temp_bytes: int | None = None,
    kv_sharding: NamedSharding | None = None,
) -> MemoryPlan:
    """How many pages fit in `kv_cache_memory` bytes per device; errors name the budget when not even two do."""
    weight_bytes = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(params))
    per_page = page_bytes(config, page_size, dtype, kv_sharding)
    num_pages = kv_cache_memory // per_page
    if num_pages < 2:
        raise ValueError(
            f"kv_cache_memory={format_bytes(kv_cache_memory)} holds {num_pages} pages of {format_bytes(per_page)}; "
            "at least 2 (the null page and one usable page) are needed"
        )
    return MemoryPlan(weight_bytes, page_size, int(num_pages), per_page, step_temp_bytes)


def plan_device_memory(config: ModelConfig, weight_bytes: int, device_memory: int, page_size: int, dtype, max_model_len: int) -> MemoryPlan:
    """The plan when the weights and the KV pool share `device_memory` bytes: the pages get what the
    weights leave. `weight_bytes` may come from `jax.eval_shape` (jinfer.quantize.parameter_bytes), so
    a model is planned without allocating it. Raises ValueError naming the sizes when that leaves no
    room for one sequence of `max_model_len` tokens (plus the null page)."""
    per_page = page_bytes(config, page_size, dtype)
    needed_pages = -(-max_model_len // page_size) + 1
    free = device_memory - weight_bytes
    if free < needed_pages * per_page:
        raise ValueError(
            f"weights of {format_bytes(weight_bytes)} leave {format_bytes(max(free, 0))} of device_memory={format_bytes(device_memory)}; "
            f"one sequence of max_model_len={max_model_len} tokens needs {needed_pages} pages of {format_bytes(per_page)}"
        )
    return MemoryPlan(weight_bytes, page_size, int(free // per_page), per_page, None)


def abstract_cache(config: ModelConfig, num_pages: int, page_size: int, dtype, sharding: NamedSharding | None = None):
    """Shapes of the pool: a list over layers of {"k", "v"} ShapeDtypeStructs (with `sharding`), plus
    {"k_scale", "v_scale"} float32 [num_pages, page_size, K] when `dtype` is int8."""
    shape = (num_pages, page_size, config.num_kv_heads, config.head_dim)
    array = jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
    layer = {"k": array, "v": array}
    if jnp.dtype(dtype) == jnp.int8:
        scales = jax.ShapeDtypeStruct(shape[:3], jnp.float32, sharding=_scale_sharding(sharding))
        layer.update(k_scale=scales, v_scale=scales)
    return [dict(layer) for _ in range(config.num_layers)]


def _filler(value: float, dtype) -> jax.Array:
    """What `fill` means for an array of `dtype`: int8 codes are set to 0, so that a NaN poison
    reaches an int8 pool through its float32 scales."""
    return jnp.asarray(value if jnp.issubdtype(dtype, jnp.floating) else 0, dtype)


def allocate_cache(config: ModelConfig, num_pages: int, page_size: int, dtype, fill: float = 0.0, sharding: NamedSharding | None = None):
    """The pool, every slot set to `fill` (tests poison it with NaN; an int8 pool's scales take it,
    its codes are 0); with `sharding` each device allocates only its own shard."""
    specs = abstract_cache(config, num_pages, page_size, dtype, sharding)
    # Committed to its device like the pool each step returns, so the first step compiles what all others run.
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda spec: spec.sharding or default, specs)

    def pool():  # one program for every layer's arrays: a warm start dispatches one op, not 60
        return jax.tree.map(lambda spec: jnp.full(spec.shape, _filler(fill, spec.dtype), spec.dtype), specs)

    return jax.jit(pool, out_shardings=shardings)()


@functools.partial(jax.jit, donate_argnums=0)
def fill_pages(cache, pages, value):
    """Sets every slot of `pages` ([n] int32) to `value` in every layer's K and V (int8 pools: the scales)."""
    return jax.tree.map(lambda layer: layer.at[pages].set(_filler(value, layer.dtype)), cache)


def slots_for(pages: np.ndarray, positions: np.ndarray, page_size: int) -> np.ndarray:
    """Flat cache slots of `positions` ([n] ints) in a sequence whose pages are `pages` ([n_pages])."""
    return pages[positions // page_size] * page_size + positions % page_size
