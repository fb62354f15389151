"""The training loop: exact resume from orbax checkpoints, evaluation, JSONL metrics, PNG plots, tqdm.

    trainer = Trainer(mesh, loss_fn, classification_eval(), config=LoopConfig(steps=1000), workdir="runs/x")
    state, history = trainer.fit(state, ArraySource(train_arrays, batch_size=128, seed=0),
                                 EvalSource(test_arrays, batch_size=256))

Exact resume. The batch of step s is a pure function of (seed, s) (`ArraySource`), the per-step
dropout key is folded from the state's rng and step (`train.step_rng`), and the whole TrainState is
checkpointed, so a run stopped at any point (crash, SIGKILL, preemption) and restarted with the same
arguments continues from its last complete checkpoint and ends bit-identical to an uninterrupted run
(on CPU; GPU reductions are not bitwise deterministic unless XLA is told to be). Metrics rows past the
restored step are dropped from metrics.jsonl, so the log is also what an uninterrupted run writes.

Failure handling. Losses and gradient norms are checked before every log row and every checkpoint:
a NaN/inf stops the run with `NonFiniteError` naming the first bad step, and no checkpoint is
written after it, so the last good checkpoint is what a restart (e.g. with a lower lr) resumes from.

Run directory (`workdir`): config.json (`fit(config=...)`: the run's config, rewritten once a resume
has restored its checkpoint, with every changed field logged), metrics.jsonl, metrics.png,
checkpoints/state/<step>, checkpoints/best/<step> (see `jtkd.checkpoint`). A checkpoint another setup
wrote (model, classes, trained set, optimizer) is a `CheckpointMismatchError` listing the leaves that
do not fit and the config fields that changed, and config.json is left as it was.

Multi-host (GPU/TPU pods, or several CPU processes). Every process runs the same program:

    import jax
    jax.distributed.initialize(               # on TPU pods and SLURM/Open MPI, the arguments are auto-detected
        coordinator_address="10.0.0.1:1234",  # host:port of process 0, reachable by all
        num_processes=4, process_id=int(os.environ["RANK"]))  # 0..num_processes-1, one per host
    mesh = jtkd.train.make_mesh()             # all devices of all hosts on the 'data' axis
    source = ArraySource(arrays, batch_size=GLOBAL_BATCH, seed=0)  # slices the global batch per host

`ArraySource` and `EvalSource` give each process rows [p * B/P, (p + 1) * B/P) of every global batch
of B rows (P = jax.process_count(), p = jax.process_index()); `train.shard_batch` assembles the
global array from those process-local slices (B/P must divide by the local device count). Only
process 0 writes metrics, plots and progress; all processes call the orbax checkpointer (it
coordinates the write). On CPU, set `jax.config.update('jax_cpu_collectives_implementation', 'gloo')`
before `initialize` (tests/test_multihost.py runs two processes on 127.0.0.1). Launch, e.g.:

    for i in 0 1; do JAX_PLATFORMS=cpu python -m experiments.finetune --coordinator 127.0.0.1:12345 \\
        --num_processes 2 --process_id $i --data digits ... & done
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from jtkd import config as cfglib
from jtkd import train
from jtkd.checkpoint import CheckpointMismatchError, TrainCheckpointer

Batch = dict[str, np.ndarray]


class NonFiniteError(FloatingPointError):
    """The loss (or gradient norm) became NaN/inf; carries the first bad step."""

    def __init__(self, step: int, metrics: Mapping[str, float], last_checkpoint: int | None) -> None:
        self.step, self.metrics, self.last_checkpoint = step, dict(metrics), last_checkpoint
        bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
        where = (
            f"; the last good checkpoint is step {last_checkpoint}"
            if last_checkpoint is not None
            else "; no checkpoint was written"
        )
        super().__init__(
            f"non-finite training metrics at step {step}: {bad}{where}. Lower the learning rate, "
            "enable grad_clip_norm or check the data, then restart (it resumes from that checkpoint)."
        )


class Preempted(RuntimeError):
    """SIGTERM arrived; the run stopped at `step` after checkpointing it. Rerun to resume."""

    def __init__(self, step: int, checkpoint: int | None) -> None:
        self.step, self.checkpoint = step, checkpoint
        saved = f"checkpoint saved at step {checkpoint}" if checkpoint is not None else "no workdir: nothing was saved"
        super().__init__(f"preempted (SIGTERM) at step {step}; {saved}. Run the same command again to resume.")


class _SigtermFlag:
    """Within the context, SIGTERM sets a flag instead of killing the process (main thread only)."""

    def __init__(self, enabled: bool) -> None:
        import threading

        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.flag = False
        self._previous: Any = None

    def __enter__(self) -> _SigtermFlag:
        if self.enabled:
            import signal

            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.flag = True

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            import signal

            signal.signal(signal.SIGTERM, self._previous)

    def requested(self) -> bool:
        """The flag, OR-ed over all processes (they must stop at the same step)."""
        if jax.process_count() == 1:
            return self.flag
        from jax.experimental import multihost_utils

        return bool(np.any(multihost_utils.process_allgather(np.asarray(self.flag))))


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    steps: int = 1000  # total optimizer steps
    # gradient accumulation: each step's batch runs as this many micro-batches (activation memory of one),
    # one optimizer update (jtkd.train's docstring); the batch size per device must divide by it
    accum_steps: int = 1
    log_every: int = 10  # a train metrics row (mean over the interval) every this many steps
    eval_every: int = 0  # evaluate every this many steps (0: only at the end)
    checkpoint_every: int = 0  # save the TrainState every this many steps (0: only at the end); multiple of log_every
    max_to_keep: int = 3  # TrainState checkpoints kept
    best_metric: str = "eval/accuracy"  # exported to checkpoints/best when it improves ('' = no export)
    best_mode: Literal["max", "min"] = "max"
    async_checkpoint: bool = True
    checkpoints: bool = True  # False: no checkpoints at all (metrics and plots are still written)
    progress: bool = True  # tqdm bar
    resume: bool = True  # continue from the latest checkpoint in workdir if there is one
    prefetch: int = 2  # batches placed on the devices ahead by a background thread (0: inline)
    handle_sigterm: bool = True  # on SIGTERM (preemption): checkpoint at the next log step and raise Preempted

    def validate(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.accum_steps < 1:
            raise ValueError(f"accum_steps must be >= 1, got {self.accum_steps}")
        if self.log_every < 1:
            raise ValueError(f"log_every must be >= 1, got {self.log_every}")
        if self.checkpoint_every < 0 or self.eval_every < 0 or self.prefetch < 0:
            raise ValueError("checkpoint_every, eval_every and prefetch must be >= 0")
        if self.checkpoint_every and self.checkpoint_every % self.log_every:
            # a resumed run must start on a log boundary to write the same rows as an uninterrupted one
            raise ValueError(
                f"checkpoint_every ({self.checkpoint_every}) must be a multiple of log_every ({self.log_every})"
            )


# ----------------------------------------------------------------------------------------- data
def _columns(arrays: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int]:
    """The arrays as numpy and their common length; they must be non-empty and of equal length."""
    sizes = {k: len(v) for k, v in arrays.items()}
    if not sizes or len(set(sizes.values())) != 1:
        raise ValueError(f"arrays must be non-empty and of equal length, got {sizes}")
    return {k: np.asarray(v) for k, v in arrays.items()}, next(iter(sizes.values()))


def _processes(batch_size: int, index: int | None, count: int | None, what: str) -> tuple[int, int]:
    """(process index, process count), defaulting to JAX's; the batch must split evenly over them."""
    index = jax.process_index() if index is None else index
    count = jax.process_count() if count is None else count
    if batch_size % count:
        raise ValueError(f"{what} batch_size {batch_size} must divide by the {count} processes")
    return index, count


