"""Why is the jtkd step slower than PyTorch on this CPU? Evidence, not guesses.

    python -m bench.investigate [--what profile,conv,routes,flags] [--model resnet18 --size 64 --batch 16]

- profile: runs the compiled jtkd train step under the JAX profiler and splits the XLA worker
  threads' time by kind of HLO instruction (YNNPACK library fusions, XLA loop fusions, convolutions
  left to XLA by their dimension layout, ...), naming the most expensive instructions.
- conv: one 3x3 convolution, C -> C channels, forward + both gradients, jax.jit vs torch, over
  feature-map sides; reports CPU seconds (all threads) and whether XLA swapped the operands (the
  optimised HLO holds a convolution with dim_labels `01fb_o01i->f01b`).
- routes: the convolution shapes `jtkd.models.layers.conv` computes as matmuls (and two it leaves
  to XLA), forward + both gradients: XLA's convolution vs jtkd's route vs torch.
- flags: the same train step under several XLA_FLAGS, one subprocess each (flags are read once).
CPU time is the metric (time.process_time over all threads): on a shared machine wall time
mostly measures the other tenants. torch runs with OMP_WAIT_POLICY=PASSIVE so spinning does
not count as work. Writes bench/investigation.json.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import REPO, setup_process

SWAPPED = "01fb_o01i->f01b"
FLAGS = (
    "",
    "--xla_cpu_use_onednn=true",
    "--xla_cpu_use_xnnpack=true",
    "--xla_cpu_experimental_xnn_fusion_type=+LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION",
    "--xla_cpu_experimental_ynn_fusion_type=",
    "--xla_cpu_multi_thread_eigen=false",
    "--xla_cpu_prefer_vector_width=512",
)


def _cpu_time(fn: Any, repeats: int) -> float:
    fn()
    out = []
    for _ in range(repeats):
        c0 = time.process_time()
        fn()
        out.append(time.process_time() - c0)
    return statistics.median(out)


def _jtkd_step(model: str, size: int, batch: int) -> tuple[Any, Any, Any, Any]:
    import jax
    import optax

    from bench.train_step import make_batch
    from jtkd import models, train

    mesh = train.make_mesh(1)
    module = models.create(model, num_classes=10, axis_name=train.AXIS)
    variables = models.init(module, jax.random.key(0), size)
    state = train.replicate(mesh, train.TrainState.create(module.apply, variables, optax.sgd(0.01, momentum=0.9)))
    b = train.shard_batch(mesh, make_batch(size, batch))
    compiled = train.make_train_step(mesh, train.classification_loss()).lower(state, b, None).compile()
    return compiled, state, b, mesh


def step_cpu_seconds(model: str, size: int, batch: int, repeats: int = 3) -> dict[str, Any]:
    import jax

    compiled, state, b, _ = _jtkd_step(model, size, batch)
    holder = {"s": state}

    def one() -> None:
        s, _ = compiled(holder["s"], b, None)
        jax.block_until_ready(s)
        holder["s"] = s

    return {"flags": os.environ.get("XLA_FLAGS", ""), "cpu_s_per_step": _cpu_time(one, repeats),
            "swapped_convs": compiled.as_text().count(SWAPPED)}


def _instruction_kinds(hlo: str) -> dict[str, str]:
    kinds = {}
    for line in hlo.splitlines():
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = .*? (convolution|fusion|custom-call|all-reduce|copy|dot|reduce-window|select-and-scatter)\(", line)
        if not m:
            continue
        kind = m.group(2)
        if kind == "convolution":
            dl = re.search(r"dim_labels=([^,]*)", line)
            kind = f"XLA convolution {dl.group(1) if dl else ''}" + (" (operands swapped)" if dl and dl.group(1) == SWAPPED else "")
        elif kind == "fusion":
            lib = re.search(r'"kind":"(__\w+)"', line)
            loop = re.search(r"kind=(\w+)", line)
            kind = f"library fusion {lib.group(1)}" if lib else f"XLA {loop.group(1) if loop else ''} fusion"
        op = re.search(r'op_name="([^"]*)"', line)
        kinds[m.group(1)] = kind + ("\t" + op.group(1) if op else "")
    return kinds


def profile(model: str, size: int, batch: int, steps: int = 3) -> dict[str, Any]:
    """Per-kind share of the XLA worker threads' busy time during `steps` train steps."""
    import jax
    from jax.profiler import ProfileData

    compiled, state, b, _ = _jtkd_step(model, size, batch)
    state, _ = compiled(state, b, None)
    jax.block_until_ready(state)
    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d)
        for _ in range(steps):
            state, _ = compiled(state, b, None)
        jax.block_until_ready(state)
        jax.profiler.stop_trace()
        trace = max(glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True))
        data = ProfileData.from_file(trace)
        per_op: collections.Counter[str] = collections.Counter()
        for plane in data.planes:
            for line in plane.lines:
                if not line.name.startswith("tf_XLAEigen"):  # XLA's intra-op worker threads
                    continue
                for ev in line.events:
                    if ev.name != "ThunkExecutor::Execute" and not ev.name.startswith("end:"):
                        per_op[ev.name] += ev.duration_ns
    kinds = _instruction_kinds(compiled.as_text())
    per_kind: collections.Counter[str] = collections.Counter()
    for name, ns in per_op.items():
        per_kind[kinds.get(name, "other\t").split("\t")[0]] += ns
    total = sum(per_kind.values()) or 1
    top = [{"instruction": n, "ms_per_step": ns / steps / 1e6, "share": ns / total, "kind": kinds.get(n, "other\t").replace("\t", " | ")}
           for n, ns in per_op.most_common(int(os.environ.get("TOPN", 8)))]
    return {
        "model": model, "size": size, "batch": batch,
        "busy_ms_per_step": total / steps / 1e6,
        "by_kind": {k: {"ms_per_step": v / steps / 1e6, "share": v / total} for k, v in per_kind.most_common()},
        "top_instructions": top,
    }


