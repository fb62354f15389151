"""Shared machinery: process setup, presets, interleaved timing, machine description.

Timing protocol (every benchmark): build everything, run `warmup` steps of each contender, then
`repeats` rounds; in each round every contender runs `steps` steps back to back and is timed as a
block (blocking on the result at the end). Contenders are interleaved round by round, in a rotating
order, so load from other processes on a shared machine hits all of them alike; the reported
figure is the median over rounds of (block time / steps). CPU time (all threads of this process)
is recorded alongside wall time.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def omp_wait_policy(requested: str) -> str:
    """The OpenMP wait policy torch's CPU threads will use: 'auto' resolves to PASSIVE when the
    machine is oversubscribed (1-min load average above twice the core count), else torch's default.

    Why: torch's OpenMP workers spin at barriers (GNU OpenMP's ACTIVE default); when other
    processes hold the cores, a spinning worker burns its time slice while the thread it waits for
    is descheduled, and a step can get 10x slower (measured here: resnet18 64 px batch 16, 11.8 s
    ACTIVE vs 0.92 s PASSIVE at load 15 on 2 cores). XLA's Eigen pool parks idle threads. On an idle
    machine spinning is what torch users get and is faster (PASSIVE costs torch up to 26% here), so
    it is kept there; the threshold is 2x the cores because the previous job's tail alone lifts the
    1-min load to about the core count (bench/FINDINGS.md).
    """
    if requested == "auto":
        la = load_average()
        return "PASSIVE" if la and la[0] > 2 * num_cores() else "default"
    return requested.upper() if requested != "default" else "default"


def jtkd_cpu_settings(device: str) -> bool:
    """Whether this run applies jtkd's CPU settings (`jtkd.xla_flags.use_cpu_flags`); JTKD_XLA_FLAGS=0
    keeps XLA's and glibc's defaults, for comparison."""
    return device == "cpu" and os.environ.get("JTKD_XLA_FLAGS", "1") != "0"


def setup_process(device: str, omp_wait: str = "auto") -> str:
    """Environment a bench process needs before jax/torch are imported; returns the OpenMP wait
    policy in force (see omp_wait_policy).

    torch is imported before anything can pull in tensorflow (triton segfault otherwise), and on
    `cpu` JAX is pinned to the host platform with exactly one (real) CPU device: XLA's intra-op
    thread pool then spans every core, as torch's does. jtkd's CPU flags (`jtkd.xla_flags`) are
    applied as jtkd's own entry points apply them; JTKD_XLA_FLAGS=0 keeps XLA's and glibc's defaults.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    policy = os.environ.get("OMP_WAIT_POLICY") or omp_wait_policy(omp_wait)
    if policy != "default":
        os.environ["OMP_WAIT_POLICY"] = policy  # read when torch loads libgomp, i.e. at import
    if device == "gpu":
        # both frameworks share the GPU: JAX must not grab 75% of its memory up front
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if device == "cpu":
        os.environ["JAX_PLATFORMS"] = "cpu"
        flags = os.environ.get("XLA_FLAGS", "")
        if "xla_force_host_platform_device_count" in flags:  # e.g. inherited from the test suite
            os.environ["XLA_FLAGS"] = " ".join(f for f in flags.split() if "xla_force_host_platform_device_count" not in f)
        if jtkd_cpu_settings(device):
            from jtkd.xla_flags import use_cpu_flags

            use_cpu_flags()
    import torch

    torch.set_num_threads(num_cores())  # equal to XLA's pool; torch defaults to physical cores anyway
    if device == "gpu":
        # JAX's default precision lets fp32 matmuls and convolutions use TF32 tensor cores on
        # Ampere+; torch allows it for cuDNN convolutions but not for matmuls. Same rule on both sides.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        # XLA autotunes its convolution algorithms at compile time; cuDNN's equivalent is opt-in
        torch.backends.cudnn.benchmark = True
    return policy


def num_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# ------------------------------------------------------------------------------------------ presets
@dataclasses.dataclass(frozen=True)
class TrainCase:
    model: str
    size: int
    batch: int
    compile: bool = False  # also time torch.compile (minutes of compilation on a small CPU)


