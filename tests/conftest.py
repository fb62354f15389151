import os

# Before jax is imported anywhere: 4 fake CPU devices for the data-parallel tests, quiet TensorFlow.
# Appended, not set-if-absent, so a user's own XLA_FLAGS keep working and the mesh tests still run.
_DEVICES = "--xla_force_host_platform_device_count"
if _DEVICES not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_DEVICES}=4".strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Many tests compile the same computation (a model's train step, the engine worker in several
# processes): a persistent XLA cache compiles it once per run. The xdist workers and the subprocesses
# tests start inherit the variable, so they share it. Fresh and empty for each run (removed at exit)
# unless the user points JAX_COMPILATION_CACHE_DIR somewhere to reuse it across runs. A size limit
# turns on the cache's file lock, so concurrent workers never read a half-written entry.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache = tempfile.mkdtemp(prefix="jtkd-tests-xla-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(8 << 30))

import torch  # noqa: E402,F401  torch before tensorflow (see README: triton segfault)
import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def four_devices() -> list:
    """The first 4 devices; fails (never skips) where fewer exist, so a data-parallel test can't pass unrun."""
    devices = jax.devices()
    if len(devices) < 4:
        pytest.fail(f"needs 4 devices, found {len(devices)}: XLA_FLAGS={os.environ.get('XLA_FLAGS')!r} "
                    f"lacks {_DEVICES}=4 (tests/conftest.py sets it before jax is imported)")
    return devices[:4]
