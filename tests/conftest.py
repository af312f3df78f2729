"""Test setup: 8 fake CPU devices (for sharding tests) and float32 matmuls at full precision.

XLA_FLAGS must be set before jax is imported anywhere, which is why it lives here.
"""

import os

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

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """After a test module, drop JAX's compiled programs once the worker holds a quarter of the
    memory maps the kernel allows (`phi_jax.compile_cache.release_programs_near_map_limit`).

    Why: every compiled XLA:CPU program keeps its code in maps of its own, and an xdist worker
    compiles for hundreds of modules. In a full run a worker reached 64,912 of the 65,530 maps
    (vm.max_map_count) and segfaulted inside XLA's compiler at its next compile (twice in CI).
    """
    yield
    phi_jax.compile_cache.release_programs_near_map_limit(fraction=0.25)