def _fold_seed(seed: int, *ints: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed & 0xFFFFFFFF, *ints]))


class ArraySource:
    """Batches of an in-memory dataset; the batch of step s is a pure function of (seed, s).

    Example e of the stream (e = s * batch_size + i) is row perm_k[e mod n] with k = e // n and
    perm_k a permutation drawn from (seed, k): every epoch sees every example once, in a fresh order,
    and batches may straddle epochs. `augment(batch, rng)` runs on host numpy with a generator drawn
    from (seed, s), so augmentation is reproducible too. On multi-host, each process gets its rows
    of the global batch.
    """

    def __init__(
        self,
        arrays: Mapping[str, np.ndarray],
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        augment: Callable[[Batch, np.random.Generator], Batch] | None = None,
        process_index: int | None = None,
        process_count: int | None = None,
    ) -> None:
        self.arrays, self.n = _columns(arrays)
        if self.n == 0:
            raise ValueError("empty dataset")
        self.batch_size, self.seed, self.shuffle, self.augment = batch_size, seed, shuffle, augment
        self.process_index, self.process_count = _processes(batch_size, process_index, process_count, "global")
        self._perm_cache: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n)
        if epoch not in self._perm_cache:
            if len(self._perm_cache) > 4:
                self._perm_cache.clear()
            self._perm_cache[epoch] = _fold_seed(self.seed, 0, epoch).permutation(self.n)
        return self._perm_cache[epoch]

    def indices(self, step: int) -> np.ndarray:
        """Dataset rows of this process's slice of the global batch of `step`."""
        per = self.batch_size // self.process_count
        e = step * self.batch_size + self.process_index * per + np.arange(per)
        epochs, pos = np.divmod(e, self.n)
        return np.array([self._perm(int(k))[p] for k, p in zip(epochs, pos)], dtype=np.int64)

    def __call__(self, step: int) -> Batch:
        idx = self.indices(step)
        batch = {k: v[idx] for k, v in self.arrays.items()}
        if self.augment is not None:
            batch = self.augment(batch, _fold_seed(self.seed, 1, step, self.process_index))
        return batch

    def __iter__(self) -> Iterator[Batch]:
        step = 0
        while True:
            yield self(step)
            step += 1

    @property
    def steps_per_epoch(self) -> float:
        return self.n / self.batch_size


