"""Test setup: 8 fake CPU devices (for sharding tests) and float32 matmuls at full precision.

XLA_FLAGS must be set before jax is imported anywhere, which is why it lives here.
"""

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# CLI subprocesses keep compiled programs in a per-session temporary cache, never the user's own
# (phi_jax.compile_cache); sharing it across the session's subprocesses also makes them start faster.
if "PHI_JAX_COMPILE_CACHE" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["PHI_JAX_COMPILE_CACHE"] = tempfile.mkdtemp(prefix="phi-jax-test-compile-cache-")
    atexit.register(shutil.rmtree, os.environ["PHI_JAX_COMPILE_CACHE"], True)

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# The suite's own processes compile without the persistent cache: an in-process `cli.main(...)`
# call would turn it on for every later test of that xdist worker, and one such worker aborted
# inside JAX's cache writer (compilation_cache.put_executable_and_time) during an unrelated training
# test. CLI subprocesses still use the session's cache above; tests/test_compile_cache.py tests it.
import phi_jax.compile_cache  # noqa: E402

COMPILE_CACHE_ENABLE = phi_jax.compile_cache.enable  # the real one, for test_compile_cache
phi_jax.compile_cache.enable = lambda *args, **kwargs: None

from gcs_fixture import gcs  # noqa: E402,F401  (the session's fake GCS: `def test_x(gcs)`)

import gc  # noqa: E402

import pytest  # noqa: E402


def _mapped_regions() -> int:
    with open("/proc/self/maps", "rb") as f:
        return sum(1 for _ in f)


def _map_limit() -> int:
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 65530  # Linux's default


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """After a test module, drop JAX's compiled programs once the worker maps a quarter of what
    the kernel allows (vm.max_map_count, 65,530 by default).

    Why: every compiled XLA:CPU program keeps its machine code in memory maps of its own (an
    unrolled SmolLM2 decode program ~1,400 of them), and an xdist worker compiles for hundreds of
    test modules. Measured in a full run, a worker passed 20,000 maps by 60 % of the suite; near
    the end, a worker segfaulted inside XLA's compiler (twice in CI, once here) once mmap could no
    longer give it memory. `jax.clear_caches()` frees them (2,039 -> 582 after a SmolLM2 generate);
    the next module that needs a program compiles it again.
    """
    yield
    if sys.platform.startswith("linux") and _mapped_regions() > _map_limit() // 4:
        jax.clear_caches()
        gc.collect()