def conv_micro(sides: tuple[int, ...], channels: int, batch: int, repeats: int = 3) -> list[dict[str, Any]]:
    """3x3 conv (stride 1, pad 1) forward + input and weight gradients: jax.jit vs torch eager."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    import torch.nn.functional as F

    rows = []
    for side in sides:
        rng = np.random.default_rng(0)
        x = rng.standard_normal((batch, side, side, channels), dtype=np.float32)
        w = rng.standard_normal((3, 3, channels, channels), dtype=np.float32) * 0.02

        def loss(x, w):
            y = jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
            return jnp.sum(y * y)

        g = jax.jit(jax.grad(loss, argnums=(0, 1)))
        xj, wj = jnp.asarray(x), jnp.asarray(w)
        hlo = g.lower(xj, wj).compile().as_text()
        jax_cpu = _cpu_time(lambda g=g, xj=xj, wj=wj: jax.block_until_ready(g(xj, wj)), repeats)

        xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).requires_grad_()
        wt = torch.from_numpy(w.transpose(3, 2, 0, 1).copy()).requires_grad_()

        def torch_step(xt: Any = xt, wt: Any = wt) -> None:
            xt.grad = wt.grad = None
            (F.conv2d(xt, wt, padding=1) ** 2).sum().backward()

        torch_cpu = _cpu_time(torch_step, repeats)
        flops = 3 * 2 * batch * side * side * channels * channels * 9  # fwd + 2 grads, MACs x 2
        rows.append({
            "side": side, "channels": channels, "batch": batch, "gflop": flops / 1e9,
            "jax_cpu_s": jax_cpu, "torch_cpu_s": torch_cpu, "jax_over_torch_cpu": jax_cpu / torch_cpu,
            "xla_swapped_convs": hlo.count(SWAPPED),
        })
    return rows


# (name, batch, side, c_in, c_out, kernel, stride, groups): the shapes `layers.conv` routes, and its limits
ROUTE_CASES = (
    ("3x3 on a 2x2 map (resnet layer4 at 64 px)", 16, 2, 256, 256, 3, 1, 1),
    ("3x3 stride 2 on 4x4", 16, 4, 128, 256, 3, 2, 1),
    ("3x3 on 7x7 (resnet layer4 at 224 px)", 8, 7, 512, 512, 3, 1, 1),
    ("3x3 on 14x14 (left to XLA)", 8, 14, 256, 256, 3, 1, 1),
    ("3x3 on 56x56 (left to XLA)", 8, 56, 64, 64, 3, 1, 1),
    ("1x1 on 56x56 (resnet50 layer1)", 8, 56, 64, 256, 1, 1, 1),
    ("1x1 on 7x7 (resnet50 layer4)", 8, 7, 512, 2048, 1, 1, 1),
    ("depthwise 5x5 on 7x7 (mobilenet_v3)", 8, 7, 960, 960, 5, 1, 960),
    ("depthwise 3x3 stride 2 on 112x112", 8, 112, 64, 64, 3, 2, 64),
    ("grouped 3x3, 32 groups, 56x56 (resnext50 layer1)", 8, 56, 128, 128, 3, 1, 32),
    ("grouped 3x3, 32 groups, 7x7 (resnext50 layer4)", 8, 7, 1024, 1024, 3, 1, 32),
)


def conv_routes(cases: tuple = ROUTE_CASES, repeats: int = 3) -> list[dict[str, Any]]:
    """Forward + both gradients of one convolution: XLA's lax.conv vs jtkd's `layers.conv` (which
    computes some shapes as matmuls, see its docstring) vs torch eager, in CPU seconds."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    import torch.nn.functional as F

    from jtkd.models import layers

    rows = []
    for name, batch, side, cin, cout, k, stride, groups in cases:
        rng = np.random.default_rng(0)
        x = rng.standard_normal((batch, side, side, cin), dtype=np.float32)
        w = rng.standard_normal((k, k, cin // groups, cout), dtype=np.float32) * 0.02
        pad = k // 2
        row: dict[str, Any] = {"case": name, "batch": batch, "side": side, "c_in": cin, "c_out": cout, "kernel": k,
                               "stride": stride, "groups": groups}
        for label, conv in (("xla", jax.lax.conv_general_dilated), ("jtkd", layers.conv)):
            def loss(x, w, conv=conv):
                y = conv(x, w, (stride, stride), ((pad, pad), (pad, pad)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
                         feature_group_count=groups)
                return jnp.sum(y * y)

            g = jax.jit(jax.grad(loss, argnums=(0, 1)))
            xj, wj = jnp.asarray(x), jnp.asarray(w)
            row[f"{label}_cpu_s"] = _cpu_time(lambda g=g, xj=xj, wj=wj: jax.block_until_ready(g(xj, wj)), repeats)
            if label == "jtkd":
                row["routed"] = "conv_general_dilated" not in str(jax.make_jaxpr(loss)(xj, wj))
        xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).requires_grad_()
        wt = torch.from_numpy(w.transpose(3, 2, 0, 1).copy()).requires_grad_()

        def torch_step(xt: Any = xt, wt: Any = wt) -> None:
            xt.grad = wt.grad = None
            (F.conv2d(xt, wt, stride=stride, padding=pad, groups=groups) ** 2).sum().backward()

        row["torch_cpu_s"] = _cpu_time(torch_step, repeats)
        row["xla_over_jtkd"] = row["xla_cpu_s"] / row["jtkd_cpu_s"]
        row["jtkd_over_torch"] = row["jtkd_cpu_s"] / row["torch_cpu_s"]
        rows.append(row)
        print(f"{name}: XLA {row['xla_cpu_s'] * 1e3:.1f} ms, jtkd {row['jtkd_cpu_s'] * 1e3:.1f} ms "
              f"({'routed' if row['routed'] else 'XLA'}), torch {row['torch_cpu_s'] * 1e3:.1f} ms", flush=True)
    return rows


def flag_sweep(model: str, size: int, batch: int, flags: tuple[str, ...] = FLAGS) -> list[dict[str, Any]]:
    out = []
    for f in flags:
        env = {**os.environ, "XLA_FLAGS": f, "PYTHONPATH": REPO}
        code = ("import json,sys; from bench.investigate import setup_process, step_cpu_seconds; setup_process('cpu'); "
                f"print(json.dumps(step_cpu_seconds({model!r}, {size}, {batch})))")
        p = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=900, check=False)
        lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
        out.append(json.loads(lines[-1]) if lines else {"flags": f, "error": p.stderr.strip()[-500:]})
        print(out[-1], flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.investigate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--what", default="profile,conv,flags")
    p.add_argument("--model", default="resnet18")
    p.add_argument("--size", type=int, nargs="+", default=[64, 224])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--conv-sides", type=int, nargs="+", default=[2, 3, 4, 7, 14])
    p.add_argument("--channels", type=int, default=256)
    p.add_argument("--out", default=os.path.join(REPO, "bench", "investigation.json"))
    a = p.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    setup_process("cpu", "passive")
    what = set(a.what.split(","))
    res: dict[str, Any] = {"argv": sys.argv[1:], "load_average_start": os.getloadavg()}
    if os.path.exists(a.out):
        with open(a.out) as f:
            res = {**json.load(f), **res}
    if "profile" in what:
        new = [profile(a.model, s, a.batch) for s in a.size]
        res.setdefault("profile", {}).update({f"{pr['model']}@{pr['size']}x{pr['batch']}": pr for pr in new})
        for pr in new:
            print(f"{pr['model']} {pr['size']}px b{pr['batch']}: {pr['busy_ms_per_step']:.0f} ms busy/step")
            for k, v in pr["by_kind"].items():
                print(f"  {100 * v['share']:5.1f}%  {k}")
    if "conv" in what:
        rows = conv_micro(tuple(a.conv_sides), a.channels, a.batch, repeats=5)
        res.setdefault("conv", {})[f"c{a.channels}_b{a.batch}"] = rows
        for r in rows:
            print(r)
    if "routes" in what:
        res["routes"] = conv_routes(repeats=5)
    if "flags" in what:
        res.setdefault("flags", {}).update({f"{a.model}@{s}x{a.batch}": flag_sweep(a.model, s, a.batch) for s in a.size})
    res["load_average_end"] = os.getloadavg()
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
