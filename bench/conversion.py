"""Checkpoint conversion (`converters.torchvision.convert`): time and peak memory.

Each model is measured in a fresh subprocess (`python -m bench.conversion NAME`), so the peak is
the conversion's own and not some earlier benchmark's. The checkpoint is the torchvision model's
own state_dict (random weights: this machine has no internet; conversion cost does not depend on
the values), 1000 classes, head kept.

Measured in the child:
- cold_s: the first `convert` in the process (includes tracing the Flax model's shapes with
  jax.eval_shape: what a user pays once), warm_s: median of later calls; *_cpu_s: the same in CPU
  seconds (torch permutes the kernels on all cores, the rest is one thread; on a shared machine the
  CPU figure is the load-independent one).
- peak_delta_mb: peak resident memory during the first call minus resident memory just before it.
  Linux: the high-water mark (VmHWM) is reset through /proc/self/clear_refs first, so the figure is
  exact; elsewhere ru_maxrss is used and the figure is only exact if the peak exceeds the earlier
  peak (flagged otherwise).
- retained_mb: resident memory growth that survives the call (the converted arrays themselves).
- tracemalloc_peak_mb: peak of Python/numpy allocations during a call (tracemalloc sees numpy's
  buffers, not XLA's or torch's).
- cold_gc_s, cold_full_gcs: time the cyclic garbage collector ran during the first call, and how
  many of those runs were full (generation 2) collections. A full collection walks every Python
  object in the process (torch's, JAX's, the user's), ~0.4 s here with torch and JAX imported; the
  allocation counter decides when one falls, so it lands in whichever call crosses the threshold.
  Pausing the collector during conversion only moves that pass into the next call (measured: the
  next step's trace then pays it), so it is reported, not avoided.
Goal (resnet50): cold_s < 1 and peak_delta < 2x the checkpoint's bytes.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import tracemalloc
from typing import Any

from bench.common import REPO, Preset, short_error

GOAL_SECONDS = 1.0
GOAL_MEMORY_RATIO = 2.0


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm_bytes() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_hwm() -> bool:
    """Reset the peak-RSS counter (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure(name: str, repeats: int = 3) -> dict[str, Any]:
    """The child's work: everything about converting `name` once, in this (fresh) process."""
    from bench.common import setup_process

    setup_process("cpu")
    import jax
    import torchvision

    from bench.train_step import available
    from converters.torchvision import convert

    why = available(name, 10_000)
    if why:
        return {"model": name, "skipped": why}
    jax.numpy.zeros(1).block_until_ready()  # start the backend: not part of conversion
    sd = torchvision.models.get_model(name, weights=None).state_dict()
    ckpt_bytes = sum(t.numel() * t.element_size() for t in sd.values())
    gc.collect()
    exact = _reset_hwm()
    rss0, peak0 = _rss_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    gc_runs: list[tuple[int, float]] = []  # (generation, seconds) of each collection in the call
    gc_start: list[float] = []

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            gc_start.append(time.perf_counter())
        elif gc_start:
            gc_runs.append((info["generation"], time.perf_counter() - gc_start.pop()))

    gc.callbacks.append(on_gc)
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        variables = convert(name, sd)
    finally:
        cold, cold_cpu = time.perf_counter() - t0, time.process_time() - c0
        gc.callbacks.remove(on_gc)
    if exact and _hwm_bytes() is not None:
        peak, bound = _hwm_bytes(), False
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        bound = peak <= peak0  # the call stayed under an earlier peak: the delta is at most this
    retained = _rss_bytes() - rss0
    n_leaves = len(jax.tree.leaves(variables))
    out_bytes = sum(a.nbytes for a in jax.tree.leaves(variables))
    del variables
    gc.collect()
    warm, warm_cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        v = convert(name, sd)
        warm.append(time.perf_counter() - t0)
        warm_cpu.append(time.process_time() - c0)
        del v
    tracemalloc.start()
    v = convert(name, sd)
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del v
    mb = 2**20
    return {
        "model": name,
        "checkpoint_mb": ckpt_bytes / mb,
        "tensors": len(sd),
        "flax_leaves": n_leaves,
        "converted_mb": out_bytes / mb,
        "cold_s": cold,
        "warm_s": statistics.median(warm),
        "cold_cpu_s": cold_cpu,
        "cold_gc_s": sum(dt for _, dt in gc_runs),
        "cold_full_gcs": sum(g == 2 for g, _ in gc_runs),
        "warm_cpu_s": statistics.median(warm_cpu),
        "peak_delta_mb": (peak - rss0) / mb,
        "peak_is_upper_bound": bound,
        "peak_method": "VmHWM reset" if exact else "ru_maxrss",
        "retained_mb": retained / mb,
        "tracemalloc_peak_mb": traced_peak / mb,
        "peak_over_checkpoint": (peak - rss0) / ckpt_bytes,
    }


def run(preset: Preset, progress: Any = None, timeout: float = 600) -> list[dict[str, Any]]:
    results = []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH", "")]))}
    for name in preset.conversion:
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "bench.conversion", name],
                cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False,
            )
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            if proc.returncode or not lines:
                res = {"model": name, "error": f"child exited {proc.returncode}: {proc.stderr.strip()[-800:]}"}
            else:
                res = json.loads(lines[-1])
        except (subprocess.SubprocessError, OSError, json.JSONDecodeError) as e:
            res = {"model": name, "error": short_error(e)}
        if "cold_s" in res:
            res["meets_goal"] = res["cold_s"] < GOAL_SECONDS and res["peak_over_checkpoint"] < GOAL_MEMORY_RATIO
            res["meets_goal_cpu_time"] = res["cold_cpu_s"] < GOAL_SECONDS and res["peak_over_checkpoint"] < GOAL_MEMORY_RATIO
        results.append(res)
        if progress is not None:
            progress.update(1)
    return results


if __name__ == "__main__":
    try:
        print(json.dumps(measure(sys.argv[1])))
    except Exception as e:  # noqa: BLE001 - report, don't crash the parent's JSON parsing
        print(json.dumps({"model": sys.argv[1], "error": short_error(e, 1000)}))
