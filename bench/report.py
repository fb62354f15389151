"""results.json -> RESULTS.md (Markdown tables + machine description) and results.png."""

from __future__ import annotations

import os
from typing import Any

from bench.conversion import GOAL_MEMORY_RATIO, GOAL_SECONDS

TORCH = ("torch_eager", "torch_channels_last", "torch_compile")
LABEL = {
    "jax": "jtkd (jit)",
    "torch_eager": "torch eager",
    "torch_channels_last": "torch eager channels_last",
    "torch_compile": "torch.compile",
}
FINDINGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "FINDINGS.md")


def _f(v: Any, fmt: str = ".3g", none: str = "-") -> str:
    if v is None:
        return none
    if isinstance(v, float):
        return format(v, fmt)
    return str(v)


def _x(v: float | None) -> str:
    return "-" if v is None else f"**{v:.2f}x**"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out + [""]


def _machine(res: dict[str, Any]) -> list[str]:
    m, cpu = res["machine"], res["machine"]["cpu"]
    la0, la1 = res.get("load_average_start"), res.get("load_average_end")
    rows = [
        ["CPU", f"{cpu['model']} ({cpu['vendor']} family {cpu['family']}), {cpu['mhz']} MHz, {cpu['hypervisor'] or 'bare metal'} guest" if cpu["hypervisor"] else f"{cpu['model']}, {cpu['mhz']} MHz"],
        ["cores used", f"{cpu['cores']} (threads/core {cpu['threads_per_core']}), L3 {cpu['l3']}"],
        ["SIMD", " ".join(cpu["simd"])],
        ["memory", f"{m['memory_gib']} GiB"],
        ["load average (1/5/15 min) at start / end", f"{_load(la0)} / {_load(la1)}"],
        ["JAX devices", ", ".join(m["jax_devices"])],
        ["versions", f"jax {m['jax']}, jaxlib {m['jaxlib']}, flax {m['flax']}, optax {m['optax']}, torch {m['torch']}, torchvision {m['torchvision']}, Python {m['python']}"],
        ["threads", f"torch intra-op {m['torch_threads']} (set to the core count), inter-op {m['torch_interop_threads']}, OMP_WAIT_POLICY {m.get('omp_wait_policy', 'default')}; XLA CPU: one device, Eigen pool over all cores"],
        ["XLA_FLAGS", f"`{m['xla_flags']}`" if m["xla_flags"] else "(none)"],
        ["jtkd on oneDNN", m.get("jtkd_onednn", "- (not recorded)")],
        ["malloc", m.get("malloc", "- (not recorded)")],
        ["torch CUDA device", m.get("torch_cuda_device", "-")],
        ["precision", _precision(res)],
        ["git / date", f"{m['git']} / {m['date']}"],
        ["bench wall time", f"{res.get('elapsed_s', 0) / 60:.1f} min"],
    ]
    return _table(["", ""], rows)


def _precision(res: dict[str, Any]) -> str:
    if res["config"].get("dtype", "float32") == "bfloat16":
        return ("bfloat16 compute, float32 parameters, BatchNorm statistics and loss: jtkd `dtype=bfloat16`, "
                "torch `autocast(dtype=bfloat16)`")
    return "float32" + (" (TF32 tensor cores for matmuls and convolutions: JAX's default precision, allowed for torch "
                        "by the bench)" if res["config"].get("device") == "gpu" else "")


def _load(la: Any) -> str:
    return "/".join(f"{v:.1f}" for v in la) if la else "?"


def _train(res: dict[str, Any]) -> list[str]:
    rows, notes = [], []
    for c in res.get("train", []):
        label = [c["model"], str(c["size"]), str(c["batch"])]
        if "skipped" in c or "error" in c:
            notes.append(f"- {c['model']} @ {c['size']} px: {'skipped: ' + c['skipped'] if 'skipped' in c else 'ERROR: ' + c['error']}")
            continue
        con, ratio = c["contenders"], c.get("ratio", {})
        ips = [_f(con[k]["items_per_s"], ".1f") if k in con else "-" for k in ("jax",) + TORCH]
        losses = "/".join(_f(con[k]["first_loss"], ".4f") for k in ("jax", "torch_eager") if k in con)
        cpu = [_f(con[k]["cpu_s_per_step_median"], ".2f") if k in con else "-" for k in ("jax", "torch_eager")]
        rows.append(
            [*label, *ips, *(_x(ratio.get(k)) for k in TORCH), *cpu, _f(c.get("jax_compile_s"), ".1f"),
             _f(con.get("torch_compile", {}).get("first_step_s"), ".0f"), losses]
        )
        for k, v in c.get("notes", {}).items():
            if "failed" in v:
                notes.append(f"- {c['model']} @ {c['size']} px, {LABEL.get(k, k)}: {v}")
    header = ["model", "px", "batch", "jtkd img/s", "torch eager img/s", "channels_last img/s", "torch.compile img/s",
              "jtkd / eager", "jtkd / channels_last", "jtkd / compile", "jtkd CPU s/step", "eager CPU s/step", "jtkd compile s", "torch.compile 1st step s",
              "1st-step loss jtkd/torch"]
    out = _table(header, rows)
    return out + (notes + [""] if notes else [])


