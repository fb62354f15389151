"""The bench scripts run end to end at --size tiny and write well-formed results (no speed asserts:
speed targets live in bench/RESULTS.md, never in tests)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from bench import common, mfu
from bench.run import SUITES, BenchConfig, parse_args

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One xdist worker runs this module, so the `tiny` bench (1.5 min) runs once, not once per worker.
pytestmark = pytest.mark.xdist_group("bench")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    env = {**os.environ, "PYTHONPATH": REPO}
    proc = subprocess.run(
        [sys.executable, "bench/run.py", "--size", "tiny", "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1200, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(out / "results.json") as f:
        res = json.load(f)
    return res, (out / "RESULTS.md").read_text(), out


def _positive(x):
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_tiny_train_and_distill_time_the_same_computation(tiny):
    res, _, _ = tiny
    assert res["config"]["size"] == "tiny" and res["machine"]["cpu"]["cores"] >= 1
    (case,) = res["train"]
    assert "error" not in case and "skipped" not in case, case
    con = case["contenders"]
    assert {"jax", "torch_eager", "torch_channels_last"} <= set(con)
    for c in con.values():
        assert _positive(c["items_per_s"]) and c["rounds"] == common.PRESETS["tiny"].repeats
        assert c["items_per_s"] == pytest.approx(case["batch"] / c["step_s_median"])
    for k, r in case["ratio"].items():
        assert r == pytest.approx(con["jax"]["items_per_s"] / con[k]["items_per_s"])
    # same weights, same batch, no dropout in ResNet: the first step's loss agrees across frameworks
    assert con["jax"]["first_loss"] == pytest.approx(con["torch_eager"]["first_loss"], rel=1e-3)
    assert con["torch_channels_last"]["first_loss"] == pytest.approx(con["torch_eager"]["first_loss"], rel=1e-3)
    assert "torch_compile" in case["notes"]  # not timed at tiny, and the report says so

    d = res["distill"]
    assert "error" not in d, d
    assert d["contenders"]["jax"]["first_loss"] == pytest.approx(d["contenders"]["torch_eager"]["first_loss"], rel=1e-3)
    assert _positive(d["ratio"]["torch_eager"])


def test_tiny_pipeline_conversion_mfu(tiny):
    res, _, _ = tiny
    (p,) = res["pipeline"]
    assert {"numpy_pil_uint8", "numpy_pil_jpeg", "jtkd_data_uint8_0w", "jtkd_data_jpeg_0w"} <= set(p["contenders"])
    assert all(_positive(c["items_per_s"]) for c in p["contenders"].values())

    (c,) = res["conversion"]
    import torchvision

    sd = torchvision.models.resnet18().state_dict()
    assert c["checkpoint_mb"] == pytest.approx(sum(t.numel() * t.element_size() for t in sd.values()) / 2**20)
    assert c["converted_mb"] == pytest.approx(c["checkpoint_mb"], rel=0.01)  # num_batches_tracked is dropped
    assert c["peak_delta_mb"] > 0 and _positive(c["cold_s"]) and _positive(c["warm_s"])
    assert isinstance(c["meets_goal"], bool) and isinstance(c["meets_goal_cpu_time"], bool)
    assert 0 < c["cold_cpu_s"] and 0 < c["warm_cpu_s"]
    assert 0 <= c["cold_gc_s"] <= c["cold_s"] and c["cold_full_gcs"] >= 0

    (m,) = res["mfu"]
    # torch counts the multiply-adds on padding, XLA not: at 64 px about 0.8x (model_flops' docstring)
    assert 0.7 < m["model_gflops_per_step"] / m["torch_counted_gflops_per_step"] < 1.05
    assert 0.3 < m["xla_gflops_per_step"] / m["torch_counted_gflops_per_step"] < 3
    assert all(0 < v["mfu_practical"] and 0 < v["mfu_nominal"] < 1 for v in m["contenders"].values())
    assert _positive(res["peaks"]["matmul"]["flops_per_s"])


def test_tiny_report_lists_every_measurement(tiny):
    res, md, out = tiny
    assert (out / "results.png").stat().st_size > 0
    for heading in ("## Machine", "## 1.", "## 2.", "## 3.", "## 4.", "## 5."):
        assert heading in md
    assert res["machine"]["cpu"]["model"] in md and res["machine"]["jax"] in md
    assert res["command"] in md
    case = res["train"][0]
    row = next(line for line in md.splitlines() if line.startswith(f"| {case['model']} | {case['size']} | {case['batch']} |"))
    assert f"{case['contenders']['jax']['items_per_s']:.1f}" in row
    assert f"{case['ratio']['torch_eager']:.2f}x" in row
    # every Markdown table row has as many cells as its header
    lines = md.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("|---"):
            n = lines[i - 1].count("|")
            j = i + 1
            while j < len(lines) and lines[j].startswith("|"):
                assert lines[j].count("|") == n, lines[j]
                j += 1


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="--size"):
        BenchConfig(size="huge")
    with pytest.raises(ValueError, match="unknown suite"):
        BenchConfig(only=("train", "speed"))
    with pytest.raises(ValueError, match="--compile"):
        BenchConfig(compile="sometimes")
    with pytest.raises(SystemExit):
        parse_args(["--device", "tpu"])
    cfg = parse_args(["--size", "tiny", "--only", "train,mfu", "--models", "resnet18"])
    assert cfg.only == ("train", "mfu") and cfg.models == ("resnet18",) and set(cfg.only) <= set(SUITES)


def test_interleaved_rotates_and_divides_by_steps():
    calls = []

    def runner(name):
        return lambda n: calls.append((name, n))

    t = common.interleaved({"a": runner("a"), "b": runner("b")}, warmup=2, repeats=3, steps=4)
    assert calls[:2] == [("a", 2), ("b", 2)]
    assert [c[0] for c in calls[2:]] == ["a", "b", "b", "a", "a", "b"]
    assert all(n == 4 for _, n in calls[2:])
    assert len(t["a"].wall) == 3 and all(w >= 0 for w in t["a"].wall)


def test_flops_per_cycle_from_cpu_flags():
    zen4 = {"vendor": "AuthenticAMD", "family": "25", "simd": ["avx2", "fma", "avx512f"]}
    assert mfu.flops_per_cycle(zen4)[0] == 32
    assert mfu.flops_per_cycle({**zen4, "family": "26"})[0] == 64
    assert mfu.flops_per_cycle({"vendor": "GenuineIntel", "simd": ["avx2", "fma", "avx512f"]})[0] == 64
    assert mfu.flops_per_cycle({"vendor": "GenuineIntel", "simd": ["avx2", "fma"]})[0] == 32
    assert mfu.flops_per_cycle({"vendor": "GenuineIntel", "simd": ["avx"]})[0] == 8


def test_omp_wait_policy_follows_load(monkeypatch):
    monkeypatch.setattr(common, "load_average", lambda: (100.0, 0.0, 0.0))
    assert common.omp_wait_policy("auto") == "PASSIVE"
    monkeypatch.setattr(common, "load_average", lambda: (0.0, 0.0, 0.0))
    assert common.omp_wait_policy("auto") == "default"
    monkeypatch.setattr(common, "load_average", lambda: (1.5 * common.num_cores(), 0.0, 0.0))
    assert common.omp_wait_policy("auto") == "default"  # a previous job's tail is not oversubscription
    assert common.omp_wait_policy("active") == "ACTIVE"


def test_conv_routes_times_xla_jtkd_and_torch():
    from bench import investigate

    cases = (("depthwise", 2, 5, 8, 8, 3, 1, 8), ("3x3 on 9x9", 2, 9, 4, 4, 3, 1, 1))
    rows = investigate.conv_routes(cases, repeats=1)
    assert [r["routed"] for r in rows] == [True, False]  # 81 output pixels > the small-map limit
    assert all(r["xla_cpu_s"] > 0 and r["jtkd_cpu_s"] > 0 and r["torch_cpu_s"] > 0 for r in rows)


def test_model_flops_count_every_convolution():
    """3x the forward pass, whatever `layers.conv` routes to oneDNN custom calls (XLA cannot count
    those): resnet50 at 224 px, where padding is a small share, agrees with torch's count."""
    import torch
    import torchvision
    from torch.utils.flop_counter import FlopCounterMode

    from bench.train_step import model_flops

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        torchvision.models.resnet50(num_classes=10)(torch.zeros(2, 3, 224, 224))
    ours = model_flops("resnet50", 224, 2)
    assert ours == pytest.approx(3 * counter.get_total_flops(), rel=0.03)


