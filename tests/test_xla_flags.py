"""`jtkd.xla_flags`: entry points add jtkd's CPU flags without overriding the user's, and refuse once
JAX has started (XLA would silently ignore them)."""

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
