"""`jtkd.xla_flags`: entry points add jtkd's CPU flags without overriding the user's, and refuse once
JAX has started (XLA would silently ignore them)."""

import subprocess
import sys

import jax
import pytest
from jax._src import xla_bridge

from jtkd import xla_flags


def test_appends_flags_and_keeps_users(monkeypatch):
    monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: False)
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    added = xla_flags.use_cpu_flags(env)
    assert added and all(f in env["XLA_FLAGS"] for f in added)
    assert env["XLA_FLAGS"].startswith("--xla_force_host_platform_device_count=4 ")
    assert xla_flags.use_cpu_flags(env) == []  # idempotent
    name = next(iter(xla_flags.CPU_FLAGS))
    mine = {"XLA_FLAGS": f"{name}=LIBRARY_FUSION_TYPE_DOT"}
    assert xla_flags.use_cpu_flags(mine) == [] and mine["XLA_FLAGS"] == f"{name}=LIBRARY_FUSION_TYPE_DOT"


def test_refuses_after_jax_started():
    jax.devices()
    with pytest.raises(RuntimeError, match="before JAX initialises"):
        xla_flags.use_cpu_flags({})


_FAULTS = """
import ctypes, resource, sys, threading
from jtkd import xla_flags
applied = xla_flags.keep_freed_memory() if sys.argv[1] == "keep" else False
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
def alloc():  # like XLA's temporaries: a large block, written, freed, by a worker thread
    p = libc.malloc(256 * 2**20); ctypes.memset(p, 1, 256 * 2**20); libc.free(p)
faults = []
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = threading.Thread(target=alloc); t.start(); t.join()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, faults[-1])
"""


def test_keep_freed_memory_stops_refaulting_large_blocks():
    def run(mode: str) -> tuple[str, int]:
        out = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, check=True)
        applied, faults = out.stdout.split()
        return applied, int(faults)

    pages = 256 * 2**20 // 4096
    applied, kept = run("keep")
    _, default = run("default")
    assert applied == "True"
    assert default > pages // 2, default  # glibc's default: the block is mmap'd and faulted in afresh
    assert kept < pages // 10, kept