def _run(device, cpu, train, **suites):
    return {"config": {"device": device}, "command": f"python -m bench {cpu}", "preset": {}, "elapsed_s": 1.0,
            "machine": {"cpu": {"model": cpu}, "torch_cuda_device": None}, "train": train, **suites}


def _case(model, ips, flops=1e9):
    return {"model": model, "size": 64, "batch": 2, "model_flops_per_step": flops,
            "contenders": {"jax": {"step_s_median": 2 / ips, "items_per_s": ips}}}


def test_merge_keeps_every_case_and_the_latest_of_each():
    from bench.report import merge

    peaks = {"nominal": None, "matmul": {"flops_per_s": 1e10}}
    a = _run("gpu", "X", [_case("resnet18", 10.0), _case("resnet50", 5.0)])
    b = _run("gpu", "X", [_case("resnet18", 20.0)], peaks=peaks, distill={"ratio": {"torch_eager": 1.5}})
    m = merge([a, b])
    assert [(c["model"], c["contenders"]["jax"]["items_per_s"]) for c in m["train"]] == [("resnet18", 20.0), ("resnet50", 5.0)]
    assert m["distill"] == b["distill"] and m["commands"] == [a["command"], b["command"]]
    assert [r["contenders"]["jax"]["mfu_practical"] for r in m["mfu"]] == pytest.approx([1.0, 0.25])
    assert m["mfu"][0]["contenders"]["jax"]["gflops_per_cpu_s"] is None  # no nominal peak: an accelerator
    with pytest.raises(ValueError, match="different machines"):
        merge([a, _run("gpu", "Y", [])])
    with pytest.raises(ValueError, match="precisions"):
        merge([a, {**_run("gpu", "X", []), "config": {"device": "gpu", "dtype": "bfloat16"}}])