def _distill(res: dict[str, Any]) -> list[str]:
    d = res.get("distill")
    if not d:
        return []
    head = f"{d['teacher']} -> {d['student']}, {d['size']} px, batch {d['batch']}"
    if "skipped" in d or "error" in d:
        return [f"{head}: {d.get('skipped') or 'ERROR: ' + d.get('error', '')}", ""]
    con = d["contenders"]
    rows = [[LABEL[k], _f(v["items_per_s"], ".1f"), _f(v["step_s_median"], ".3f"), _f(v["first_loss"], ".4f")] for k, v in con.items()]
    return [(f"{head}. jtkd loss: {d.get('jax_loss')}; jtkd compile {_f(d.get('jax_compile_s'), '.1f')} s. "
            f"**jtkd / torch eager = {d['ratio']['torch_eager']:.2f}x**"), ""] + _table(["", "img/s", "s/step (median)", "1st-step loss"], rows)


def _pipeline(res: dict[str, Any]) -> list[str]:
    out, rows = [], []
    train = [c for c in res.get("train", []) if "jax" in c.get("contenders", {})]
    for p in res.get("pipeline", []):
        if "error" in p:
            out.append(f"- {p['size']} px: ERROR {p['error']}")
            continue
        needs = [(c["model"], c["contenders"]["jax"]["items_per_s"]) for c in train if c["size"] == p["size"]]
        fastest = max(needs, key=lambda t: t[1]) if needs else None
        for k, v in p["contenders"].items():
            head = "-" if not fastest else f"{v['items_per_s'] / fastest[1]:.1f}x ({fastest[0]} at {fastest[1]:.1f} img/s)"
            rows.append([f"{p['size']} (from {p.get('source_side')} px)", k, _f(v["items_per_s"], ".0f"), head])
        out += [f"- {p['size']} px: mean JPEG {_f(p.get('jpeg_kb_mean'), '.1f')} KiB, batch {p['batch']}"]
    out += [("- numpy_pil_*: resize to side/0.875, random crop, flip, normalise (one thread); jtkd_data_*: "
            "`jtkd.data.batches` + `TrainTransform` with 0 or n worker threads; *_uint8: decoded images, *_jpeg: JPEG bytes decoded per image")]
    return _table(["px", "pipeline", "img/s", "headroom: pipeline / fastest jtkd train step at this px"], rows) + out + [""]


def _conversion(res: dict[str, Any]) -> list[str]:
    rows, notes = [], []
    for c in res.get("conversion", []):
        if "cold_s" not in c:
            notes.append(f"- {c['model']}: {c.get('skipped') or 'ERROR: ' + c.get('error', '')}")
            continue
        bound = " (upper bound)" if c["peak_is_upper_bound"] else ""
        cpu = f" ({c['cold_cpu_s']:.2f} CPU)" if "cold_cpu_s" in c else ""
        gcs = f"{c['cold_gc_s']:.2f} ({c['cold_full_gcs']} full)" if "cold_gc_s" in c else "-"
        wcpu = f" ({c['warm_cpu_s']:.2f} CPU)" if "warm_cpu_s" in c else ""
        rows.append([c["model"], _f(c["checkpoint_mb"], ".1f"), _f(c["cold_s"], ".2f") + cpu, gcs, _f(c["warm_s"], ".2f") + wcpu,
                     _f(c["peak_delta_mb"], ".1f") + bound, f"{c['peak_over_checkpoint']:.2f}x", _f(c["retained_mb"], ".1f"),
                     _f(c["tracemalloc_peak_mb"], ".1f"),
                     ("yes" if c.get("meets_goal") else "no") + (f" (CPU time: {'yes' if c['meets_goal_cpu_time'] else 'no'})" if "meets_goal_cpu_time" in c else "")])
    header = ["model", "state_dict MB", "1st convert s (CPU s)", "of which garbage collection s", "later converts s (CPU s)", "peak RSS delta MB", "peak / state_dict",
              "retained MB", "tracemalloc peak MB", f"goal (<{GOAL_SECONDS:g} s, <{GOAL_MEMORY_RATIO:g}x)"]
    gc_note = ["- Garbage collection: Python's cyclic collector running inside the first call; a full collection walks "
               "every object in the process (torch's and JAX's too), and the allocation counter decides which call pays it "
               "(see `bench/conversion.py`)."] if rows else []
    return _table(header, rows) + gc_note + notes + [""]


