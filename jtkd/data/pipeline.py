"""Batching: seeded epochs, per-host slices, padded evaluation batches, threaded decode, device prefetch.

`batches(source, batch_size, ...)` turns a random-access source into batch dicts:

* training (`train=True`): reshuffled every epoch from (seed, epoch), last partial batch dropped,
  repeats forever unless `num_epochs` is set; `start_step` resumes exactly where a run stopped.
* evaluation (`train=False`): one ordered pass; the final batch is padded to `batch_size` and every
  batch carries a bool 'mask' (False on padding) so metrics count each example exactly once.
* multi-host: `batch_size` is global; process p gets rows [p*b, (p+1)*b) of each global batch,
  b = batch_size / process_count, so all hosts take the same number of steps.
* decoding and augmentation run in `num_workers` threads (PIL and numpy release the GIL), up to
  `prefetch` batches ahead; augmentation draws from `example_rng(seed, epoch, index)`, so batches
  are identical for any number of workers or hosts.

`prefetch_to_mesh(iterator, mesh, size)` then moves batches onto the devices in a background
thread, sharded along the mesh's 'data' axis (`jtkd.train.shard_batch`).
"""

from __future__ import annotations

import math
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from jtkd.data.transforms import example_rng

Batch = dict[str, np.ndarray]
Transform = Callable[[Any, np.random.Generator], np.ndarray]


def steps_per_epoch(num_examples: int, batch_size: int, drop_remainder: bool) -> int:
    return num_examples // batch_size if drop_remainder else math.ceil(num_examples / batch_size)