@dataclasses.dataclass(frozen=True)
class Preset:
    """Problem sizes for one `--size`. Counts are per contender."""

    train: tuple[TrainCase, ...]
    distill: tuple[str, str, int, int]  # teacher, student, image size, batch
    pipeline_sizes: tuple[int, ...]  # image sides to time the input pipeline at
    pipeline_images: int
    conversion: tuple[str, ...]
    matmul_n: int
    warmup: int
    repeats: int
    steps: int


PRESETS: dict[str, Preset] = {
    # seconds: only proves the scripts run end to end (tests/test_bench.py)
    "tiny": Preset(
        train=(TrainCase("resnet18", 64, 4),),
        distill=("resnet18", "resnet18", 64, 4),
        pipeline_sizes=(64,),
        pipeline_images=16,
        conversion=("resnet18",),
        matmul_n=256,
        warmup=1,
        repeats=2,
        steps=1,
    ),
    # a 2-core CPU in ~10-15 minutes
    "small": Preset(
        train=(
            TrainCase("resnet18", 64, 16, compile=True),
            TrainCase("resnet18", 224, 8),
            TrainCase("resnet50", 64, 16),
            TrainCase("resnet50", 224, 8),
            TrainCase("mobilenet_v3_large", 224, 8),
            TrainCase("vit_b_16", 224, 4),
            TrainCase("swin_t", 224, 4),
        ),
        distill=("resnet50", "resnet18", 224, 8),
        pipeline_sizes=(64, 224),
        pipeline_images=64,
        conversion=("resnet50", "vit_b_16", "convnext_base"),
        matmul_n=2048,
        warmup=1,
        repeats=5,
        steps=1,
    ),
    # an accelerator (or a big CPU host)
    "full": Preset(
        train=(
            TrainCase("resnet18", 64, 256, compile=True),
            TrainCase("resnet18", 224, 128, compile=True),
            TrainCase("resnet50", 64, 256, compile=True),
            TrainCase("resnet50", 224, 128, compile=True),
            TrainCase("mobilenet_v3_large", 224, 128, compile=True),
            TrainCase("vit_b_16", 224, 64, compile=True),
            TrainCase("swin_t", 224, 64, compile=True),
        ),
        distill=("resnet50", "resnet18", 224, 128),
        pipeline_sizes=(64, 224),
        pipeline_images=512,
        conversion=("resnet50", "vit_b_16", "convnext_base"),
        matmul_n=8192,
        warmup=3,
        repeats=7,
        steps=10,
    ),
}


# ------------------------------------------------------------------------------------------- timing
@dataclasses.dataclass
class Timing:
    """Per-step seconds of each timed round."""

    wall: list[float]
    cpu: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.wall)

    def summary(self, items_per_step: int) -> dict[str, Any]:
        return {
            "step_s_median": self.median,
            "step_s_min": min(self.wall),
            "step_s_max": max(self.wall),
            "cpu_s_per_step_median": statistics.median(self.cpu),
            "items_per_s": items_per_step / self.median,
            "rounds": len(self.wall),
        }


Runner = Callable[[int], None]  # run n steps and block until their results exist


def interleaved(runners: Mapping[str, Runner], *, warmup: int, repeats: int, steps: int, progress: Any = None) -> dict[str, Timing]:
    """Time every runner in rotating-order rounds (see the module docstring)."""
    names = list(runners)
    for name in names:
        runners[name](warmup)
    out = {n: Timing([], []) for n in names}
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            w0, c0 = time.perf_counter(), time.process_time()
            runners[name](steps)
            w1, c1 = time.perf_counter(), time.process_time()
            out[name].wall.append((w1 - w0) / steps)
            out[name].cpu.append((c1 - c0) / steps)
        if progress is not None:
            progress.update(1)
    return out


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def short_error(e: BaseException, limit: int = 300) -> str:
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg[:limit]}{'...' if len(msg) > limit else ''}"