def _mfu(res: dict[str, Any]) -> list[str]:
    peaks = res.get("peaks")
    if not peaks:
        return []
    nom, mm = peaks.get("nominal"), peaks["matmul"]
    out = []
    if nom and nom.get("flops_per_s"):
        out.append(f"- nominal peak: {nom['cores']} cores x {nom['ghz']:.2f} GHz x {nom['flops_per_cycle_per_core']} FLOP/cycle "
                   f"= **{nom['flops_per_s'] / 1e9:.0f} GFLOP/s** fp32 (assumption: {nom['assumption']})")
    out.append(f"- practical peak: {mm['n']}x{mm['n']} {'bf16' if mm.get('dtype') == 'bfloat16' else 'fp32'} matmul, XLA {mm['jax_flops_per_s'] / 1e9:.0f} GFLOP/s, "
               f"torch {mm['torch_flops_per_s'] / 1e9:.0f} GFLOP/s -> **{mm['flops_per_s'] / 1e9:.0f} GFLOP/s**" + (f" ({mm['note']})" if mm.get("note") else ""))
    if mm.get("jax_flops_per_cpu_s"):
        out.append(f"- per CPU-second (load-independent): matmul XLA {mm['jax_flops_per_cpu_s'] / 1e9:.0f}, torch "
                   f"{mm['torch_flops_per_cpu_s'] / 1e9:.0f} GFLOP per CPU-s; one core's nominal peak is "
                   f"{nom['flops_per_s'] / nom['cores'] / 1e9:.0f} GFLOP/s" if nom and nom.get("flops_per_s") else "")
    out.append("")
    rows = []
    for r in res.get("mfu", []):
        for k, v in r["contenders"].items():
            rows.append([r["model"], str(r["size"]), str(r["batch"]), LABEL[k], _f(r.get("model_gflops_per_step"), ".1f"),
                         _f(r["xla_gflops_per_step"], ".1f"),
                         _f(r["torch_counted_gflops_per_step"], ".1f"), _f(v["gflops_per_s"], ".1f"),
                         _f(v["mfu_nominal"] and 100 * v["mfu_nominal"], ".1f"), _f(100 * v["mfu_practical"], ".1f"),
                         _f(v.get("gflops_per_cpu_s"), ".1f"), _f(v.get("mfu_cpu_time") and 100 * v["mfu_cpu_time"], ".1f")])
    return out + _table(["model", "px", "batch", "contender", "model GFLOP/step (3x fwd)", "XLA-executed GFLOP/step",
                         "torch-counted GFLOP/step", "model GFLOP/s",
                         "MFU % of nominal", "MFU % of matmul", "GFLOP per CPU-s", "MFU % per CPU-s (1 core nominal)"], rows)


def summary(res: dict[str, Any]) -> str:
    lines = []
    for c in res.get("train", []):
        if c.get("ratio"):
            lines.append(f"{c['model']}@{c['size']}x{c['batch']}: " + ", ".join(f"jtkd/{k}={v:.2f}x" for k, v in c["ratio"].items()))
    d = res.get("distill", {})
    if d.get("ratio"):
        lines.append(f"distill {d['teacher']}->{d['student']}: jtkd/torch_eager={d['ratio']['torch_eager']:.2f}x")
    for c in res.get("conversion", []):
        if "cold_s" in c:
            lines.append(f"convert {c['model']}: {c['cold_s']:.2f} s, peak {c['peak_over_checkpoint']:.2f}x state_dict")
    return "\n".join(lines)


