"""Model FLOPs utilisation: a train step's achieved FLOP/s over the machine's peak.

Model FLOPs per step: 3x the forward pass as XLA counts it on the unoptimised HLO with plain XLA
convolutions (the usual MFU convention: backward = 2x forward), see `bench.train_step.model_flops`;
XLA skips the multiply-adds that fall on padding, so at 64 px this is about 0.8x torch's count. Also
listed: XLA's count of the compiled step on the CPU (what XLA executes, elementwise work included;
more than the model needs where XLA rewrites an op expensively, e.g. depthwise weight gradients;
none of the work inside oneDNN custom calls; not reported on GPU, where cuDNN and cuBLAS calls hide
nearly all of it) and torch's FlopCounterMode count (matmuls and convolutions only; it also
overcounts depthwise gradients). The same model FLOPs divide
both frameworks' step times, so their MFUs compare.

Two peaks are reported:
- nominal: cores x clock x fp32 FLOPs/cycle/core, the latter from the CPU's SIMD flags:
  AMD Zen 4 (family 25 with avx512f) executes 512-bit FMAs on two 256-bit pipes -> 2 x 8 x 2 = 32;
  Zen 5 (family 26) -> 64; other AMD with avx2+fma -> 32; Intel with avx512f -> 64 (two 512-bit
  FMA units, Xeon Scalable Gold/Platinum; one-unit parts have 32); avx2+fma -> 32; else 8. The
  clock is lscpu's max MHz, else the reported current MHz (a guest does not see turbo).
- practical: the best of a large fp32 matmul's achieved FLOP/s in XLA and in torch.
On a shared machine wall-clock FLOP/s measures the share of the cores this process got; FLOPs per
CPU-second (all threads' CPU time) over one core's nominal peak does not, provided idle threads
sleep rather than spin (torch under OMP_WAIT_POLICY=PASSIVE; XLA parks its workers).
A KVM guest reports the base clock; boost clocks can put per-CPU-second figures above "100%".
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bench.common import Timing, cpu_info, interleaved, num_cores


def flops_per_cycle(info: dict[str, Any]) -> tuple[int, str]:
    simd, vendor = set(info.get("simd", [])), info.get("vendor", "")
    family = str(info.get("family", ""))
    if vendor == "AuthenticAMD":
        if "avx512f" in simd and family == "25":
            return 32, "AMD Zen 4: AVX-512 on 2x256-bit FMA pipes, 2 x 8 fp32 x 2 FLOP"
        if "avx512f" in simd:
            return 64, "AMD Zen 5+: 2 x 512-bit FMA, 2 x 16 fp32 x 2 FLOP"
        if {"avx2", "fma"} <= simd:
            return 32, "AMD AVX2: 2 x 256-bit FMA, 2 x 8 fp32 x 2 FLOP"
    if "avx512f" in simd:
        return 64, "AVX-512: assumes 2 x 512-bit FMA units (Xeon Gold/Platinum), 2 x 16 fp32 x 2 FLOP"
    if {"avx2", "fma"} <= simd:
        return 32, "AVX2+FMA: 2 x 256-bit FMA, 2 x 8 fp32 x 2 FLOP"
    return 8, "no FMA flags: SSE, 4 fp32 mul + 4 add per cycle"


def nominal_peak() -> dict[str, Any]:
    info = cpu_info()
    fpc, why = flops_per_cycle(info)
    ghz = (info.get("mhz") or 0) / 1000
    return {
        "cores": num_cores(),
        "ghz": ghz,
        "flops_per_cycle_per_core": fpc,
        "assumption": why,
        "flops_per_s": num_cores() * ghz * 1e9 * fpc if ghz else None,
    }


def matmul_peak(n: int, device: str, repeats: int, dtype: str = "float32") -> dict[str, Any]:
    """Achieved FLOP/s of an n x n matmul (fp32, or bf16 with `dtype`) in XLA and in torch, timed
    interleaved."""
    import jax
    import jax.numpy as jnp
    import torch

    tdev = "cuda" if device == "gpu" else "cpu"
    rng = np.random.default_rng(0)
    a_np, b_np = rng.standard_normal((n, n), dtype=np.float32), rng.standard_normal((n, n), dtype=np.float32)
    jdt, tdt = (jnp.bfloat16, torch.bfloat16) if dtype == "bfloat16" else (jnp.float32, torch.float32)
    a, b = jnp.asarray(a_np, jdt), jnp.asarray(b_np, jdt)
    mm = jax.jit(lambda x, y: x @ y)
    ta, tb = torch.from_numpy(a_np).to(tdev, tdt), torch.from_numpy(b_np).to(tdev, tdt)

    def run_jax(k: int) -> None:
        for _ in range(k):
            out = mm(a, b)
        if k:
            out.block_until_ready()

    def run_torch(k: int) -> None:
        for _ in range(k):
            torch.mm(ta, tb)
        if tdev == "cuda":
            torch.cuda.synchronize()

    t: dict[str, Timing] = interleaved({"jax": run_jax, "torch": run_torch}, warmup=1, repeats=repeats, steps=1)
    flops = 2.0 * n**3
    res = {"n": n, "dtype": dtype, "jax_flops_per_s": flops / t["jax"].median, "torch_flops_per_s": flops / t["torch"].median}
    res["flops_per_s"] = max(res["jax_flops_per_s"], res["torch_flops_per_s"])
    if device == "cpu":  # per CPU-second: what one busy core achieves, whatever share of the machine we got
        import statistics

        res["jax_flops_per_cpu_s"] = flops / statistics.median(t["jax"].cpu)
        res["torch_flops_per_cpu_s"] = flops / statistics.median(t["torch"].cpu)
    if device == "gpu" and dtype == "float32":
        res["note"] = "TF32 tensor cores on both sides: JAX's default fp32 precision, and allowed for torch by the bench"
    return res


def run(n: int, device: str, repeats: int, dtype: str = "float32") -> dict[str, Any]:
    return {"nominal": nominal_peak() if device == "cpu" else None, "matmul": matmul_peak(n, device, repeats, dtype)}


def utilisation(train_results: list[dict[str, Any]], peaks: dict[str, Any]) -> list[dict[str, Any]]:
    """Per train case and contender: achieved FLOP/s (XLA's FLOP count) and MFU against both peaks."""
    nominal = (peaks.get("nominal") or {}).get("flops_per_s")
    practical = peaks["matmul"]["flops_per_s"]
    per_core = nominal / peaks["nominal"]["cores"] if nominal else None
    rows = []
    for case in train_results:
        flops = case.get("model_flops_per_step") or case.get("xla_flops_per_step")
        if not flops or not case.get("contenders"):
            continue
        row: dict[str, Any] = {
            "model": case["model"], "size": case["size"], "batch": case["batch"],
            "model_gflops_per_step": flops / 1e9,
            "xla_gflops_per_step": (case.get("xla_flops_per_step") or 0) / 1e9 or None,
            "torch_counted_gflops_per_step": (case.get("torch_flops_per_step") or 0) / 1e9 or None,
            "contenders": {},
        }
        for name, c in case["contenders"].items():
            achieved = flops / c["step_s_median"]
            # host CPU seconds say nothing about an accelerator's utilisation
            per_cpu_s = flops / c["cpu_s_per_step_median"] if nominal and c.get("cpu_s_per_step_median") else None
            row["contenders"][name] = {
                "gflops_per_s": achieved / 1e9,
                "mfu_nominal": achieved / nominal if nominal else None,
                "mfu_practical": achieved / practical,
                # load-independent: FLOPs per CPU-second over one core's nominal peak
                "gflops_per_cpu_s": per_cpu_s / 1e9 if per_cpu_s else None,
                "mfu_cpu_time": per_cpu_s / per_core if per_cpu_s and per_core else None,
            }
        rows.append(row)
    return rows