class EvalSource:
    """Sequential batches of an evaluation split; the last is padded and `mask` marks real rows.

    Every example is counted exactly once whatever the batch size or device count. Multi-host:
    each process gets its rows of every (padded) global batch.
    """

    def __init__(
        self,
        arrays: Mapping[str, np.ndarray],
        batch_size: int,
        *,
        process_index: int | None = None,
        process_count: int | None = None,
    ) -> None:
        if "mask" in arrays:
            raise ValueError("'mask' is reserved for padding")
        self.arrays, self.n = _columns(arrays)
        self.batch_size = batch_size
        self.process_index, self.process_count = _processes(batch_size, process_index, process_count, "eval")

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        per = self.batch_size // self.process_count
        for start in range(0, self.n, self.batch_size):
            rows = start + self.process_index * per + np.arange(per)
            valid = rows < self.n
            idx = np.where(valid, rows, 0)
            batch = {k: v[idx] for k, v in self.arrays.items()}
            batch["mask"] = valid.astype(np.float32)
            yield batch


# ---------------------------------------------------------------------------------- eval metrics
def classification_eval(input_key: str = "image", label_key: str = "label") -> Callable[[Any, Any, Any], dict]:
    """Per-device *sums* over real (mask=1) rows: cross-entropy, correct predictions, count."""

    def metrics_fn(state: train.TrainState, batch: Mapping[str, jax.Array], extra: Any) -> dict[str, jax.Array]:
        logits = state.apply_fn(state.variables, batch[input_key], train=False)
        if isinstance(logits, tuple):
            logits = logits[0]
        logits = logits.astype(jnp.float32)
        labels = batch[label_key]
        mask = batch["mask"].astype(jnp.float32) if "mask" in batch else jnp.ones(labels.shape[0], jnp.float32)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        correct = (logits.argmax(-1) == labels).astype(jnp.float32)
        return {"loss": (ce * mask).sum(), "accuracy": (correct * mask).sum(), "count": mask.sum()}

    return metrics_fn


def sums_to_means(sums: Mapping[str, Any], prefix: str = "eval/") -> dict[str, float]:
    """{'x': sum, 'count': n} -> {'eval/x': sum / n, 'eval/count': n}.

    A key 'x/<task>' is divided by 'count/<task>' when that exists (per-task label counts).
    """
    n = float(sums["count"])
    out = {}
    for k, v in sums.items():
        if k == "count" or k.startswith("count/"):
            continue
        task = k.split("/", 1)[1] if "/" in k else None
        denom = float(sums[f"count/{task}"]) if task is not None and f"count/{task}" in sums else n
        out[prefix + k] = float(v) / max(denom, 1.0)
    out[f"{prefix}count"] = n
    return out