def merge(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from several `python -m bench` runs of the same machine (e.g. one train case per
    process, so that a run cut short keeps what it measured): train cases are concatenated, a later
    run's case replacing an earlier one of the same model/size/batch; every other suite comes from
    the last run that has it; MFU is recomputed over the merged cases."""
    from bench import mfu

    if not runs:
        raise ValueError("merge needs at least one results.json")
    setups = {(r["machine"]["cpu"]["model"], str(r["machine"].get("torch_cuda_device")), r["config"].get("dtype", "float32"))
              for r in runs}
    if len(setups) > 1:
        raise ValueError(f"refusing to merge runs of different machines or precisions (CPU, GPU, dtype): {sorted(setups)}")
    out = {**runs[-1], "commands": [r["command"] for r in runs], "load_average_start": runs[0].get("load_average_start")}
    cases: dict[tuple, dict[str, Any]] = {}
    for r in runs:
        for c in r.get("train", []):
            cases[(c["model"], c["size"], c["batch"])] = c
    out["train"] = list(cases.values())
    for key in ("peaks", "distill", "pipeline", "conversion"):
        have = [r[key] for r in runs if key in r]
        if have:
            out[key] = have[-1]
        else:
            out.pop(key, None)
    out.pop("mfu", None)
    if "peaks" in out and out["train"]:
        out["mfu"] = mfu.utilisation(out["train"], out["peaks"])
    out["elapsed_s"] = sum(r.get("elapsed_s", 0.0) for r in runs)
    return out


def render(res: dict[str, Any], findings: str | None = FINDINGS) -> str:
    cmds = res.get("commands") or [res["command"]]
    p = res["preset"]
    gpu = res["config"].get("device") == "gpu"
    md = [
        "# jtkd benchmarks: JAX (jtkd) vs PyTorch",
        "",
        "Generated by `bench/run.py` from `results.json` beside this file (do not edit by hand; findings live in "
        "`bench/FINDINGS.md`).",
        "",
        f"Reproduce ({'these runs, merged with `python -m bench.report --merge`' if len(cmds) > 1 else 'this run'}"
        f"{'' if gpu else ' / the GPU run'}):",
        "",
        "```",
        *(f"PYTHONPATH=. {c}" for c in cmds),
        *([] if gpu else ["PYTHONPATH=. python -m bench --size full --device gpu   # on a CUDA machine with jax[cuda] + torch cu"]),
        "```",
        "",
        (f"Protocol: every contender runs in this one process on the same batch and weights; after {p['warmup']} warm-up step(s), "
        f"{p['repeats']} timed rounds of {p['steps']} step(s), contenders interleaved in rotating order each round; the median "
        "round is reported. Ratios are jtkd images/s over PyTorch images/s (>1: jtkd faster). A shared machine's load "
        "inflates all contenders' times alike within a round, not the ratio's expectation, but it widens its spread."),
        "",
        "## Machine",
        "",
        *_machine(res),
        "## 1. Fine-tuning train step (SGD momentum, cross-entropy, train mode, 10 classes)",
        "",
        "The first step's losses agree where train mode is deterministic; models with stochastic depth (swin_t: 0.2) "
        "draw their own random masks on each side, so theirs differ a little.",
        "",
        *_train(res),
        "## 2. Distillation step (Hinton KD: teacher eval forward + student train step)",
        "",
        *_distill(res),
        "## 3. Input pipeline vs the train step's consumption",
        "",
        *_pipeline(res),
        "## 4. Checkpoint conversion (`converters.torchvision.convert`, subprocess per model)",
        "",
        *_conversion(res),
        "## 5. Model FLOPs utilisation",
        "",
        *_mfu(res),
    ]
    if findings and os.path.exists(findings):
        with open(findings) as f:
            md += ["## Findings", "", f.read().strip(), ""]
    return "\n".join(md) + "\n"


def plot(res: dict[str, Any], path: str) -> None:
    """Images/s per train case and contender (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = [c for c in res.get("train", []) if c.get("contenders")]
    if not cases:
        return
    names = ("jax",) + TORCH
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(cases)), 4))
    width = 0.8 / len(names)
    for i, n in enumerate(names):
        xs = [j + i * width for j, c in enumerate(cases) if n in c["contenders"]]
        ys = [c["contenders"][n]["items_per_s"] for c in cases if n in c["contenders"]]
        if xs:
            ax.bar(xs, ys, width, label=LABEL[n])
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))])
    ax.set_xticklabels([f"{c['model']}\n{c['size']}px b{c['batch']}" for c in cases], fontsize=8)
    ax.set_ylabel("images/s (train step)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    m = res["machine"]
    where = m.get("torch_cuda_device") or f"{m['cpu']['model']} x{m['cpu']['cores']}"
    ax.set_title(f"jtkd vs PyTorch, {where}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Re-render RESULTS.md (and the plot) from a results.json, e.g. after editing FINDINGS.md; or merge
    several runs' results.json into one."""
    import argparse
    import json

    p = argparse.ArgumentParser(prog="python -m bench.report", description=main.__doc__)
    here = os.path.dirname(os.path.abspath(__file__))
    p.add_argument("results", nargs="*", default=[os.path.join(here, "results.json")])
    p.add_argument("--merge", metavar="DIR", help="merge the given results.json files (see `merge`) into DIR/results.json "
                   "and render there, without FINDINGS.md")
    a = p.parse_args(argv)
    runs = []
    for path in a.results:
        with open(path) as f:
            runs.append(json.load(f))
    if a.merge:
        res, out, findings = merge(runs), a.merge, None
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "results.json"), "w") as f:
            json.dump(res, f, indent=1, default=str)
    elif len(runs) == 1:
        res, out = runs[0], os.path.dirname(os.path.abspath(a.results[0]))
        findings = None if "commands" in res else FINDINGS  # a merged result is rendered as --merge did
    else:
        p.error("several results.json files need --merge DIR")
    with open(os.path.join(out, "RESULTS.md"), "w") as f:
        f.write(render(res, findings))
    plot(res, os.path.join(out, "results.png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
