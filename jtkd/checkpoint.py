"""Orbax checkpoints: Flax variables on their own, and whole train states with resume."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp


def save_variables(path: str | Path, variables: Any) -> None:
    """Write a pytree of arrays (e.g. converted {'params', 'batch_stats'}) as an orbax checkpoint."""
    path = Path(path).resolve()
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, variables, force=True)


def load_variables(path: str | Path, target: Any | None = None) -> Any:
    """Read what `save_variables` wrote (onto `target`'s structure/shardings if given)."""
    path = Path(path).resolve()
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(path, target) if target is not None else ckptr.restore(path)