# ------------------------------------------------------------------------------- metrics output
class MetricsWriter:
    """Append-only JSONL of metric rows ({'step': int, name: float, ...}); process 0 only."""

    def __init__(self, path: str | Path | None, enabled: bool = True) -> None:
        self.path = Path(path) if path is not None else None
        self.enabled = enabled and self.path is not None and jax.process_index() == 0
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def truncate_after(self, step: int) -> None:
        """Drop rows past `step` (written by a run that crashed before its next checkpoint)."""
        if not self.enabled or not self.path.exists():
            return
        rows = read_jsonl(self.path)
        self.path.write_text("".join(json.dumps(r) + "\n" for r in rows if r["step"] <= step))

    def write(self, row: Mapping[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(dict(row)) + "\n")


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    rows = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a crash mid-write
    return rows


def plot_history(rows: list[Mapping[str, Any]], path: str | Path, title: str = "") -> Path:
    """PNG of train/eval loss and accuracy (and the learning rate) against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(key: str) -> tuple[list[int], list[float]]:
        pts = [(r["step"], r[key]) for r in rows if key in r and r[key] is not None]
        return [p[0] for p in pts], [p[1] for p in pts]

    panels = [("loss", ["train/loss", "eval/loss", "eval_ema/loss"]),
              ("accuracy", ["train/accuracy", "eval/accuracy", "eval_ema/accuracy"])]
    extra = sorted(
        {k for r in rows for k in r if k.startswith(("train/", "eval/"))}
        - {"train/loss", "eval/loss", "train/accuracy", "eval/accuracy", "eval/count", "train/grad_norm"}
    )
    if extra:
        panels.append(("other metrics", extra))
    if any("lr" in r for r in rows):
        panels.append(("learning rate", ["lr"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (name, keys) in zip(axes[0], panels):
        for key in keys:
            x, y = series(key)
            if x:
                ax.plot(x, y, marker="o" if key.startswith("eval") else None, ms=3, label=key)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------- trainer
StepData = Callable[[int], Batch] | Iterable[Batch]


class Resumable:
    """An iterator factory `make(start_step) -> iterator of batches` (e.g. `jtkd.data.batches(...,
    start_step=s)`): the loop opens it at the step it resumes from, so nothing is re-read."""

    def __init__(self, make: Callable[[int], Iterable[Batch]]) -> None:
        self.make = make
        self._it: Iterator[Batch] | None = None
        self._pos = 0

    def __call__(self, step: int) -> Batch:
        if self._it is None or step != self._pos:
            self._it, self._pos = iter(self.make(step)), step
        self._pos += 1
        return next(self._it)


def _step_fn(data: StepData) -> Callable[[int], Batch]:
    """Step-indexed access; a plain iterable is consumed in order (resume skips the done steps)."""
    if callable(data) and not isinstance(data, Iterator):
        return data  # type: ignore[return-value]
    it = iter(data)
    pos = [0]

    def get(step: int) -> Batch:
        if step < pos[0]:
            raise ValueError(f"an iterable data source cannot go back to step {step} (at {pos[0]})")
        while pos[0] < step:  # resume: skip what the checkpointed run already consumed
            next(it)
            pos[0] += 1
        pos[0] += 1
        return next(it)

    return get


class Trainer:
    """Runs `train.make_train_step(mesh, loss_fn)` with logging, evaluation and checkpoints.

    The compiled step is built once per Trainer, so several runs (seeds) of one configuration reuse it.
    """

    def __init__(
        self,
        mesh: Mesh,
        loss_fn: train.LossFn,
        eval_fn: Callable[[Any, Any, Any], dict] | None = None,
        *,
        config: LoopConfig = LoopConfig(),
        schedule: optax.Schedule | None = None,
        donate: bool = True,
        batch_transform: Callable[[Batch, jax.Array], Batch] | None = None,
    ) -> None:
        config.validate()
        self.mesh, self.config, self.schedule = mesh, config, schedule
        self.train_step = train.make_train_step(
            mesh, loss_fn, donate=donate, accum_steps=config.accum_steps, batch_transform=batch_transform
        )
        self.eval_step = train.make_eval_step(mesh, eval_fn) if eval_fn is not None else None

    # ------------------------------------------------------------------------------ evaluate
    def evaluate(self, state: Any, data: Iterable[Batch], extra: Any = None, prefix: str = "eval/") -> dict[str, float]:
        if self.eval_step is None:
            raise ValueError("this Trainer has no eval_fn")
        total: dict[str, Any] | None = None
        for batch in data:
            sums = self.eval_step(state, train.shard_batch(self.mesh, batch), extra)
            total = sums if total is None else jax.tree.map(jnp.add, total, sums)
        if total is None:
            raise ValueError("evaluation data is empty")
        return sums_to_means(jax.device_get(total), prefix)

    def _evaluate_any(self, state: Any, eval_data: Any, extra: Any, prefix: str = "eval/") -> dict[str, float]:
        """`evaluate` on batches, or a callable evaluator's 'eval/...' metrics renamed to `prefix`."""
        if not callable(eval_data):
            return self.evaluate(state, eval_data, extra, prefix)
        return {prefix + k.removeprefix("eval/"): v for k, v in eval_data(state).items()}

    # ----------------------------------------------------------------------------------- fit
    def fit(
        self,
        state: train.TrainState,
        train_data: StepData,
        eval_data: Iterable[Batch] | Callable[[Any], dict[str, float]] | None = None,
        *,
        workdir: str | Path | None = None,
        extra: Any = None,
        desc: str = "train",
        config: Any = None,
    ) -> tuple[train.TrainState, list[dict[str, Any]]]:
        """Train to `config.steps`; returns the final state and the metric rows written.

        config: the run's config dataclass, saved as workdir/config.json (see the module docstring).

        train_data: `step -> batch` (exact resume, e.g. ArraySource), a `Resumable`, or an iterable.
        eval_data: evaluation batches (EvalSource, or `jtkd.data.batches(..., train=False)` in a
        list/re-iterable), or a callable `state -> {'eval/...': value}` (e.g. a shared evaluator).
        """
        cfg = self.config
        workdir = Path(workdir) if workdir is not None else None
        ckpt = None
        if workdir is not None and cfg.checkpoints:
            ckpt = TrainCheckpointer(
                workdir / "checkpoints",
                max_to_keep=cfg.max_to_keep,
                best_metric=(cfg.best_metric or None) if eval_data is not None else None,
                best_mode=cfg.best_mode,
                async_save=cfg.async_checkpoint,
            )
        writer = MetricsWriter(workdir / "metrics.jsonl" if workdir is not None else None)
        try:
            return self._fit(state, _step_fn(train_data), eval_data, ckpt, writer, workdir, extra, desc, config)
        finally:
            if ckpt is not None:
                ckpt.close()

    def _fit(self, state, get_batch, eval_data, ckpt, writer, workdir, extra, desc, run_config):
        cfg = self.config
        start = int(jax.device_get(state.step))
        config_path = workdir / "config.json" if workdir is not None and run_config is not None else None
        changed = cfglib.changes(run_config, config_path) if config_path is not None else []
        if ckpt is not None and cfg.resume and ckpt.latest_step() is not None:
            try:
                state = ckpt.restore(state)
            except CheckpointMismatchError as e:
                what = "".join(f"\n  {c}" for c in changed) or " none (or no config.json)"
                raise CheckpointMismatchError(f"{e}\nConfig fields changed since that run:{what}") from None
            start = int(jax.device_get(state.step))
            writer.truncate_after(start)
            _info(f"{desc}: resumed from checkpoint step {start} in {ckpt.directory}")
            for c in changed:
                _info(f"{desc}: config changed since this workdir's last run: {c}")
        elif writer.enabled and writer.path.exists():
            writer.truncate_after(start)
        if config_path is not None and jax.process_index() == 0:
            config_path.parent.mkdir(parents=True, exist_ok=True)
            cfglib.save(run_config, config_path)
        history: list[dict[str, Any]] = []
        last_ckpt = ckpt.latest_step() if ckpt is not None else None
        pending: list[tuple[int, dict[str, jax.Array]]] = []  # device metrics not yet checked
        checked: list[tuple[int, dict[str, float]]] = []  # host metrics of the current log interval
        t0, t_log, n_log = time.perf_counter(), time.perf_counter(), 0

        def drain() -> None:
            """Fetch pending metrics and stop on the first non-finite one."""
            host = jax.device_get([m for _, m in pending])
            for (s, _), m in zip(pending, host):
                m = {k: float(v) for k, v in m.items()}
                if not all(math.isfinite(m[k]) for k in ("loss", "grad_norm") if k in m):
                    if ckpt is not None:
                        ckpt.wait()
                    raise NonFiniteError(s, m, last_ckpt)
                checked.append((s, m))
            pending.clear()

        bar = _progress(cfg.progress, cfg.steps, start, desc)
        post: dict[str, str] = {}
        batches = self._device_batches(get_batch, start, cfg.steps)
        sigterm = _SigtermFlag(cfg.handle_sigterm)
        try:
            sigterm.__enter__()
            for s, batch in zip(range(start, cfg.steps), batches):
                state, metrics = self.train_step(state, batch, extra)
                step = s + 1  # updates done
                pending.append((step, metrics))
                n_log += 1
                bar.update(1)
                final = step == cfg.steps
                if step % cfg.log_every == 0 or final:
                    drain()
                    row: dict[str, Any] = {"step": step}
                    for k in checked[-1][1]:
                        row[f"train/{k}"] = float(np.mean([m[k] for _, m in checked]))
                    if self.schedule is not None:
                        row["lr"] = float(self.schedule(step - 1))  # the lr that step `step` used
                    now = time.perf_counter()
                    row["steps_per_s"] = n_log / max(now - t_log, 1e-9)
                    t_log, n_log = now, 0
                    checked.clear()
                    writer.write(row)
                    history.append(row)
                    post["loss"] = f"{row.get('train/loss', float('nan')):.4f}"
                    bar.set_postfix(post)
                if eval_data is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or final):
                    ev = {"step": step, **self._evaluate_any(state, eval_data, extra)}
                    if (averaged := state.averaged()) is not None:  # the weights' moving average too
                        ev.update(self._evaluate_any(averaged, eval_data, extra, "eval_ema/"))
                    writer.write(ev)
                    history.append(ev)
                    post["eval_acc"] = f"{ev.get('eval/accuracy', float('nan')):.4f}"
                    bar.set_postfix(post)
                    if ckpt is not None and ckpt.best_metric is not None:
                        ckpt.save_best(state, ev)
                if ckpt is not None and ((cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or final):
                    drain()  # never checkpoint a state whose steps were not all finite
                    last_ckpt = ckpt.save(state)
                if step % cfg.log_every == 0 and not final and sigterm.requested():
                    # stop on a log boundary, so the resumed run writes the rows an uninterrupted one would
                    if ckpt is not None and last_ckpt != step:
                        last_ckpt = ckpt.save(state)
                    if ckpt is not None:
                        ckpt.wait()
                    raise Preempted(step, last_ckpt if ckpt is not None else None)
        finally:
            sigterm.__exit__()
            close = getattr(batches, "close", None)
            if close is not None:
                close()  # stops the prefetch thread
            bar.close()
        if ckpt is not None:
            ckpt.wait()
        if workdir is not None and jax.process_index() == 0:
            rows = read_jsonl(workdir / "metrics.jsonl")
            plot_history(rows, workdir / "metrics.png", title=desc)
        _info(f"{desc}: {cfg.steps - start} steps in {time.perf_counter() - t0:.1f}s")
        return state, history

    def _device_batches(
        self, get_batch: Callable[[int], Batch], start: int, stop: int
    ) -> Iterator[dict[str, jax.Array]]:
        host = (get_batch(s) for s in range(start, stop))
        if self.config.prefetch:
            from jtkd.data.pipeline import prefetch_to_mesh

            return prefetch_to_mesh(host, self.mesh, self.config.prefetch)
        return (train.shard_batch(self.mesh, b) for b in host)


def setup_logging(level: int = 20) -> None:
    """Timestamped INFO lines from the 'jtkd' logger on stderr (process 0), whatever absl did to root."""
    import logging
    import sys

    logger = logging.getLogger("jtkd")
    logger.setLevel(level if jax.process_index() == 0 else logging.WARNING)
    if not any(getattr(h, "_jtkd", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
        handler._jtkd = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.propagate = False


def _info(msg: str) -> None:
    if jax.process_index() == 0:
        import logging

        logging.getLogger("jtkd").info(msg)


class _NoBar:
    def update(self, n: int) -> None: ...

    def set_postfix(self, *a: Any, **k: Any) -> None: ...

    def close(self) -> None: ...


def _progress(enabled: bool, total: int, initial: int, desc: str) -> Any:
    if not enabled or jax.process_index() != 0:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, leave=False)