def epoch_order(num_examples: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """The example order of one epoch: a fresh permutation per (seed, epoch)."""
    if not shuffle:
        return np.arange(num_examples)
    return np.random.default_rng((0, seed, epoch)).permutation(num_examples)


def _host_slice(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    return process_index, process_count


def _stack(rows: list[dict[str, Any]], keys: Iterable[str]) -> Batch:
    out = {}
    for k in keys:
        values = [r[k] for r in rows]
        try:
            out[k] = np.stack(values)
        except ValueError as e:
            shapes = sorted({np.shape(v) for v in values})
            raise ValueError(
                f"cannot batch {k!r}: examples have shapes {shapes[:4]}; pass a transform that makes them equal "
                "(e.g. EvalTransform(size) / TrainTransform(size))"
            ) from e
    return out


def batches(
    source: Any,
    batch_size: int,
    *,
    transform: Transform | None = None,
    train: bool = False,
    seed: int = 0,
    num_epochs: int | None = None,
    start_step: int = 0,
    shuffle: bool | None = None,
    drop_remainder: bool | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    num_workers: int = 4,
    prefetch: int = 2,
    with_index: bool = False,
) -> Iterator[Batch]:
    """Iterate over batches of `source` (see the module docstring).

    Args:
      source: `len()` and `source[i]` -> {'image', 'label', ...}; an `ArrayDataset` without a
        transform is gathered in one vectorised step.
      batch_size: global batch size (divisible by `process_count`).
      transform: `transform(image, rng) -> HWC float32`, e.g. `TrainTransform` / `EvalTransform`.
      train: defaults for shuffle / drop_remainder / num_epochs (True, True, forever) or (False, False, 1).
      start_step: number of (global) batches to skip, without loading them, to resume a run.
      with_index: add 'index' (int32 source index, -1 on padding) to every batch.
    """
    shuffle = train if shuffle is None else shuffle
    drop_remainder = train if drop_remainder is None else drop_remainder
    num_epochs = (None if train else 1) if num_epochs is None else num_epochs
    p, n_proc = _host_slice(process_index, process_count)
    if batch_size < 1 or batch_size % n_proc:
        raise ValueError(f"batch_size {batch_size} must be a positive multiple of process_count {n_proc}")
    n = len(source)
    spe = steps_per_epoch(n, batch_size, drop_remainder)
    if spe == 0:
        raise ValueError(f"source has {n} examples, fewer than one batch of {batch_size} (drop_remainder=True)")
    local = batch_size // n_proc
    total = None if num_epochs is None else num_epochs * spe
    vectorised = transform is None and hasattr(source, "get_batch")

    def plan() -> Iterator[tuple[int, np.ndarray]]:
        step = start_step
        order, order_epoch = None, -1
        while total is None or step < total:
            epoch, b = divmod(step, spe)
            if epoch != order_epoch:
                order, order_epoch = epoch_order(n, seed, epoch, shuffle), epoch
            idx = np.full(batch_size, -1, np.int64)
            chunk = order[b * batch_size : (b + 1) * batch_size]
            idx[: chunk.size] = chunk
            yield epoch, idx[p * local : (p + 1) * local]
            step += 1

    def load(epoch: int, i: int) -> dict[str, Any]:
        ex = dict(source[int(i)])
        image = ex["image"]
        ex["image"] = (
            transform(image, example_rng(seed, epoch, int(i)))
            if transform is not None
            else np.asarray(image, np.float32)
        )
        ex["label"] = np.int32(ex["label"])
        return ex

    template: dict[str, Any] = {}

    def pad_row() -> dict[str, Any]:
        if not template:  # a host whose slice is all padding still needs the shapes
            template.update({k: np.zeros_like(v) for k, v in load(0, 0).items()})
        return template

    def assemble(idx: np.ndarray, rows: list[dict[str, Any]] | Batch) -> Batch:
        real = idx >= 0
        if isinstance(rows, dict):  # vectorised gather of the real rows
            batch = rows
            if not real.all():
                full = {}
                for k, v in batch.items():
                    full[k] = np.zeros((idx.size, *np.shape(v)[1:]), np.asarray(v).dtype)
                    full[k][real] = v
                batch = full
        else:
            if rows and not template:
                template.update({k: np.zeros_like(v) for k, v in rows[0].items()})
            it = iter(rows)
            batch = _stack([next(it) if r else pad_row() for r in real], (rows[0] if rows else pad_row()).keys())
        batch["label"] = batch["label"].astype(np.int32)
        if not drop_remainder:
            batch["mask"] = real
        if with_index:
            batch["index"] = np.where(real, idx, -1).astype(np.int32)
        return batch

    def vectorised_batch(idx: np.ndarray) -> Batch:
        real = idx[idx >= 0]
        if real.size:
            return source.get_batch(real)
        shapes = source.get_batch(np.zeros(1, np.int64))
        return {k: v[:0] for k, v in shapes.items()}

    def run() -> Iterator[Batch]:
        threaded = num_workers > 0 and not vectorised
        pool = ThreadPoolExecutor(num_workers, thread_name_prefix="jtkd-data") if threaded else None
        pending: deque[tuple[np.ndarray, Any]] = deque()

        def submit(epoch: int, idx: np.ndarray) -> None:
            if vectorised:
                pending.append((idx, vectorised_batch(idx)))
            elif pool is None:
                pending.append((idx, [load(epoch, i) for i in idx if i >= 0]))
            else:
                pending.append((idx, [pool.submit(load, epoch, i) for i in idx if i >= 0]))

        try:
            steps = plan()
            for epoch, idx in steps:  # fill the window: prefetch + 1 batches in flight
                submit(epoch, idx)
                if len(pending) > max(prefetch, 0):
                    break
            while pending:
                idx, work = pending.popleft()
                nxt = next(steps, None)
                if nxt is not None:
                    submit(*nxt)
                rows = [f.result() for f in work] if pool is not None else work
                yield assemble(idx, rows)
        finally:
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)

    return run()  # arguments are checked above, when batches() is called


class _Raised:
    def __init__(self, exc: BaseException):
        self.exc = exc


_END = object()


def prefetch_to_mesh(iterator: Iterable[Batch], mesh: Any, size: int = 2) -> Iterator[dict[str, Any]]:
    """Yield the batches of `iterator` as global arrays sharded along `mesh`'s 'data' axis.

    A background thread pulls batches and places them (`jtkd.train.shard_batch`, asynchronous
    host-to-device copies) up to `size` batches ahead, so the next batch is on the devices while
    the current step runs. Exceptions from the iterator are re-raised here; closing this generator
    stops the thread.
    """
    from jtkd.train import shard_batch

    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    q: queue.Queue = queue.Queue(maxsize=size)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def worker() -> None:
        try:
            for batch in iterator:
                if not put(shard_batch(mesh, batch)):
                    return
            put(_END)
        except BaseException as e:  # noqa: BLE001  re-raised in the consumer
            put(_Raised(e))

    thread = threading.Thread(target=worker, name="jtkd-prefetch-to-mesh", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _END:
                return
            if isinstance(item, _Raised):
                raise item.exc
            yield item
    finally:
        stop.set()