# -------------------------------------------------------------------------------------- the machine
def _lscpu() -> dict[str, str]:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in out.splitlines()) if v}


def cpu_info() -> dict[str, Any]:
    """CPU model, cores, clock and the SIMD flags the peak-FLOP/s estimate depends on."""
    ls = _lscpu()
    flags = set(ls.get("Flags", "").split())
    mhz = None
    for key in ("CPU max MHz", "CPU MHz"):
        if ls.get(key):
            mhz = float(ls[key])
            break
    if mhz is None:
        try:
            with open("/proc/cpuinfo") as f:
                mhz = next(float(line.split(":")[1]) for line in f if line.startswith("cpu MHz"))
        except (OSError, StopIteration, ValueError):
            mhz = None
    return {
        "model": ls.get("Model name", platform.processor() or "unknown"),
        "vendor": ls.get("Vendor ID", ""),
        "family": ls.get("CPU family", ""),
        "cores": num_cores(),
        "threads_per_core": ls.get("Thread(s) per core", ""),
        "mhz": mhz,
        "simd": sorted(f for f in flags if f in {"avx", "avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile"}),
        "hypervisor": ls.get("Hypervisor vendor", ""),
        "l3": ls.get("L3 cache", ""),
    }


def load_average() -> tuple[float, float, float] | None:
    try:
        return os.getloadavg()
    except OSError:
        return None


def _onednn_status(device: str) -> str:
    """What jtkd runs on oneDNN (jtkd.models.onednn) in this run, or why nothing."""
    if device != "cpu":
        return "- (CPU only)"
    from jtkd.models import layers, onednn

    if not onednn.enabled():
        return f"off ({onednn.reason() or 'JTKD_ONEDNN=0'})"
    rows = f">= {layers._ONEDNN_LINEAR_ROWS} rows"
    dense = "forward and both gradients" if onednn.avx512() else "forward, input gradient"
    if layers._mkl_matmuls():
        linear = (f"linear layers on MKL's sgemm ({rows}, forward and both gradients), and stride-1 1x1 convolutions on "
                  f"<= {layers._MKL_1X1_ROWS} rows")
    elif onednn.avx512():
        linear = f"linear layers' gradients ({rows}; wider-than-tall weight gradients on XLA (AVX-512), MKL not found)"
    else:
        linear = f"linear layers' gradients ({rows})"
    attention = ("attention fused on MKL (vit, swin, maxvit; forward and gradient)" if onednn.mkl_available()
                 else "attention's batched matmuls")
    return ("depthwise, grouped and 1x1 convolutions (forward and both gradients); dense convolutions with "
            f">= {layers._ONEDNN_DENSE_ROWS} output rows ({dense}); {attention}; {linear}")


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10, check=False)
        dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                               timeout=10, check=False)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _malloc_status(device: str) -> str:
    """What `use_cpu_flags` did to malloc; it applies to both frameworks, which share the process."""
    if not jtkd_cpu_settings(device):
        return "glibc defaults"
    from jtkd.xla_flags import keep_freed_memory

    applied = keep_freed_memory()  # idempotent: reports whether use_cpu_flags could apply it
    return ("keeps freed memory: one arena, no mmap'd blocks, no trimming (jtkd.xla_flags.keep_freed_memory), "
            "for torch too" if applied else "glibc defaults")


def machine_info(device: str) -> dict[str, Any]:
    import flax
    import jax
    import jaxlib
    import optax
    import torch
    import torchvision

    info: dict[str, Any] = {
        "cpu": cpu_info(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "jax_devices": [f"{d.platform}:{d.device_kind}" for d in jax.devices()],
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "jtkd_onednn": _onednn_status(device),
        "malloc": _malloc_status(device),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
        "device": device,
        "git": git_commit(),
        "argv": " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    if device == "gpu" and torch.cuda.is_available():
        info["torch_cuda_device"] = torch.cuda.get_device_name(0)
    return info


def pct(values: Sequence[float]) -> str:
    return ", ".join(f"{v:.3g}" for v in values)