def test_train_cases_are_handed_over_one_by_one():
    """`on_case` sees every finished case at once, so `python -m bench` saves them as it goes."""
    import dataclasses

    from bench import train_step

    # both skipped: an unknown model, and alexnet below its 63 px
    cases = (common.TrainCase("no_such_model", 64, 2), common.TrainCase("alexnet", 32, 2))
    preset = dataclasses.replace(common.PRESETS["tiny"], train=cases)
    seen = []
    out = train_step.run(preset, "cpu", "none", on_case=lambda r: seen.append([c["model"] for c in r]))
    assert seen == [["no_such_model"], ["no_such_model", "alexnet"]]
    assert all("skipped" in c for c in out)


def test_bfloat16_case_times_mixed_precision_on_both_sides(tiny):
    """--dtype bfloat16: jtkd computes in bf16 and torch under autocast; the same weights and batch as
    the float32 `tiny` run give first-step losses that agree to bf16 precision, and differ from it."""
    import dataclasses

    from bench import train_step

    (case,) = common.PRESETS["tiny"].train
    preset = dataclasses.replace(common.PRESETS["tiny"], repeats=1, warmup=0)
    f32 = tiny[0]["train"][0]["contenders"]
    bf16 = train_step.run_case(case, preset, "cpu", False, dtype="bfloat16")["contenders"]
    assert bf16["jax"]["first_loss"] == pytest.approx(bf16["torch_eager"]["first_loss"], rel=2e-2)
    assert bf16["jax"]["first_loss"] != f32["jax"]["first_loss"]
    assert bf16["torch_eager"]["first_loss"] != f32["torch_eager"]["first_loss"]
    assert BenchConfig(dtype="bfloat16").dtype == "bfloat16"
    with pytest.raises(ValueError, match="--dtype"):
        BenchConfig(dtype="float16")
