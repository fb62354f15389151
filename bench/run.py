"""Run every benchmark side by side in one process tree and write RESULTS.md + results.json.

    python -m bench                       # --size small, CPU, everything (~10-15 min on 2 cores)
    python bench/run.py --size tiny       # seconds: proves the scripts work
    python -m bench --size full --device gpu
    python -m bench --only train,mfu --models resnet18,resnet50 --compile none

Suites: train (fine-tuning step), distill (teacher + student step), pipeline (input images/s),
conversion (convert time and peak memory, subprocess per model), mfu (peaks, FLOP utilisation).
results.json is rewritten after every suite and every train case, so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Any

if __package__ in (None, ""):  # `python bench/run.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import PRESETS, REPO, TrainCase, load_average, machine_info, setup_process
from bench.train_step import DTYPES

SUITES = ("mfu", "train", "distill", "pipeline", "conversion")


@dataclasses.dataclass
class BenchConfig:
    size: str = "small"  # tiny | small | full (see bench.common.PRESETS)
    device: str = "cpu"  # cpu | gpu
    only: tuple[str, ...] = SUITES
    models: tuple[str, ...] = ()  # restrict the train cases to these models (default: the preset's)
    compile: str = "auto"  # torch.compile: auto (the preset's choice per case) | all | none
    repeats: int | None = None  # override the preset's timed rounds
    out: str = os.path.join(REPO, "bench")  # where RESULTS.md, results.json, results.png go
    omp_wait: str = "auto"  # torch's OpenMP wait policy: auto | active | passive | default (bench.common.omp_wait_policy)
    dtype: str = "float32"  # compute dtype: float32 | bfloat16 (jtkd's dtype=bfloat16 against torch.autocast)

    def __post_init__(self) -> None:
        if self.size not in PRESETS:
            raise ValueError(f"--size must be one of {', '.join(PRESETS)}, got {self.size!r}")
        if self.device not in ("cpu", "gpu"):
            raise ValueError(f"--device must be cpu or gpu, got {self.device!r}")
        if self.compile not in ("auto", "all", "none"):
            raise ValueError(f"--compile must be auto, all or none, got {self.compile!r}")
        bad = [s for s in self.only if s not in SUITES]
        if bad:
            raise ValueError(f"unknown suite(s) {bad}; choose from {', '.join(SUITES)}")
        if self.omp_wait not in ("auto", "active", "passive", "default"):
            raise ValueError(f"--omp-wait must be auto, active, passive or default, got {self.omp_wait!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.repeats is not None and self.repeats < 1:
            raise ValueError(f"--repeats must be >= 1, got {self.repeats}")


def parse_args(argv: list[str] | None = None) -> BenchConfig:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = BenchConfig()
    p.add_argument("--size", default=d.size, choices=list(PRESETS))
    p.add_argument("--device", default=d.device, choices=["cpu", "gpu"])
    p.add_argument("--only", default=",".join(d.only), help=f"comma-separated suites from {','.join(SUITES)}")
    p.add_argument("--models", default="", help="comma-separated model names to keep among the train cases")
    p.add_argument("--compile", default=d.compile, choices=["auto", "all", "none"], help="which train cases also time torch.compile")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--out", default=d.out)
    p.add_argument("--omp-wait", default=d.omp_wait, choices=["auto", "active", "passive", "default"],
                   help="torch's OpenMP wait policy; auto = passive when the load average exceeds twice the cores")
    p.add_argument("--dtype", default=d.dtype, choices=list(DTYPES),
                   help="compute dtype: bfloat16 times jtkd's mixed precision against torch.autocast (parameters stay float32)")
    a = p.parse_args(argv)
    return BenchConfig(
        size=a.size, device=a.device, only=tuple(s for s in a.only.split(",") if s),
        models=tuple(m for m in a.models.split(",") if m), compile=a.compile, repeats=a.repeats, out=a.out, omp_wait=a.omp_wait,
        dtype=a.dtype,
    )


def command_line(cfg: BenchConfig) -> str:
    parts = ["python -m bench", f"--size {cfg.size}", f"--device {cfg.device}"]
    if tuple(cfg.only) != SUITES:
        parts.append(f"--only {','.join(cfg.only)}")
    if cfg.models:
        parts.append(f"--models {','.join(cfg.models)}")
    if cfg.compile != "auto":
        parts.append(f"--compile {cfg.compile}")
    if cfg.repeats:
        parts.append(f"--repeats {cfg.repeats}")
    if cfg.omp_wait != "auto":
        parts.append(f"--omp-wait {cfg.omp_wait}")
    if cfg.dtype != "float32":
        parts.append(f"--dtype {cfg.dtype}")
    return " ".join(parts)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    setup_process(cfg.device, cfg.omp_wait)
    from tqdm import tqdm

    from bench import conversion, distill, mfu, pipeline, report, train_step

    preset = PRESETS[cfg.size]
    if cfg.repeats:
        preset = dataclasses.replace(preset, repeats=cfg.repeats)
    if cfg.models:
        preset = dataclasses.replace(preset, train=tuple(c for c in preset.train if c.model in cfg.models))
    os.makedirs(cfg.out, exist_ok=True)
    t_start = time.time()
    results: dict[str, Any] = {
        "config": {**dataclasses.asdict(cfg), "out": os.path.relpath(cfg.out, REPO)},
        "command": command_line(cfg),
        "preset": dataclasses.asdict(preset),
        "machine": machine_info(cfg.device),
        "load_average_start": load_average(),
    }

    def save() -> None:
        results["load_average_end"] = load_average()
        results["elapsed_s"] = time.time() - t_start
        with open(os.path.join(cfg.out, "results.json"), "w") as f:
            json.dump(results, f, indent=1, default=str)

    r = preset.repeats
    rounds = {
        "mfu": r,
        "train": r * len(preset.train),
        "distill": r,
        "pipeline": r * len(preset.pipeline_sizes),
        "conversion": len(preset.conversion),
    }
    with tqdm(total=sum(rounds[s] for s in cfg.only), desc="bench", unit="round", file=sys.stderr) as bar:
        for suite in SUITES:
            if suite not in cfg.only:
                continue
            bar.set_description(suite)
            t0 = time.time()
            if suite == "mfu":
                results["peaks"] = mfu.run(preset.matmul_n, cfg.device, r, cfg.dtype)
                bar.update(r)
            elif suite == "train":
                def keep(cases: list[dict[str, Any]]) -> None:
                    results["train"] = cases
                    save()

                results["train"] = train_step.run(preset, cfg.device, cfg.compile, bar, on_case=keep, dtype=cfg.dtype)
            elif suite == "distill":
                results["distill"] = distill.run(preset, cfg.device, bar, cfg.dtype)
            elif suite == "pipeline":
                results["pipeline"] = pipeline.run(preset, bar)
            elif suite == "conversion":
                results["conversion"] = conversion.run(preset, bar)
            results.setdefault("suite_seconds", {})[suite] = time.time() - t0
            save()
    if "peaks" in results and "train" in results:
        results["mfu"] = mfu.utilisation(results["train"], results["peaks"])
    save()
    md = report.render(results)
    with open(os.path.join(cfg.out, "RESULTS.md"), "w") as f:
        f.write(md)
    report.plot(results, os.path.join(cfg.out, "results.png"))
    print(report.summary(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["BenchConfig", "TrainCase", "main", "parse_args"]
