"""Orbax checkpoints: Flax variables on their own, and whole train states with resume.

`save_variables` / `load_variables` write one pytree (e.g. converted {'params', 'batch_stats'}).

`TrainCheckpointer` manages a run directory:

    <dir>/state/<step>/   the whole TrainState (step, params, batch_stats, opt_state, rng): resume
    <dir>/best/<step>/    {'params', 'batch_stats'} of the best evaluation so far (by one metric): export

Both are `orbax.checkpoint.CheckpointManager`s. Orbax writes a step into
`<step>.orbax-checkpoint-tmp-*` and renames it when complete, so a write interrupted by a crash or
SIGKILL leaves a temporary directory that `latest_step()` never returns (and that is cleaned up on
the next start): restore always sees the last *complete* checkpoint. Saves are asynchronous (the
train loop continues while arrays are written) unless `async_save=False`.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import flax.serialization
import jax
import numpy as np
import orbax.checkpoint as ocp
from flax.traverse_util import flatten_dict, unflatten_dict


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


def state_to_tree(state: Any) -> dict[str, Any]:
    """The checkpointable part of a TrainState as nested dicts (optax namedtuples become dicts). Fields that
    are None (an optional part a run does not use, e.g. the weight average) are left out, so checkpoints of
    runs without one keep the layout they had before the field existed."""
    tree = flax.serialization.to_state_dict(state)
    if isinstance(tree, dict):
        tree = {k: v for k, v in tree.items() if v is not None}
    return tree


def tree_to_state(template: Any, tree: dict[str, Any]) -> Any:
    want = flax.serialization.to_state_dict(template)
    if isinstance(tree, dict) and isinstance(want, dict):
        tree = {**{k: None for k, v in want.items() if v is None}, **tree}
    return flax.serialization.from_state_dict(template, tree)


def _remove_stale_tmp(directory: Path) -> None:
    """Delete uncommitted writes left by a killed run, synchronously, before orbax starts: its own
    cleanup is asynchronous and races with a resumed run that saves the same step again."""
    if jax.process_index() != 0:
        return
    for sub in ("state", "best"):
        for tmp in (directory / sub).glob("*.orbax-checkpoint-tmp*"):
            shutil.rmtree(tmp, ignore_errors=True)


class CheckpointMismatchError(ValueError):
    """A checkpoint whose tree does not fit the state it is restored into (another model, class
    count, frozen set or optimizer wrote it)."""


def _leaf_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    def name(path: tuple) -> str:
        return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)

    return {name(path): tuple(np.shape(v)) for path, v in leaves}


def _mismatch(saved: dict[str, tuple[int, ...]], want: dict[str, tuple[int, ...]], where: str) -> str | None:
    """Every difference between a checkpoint's leaves and a target's, or None."""
    only_saved = [k for k in saved if k not in want]
    only_want = [k for k in want if k not in saved]
    shapes = [f"{k}: checkpoint {saved[k]}, this run {want[k]}" for k in want if k in saved and saved[k] != want[k]]
    if not (only_saved or only_want or shapes):
        return None
    lines = [f"{where} does not fit this run's state (another model, number of classes, set of trained "
             "parameters or optimizer wrote it):"]
    groups = (("in the checkpoint only", only_saved), ("in this run only", only_want), ("shapes differ", shapes))
    for title, items in groups:
        if items:
            lines += [f"  {len(items)} {title}:"] + [f"    {x}" for x in items[:8]]
            lines += [f"    ... and {len(items) - 8} more"] if len(items) > 8 else []
    lines.append("Resume needs the run's own setup: use a new workdir for a different one (or remove this one).")
    return "\n".join(lines)


def _with_frozen_average(target: Any, saved: dict[str, tuple[int, ...]]) -> dict[str, Any] | None:
    """`target` with a weight average of every parameter, if that is how `saved` differs from it: checkpoints
    written before the average kept only the trainable parameters (the frozen ones are dropped after the
    restore: their average is the parameter itself). None otherwise."""
    ema = target.get("ema") if isinstance(target, dict) else None
    if ema is None:
        return None
    params, have = flatten_dict(target["params"], sep="/"), flatten_dict(ema["params"], sep="/")
    extra = {k.removeprefix("ema/params/") for k in saved if k.startswith("ema/params/")} - set(have)
    if not extra or not extra <= set(params):
        return None
    wide = unflatten_dict({**{k: params[k] for k in extra}, **have}, sep="/")
    return {**target, "ema": {**ema, "params": wide}}


def _float_metrics(metrics: dict[str, Any] | None) -> dict[str, float] | None:
    if metrics is None:
        return None
    return {k: float(np.asarray(v)) for k, v in metrics.items()}


class TrainCheckpointer:
    """Periodic TrainState checkpoints (keep the last `max_to_keep`) and a best-model export.

    best_metric: key of the metrics dict passed to `save_best` (e.g. 'eval/accuracy'); best_mode
    'max' or 'min'. Call `close()` (or use it as a context manager) so pending writes finish.
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        max_to_keep: int | None = 3,
        best_metric: str | None = None,
        best_mode: str = "max",
        async_save: bool = True,
    ) -> None:
        if best_mode not in ("max", "min"):
            raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1 (or None for all), got {max_to_keep}")
        self.directory = Path(directory).resolve()
        self.best_metric, self.best_mode = best_metric, best_mode
        _remove_stale_tmp(self.directory)
        common = {"create": True, "cleanup_tmp_directories": True, "enable_async_checkpointing": async_save}
        self._state = ocp.CheckpointManager(
            self.directory / "state",
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, **common),
            item_handlers=ocp.StandardCheckpointHandler(),  # lets restore read the saved tree's shapes first
        )
        self._best: ocp.CheckpointManager | None = None
        if best_metric is not None:
            self._best = ocp.CheckpointManager(
                self.directory / "best",
                options=ocp.CheckpointManagerOptions(
                    max_to_keep=1,
                    best_fn=lambda m: m[best_metric],
                    best_mode=best_mode,
                    keep_checkpoints_without_metrics=False,
                    **common,
                ),
            )
        self._best_value: float | None = None
        if self._best is not None and (step := self._best.best_step()) is not None:
            stored = self._best.metrics(step) or {}
            self._best_value = float(stored[best_metric]) if best_metric in stored else None

    # -------------------------------------------------------------------------------- state
    def latest_step(self) -> int | None:
        """The newest complete checkpoint (interrupted writes are never listed)."""
        return self._state.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._state.all_steps())

    def save(self, state: Any, *, force: bool = True) -> int:
        """Checkpoint `state` at its own step; returns the step."""
        step = int(jax.device_get(state.step))
        self._state.save(step, args=ocp.args.StandardSave(state_to_tree(state)), force=force)
        return step

    def restore(self, template: Any, step: int | None = None) -> Any:
        """The TrainState at `step` (default: latest), with the structure and shardings of `template`;
        `CheckpointMismatchError` lists every leaf that does not fit it."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint under {self.directory / 'state'}")
        target = state_to_tree(template)
        saved = self._state.item_metadata(step)
        saved_shapes = _leaf_shapes(getattr(saved, "tree", saved))
        where = f"checkpoint step {step} under {self.directory / 'state'}"
        if problem := _mismatch(saved_shapes, _leaf_shapes(target), where):
            wide = _with_frozen_average(target, saved_shapes)
            if wide is None or _mismatch(saved_shapes, _leaf_shapes(wide), where):
                raise CheckpointMismatchError(problem)
            tree = self._state.restore(step, args=ocp.args.StandardRestore(wide))
            keep = flatten_dict(target["ema"]["params"])
            tree["ema"]["params"] = unflatten_dict({k: v for k, v in flatten_dict(tree["ema"]["params"]).items() if k in keep})
            return tree_to_state(template, tree)
        tree = self._state.restore(step, args=ocp.args.StandardRestore(target))
        return tree_to_state(template, tree)

    # --------------------------------------------------------------------------------- best
    def best_step(self) -> int | None:
        return None if self._best is None else self._best.best_step()

    def best_value(self) -> float | None:
        """The best metric value exported so far (this run or a previous one in the directory)."""
        return self._best_value

    def is_better(self, value: float) -> bool:
        best = self.best_value()
        if not math.isfinite(value):
            return False
        if best is None:
            return True
        return value > best if self.best_mode == "max" else value < best

    def save_best(self, state: Any, metrics: dict[str, Any]) -> bool:
        """Export state's variables if metrics[best_metric] beats the best so far; True if saved."""
        if self._best is None:
            raise ValueError("this TrainCheckpointer has no best_metric")
        if self.best_metric not in metrics:
            raise KeyError(f"best_metric {self.best_metric!r} not in metrics {sorted(metrics)}")
        m = _float_metrics(metrics)
        if not self.is_better(m[self.best_metric]):
            return False
        step = int(jax.device_get(state.step))
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        self._best.save(step, args=ocp.args.StandardSave(variables), metrics=m, force=True)
        self._best_value = m[self.best_metric]
        return True

    def restore_best(self, template: Any | None = None) -> tuple[dict[str, Any], dict[str, float]]:
        """({'params', 'batch_stats'}, metrics) of the best checkpoint."""
        step = self.best_step()
        if step is None:
            raise FileNotFoundError(f"no best checkpoint under {self.directory / 'best'}")
        self._best.wait_until_finished()  # type: ignore[union-attr]
        args = ocp.args.StandardRestore(template) if template is not None else ocp.args.StandardRestore()
        return self._best.restore(step, args=args), dict(self._best.metrics(step) or {})  # type: ignore[union-attr]

    # ------------------------------------------------------------------------------ lifecycle
    def wait(self) -> None:
        self._state.wait_until_finished()
        if self._best is not None:
            self._best.wait_until_finished()

    def close(self) -> None:
        self._state.close()
        if self._best is not None:
            self._best.close()

    def __enter__(self) -> TrainCheckpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load_best(directory: str | Path, metric: str, mode: str = "max") -> tuple[dict[str, Any], dict[str, float]]:
    """The best exported variables of a finished run directory and their metrics."""
    with TrainCheckpointer(directory, best_metric=metric, best_mode=mode, async_save=False) as ck:
        return ck.restore_best()
