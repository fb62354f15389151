"""A run killed with SIGKILL mid-training resumes from its last checkpoint and ends bit-identical
to an uninterrupted run (separate processes, as a real crash)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from jtkd.loop import read_jsonl

WORKER = Path(__file__).with_name("engine_worker.py")
ROOT = WORKER.parent.parent
STEPS = 24


def _cmd(workdir, out, sleep=0.0):
    return [sys.executable, str(WORKER), "--workdir", str(workdir), "--steps", str(STEPS), "--out", str(out),
            "--sleep", str(sleep)]


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def _run(cmd):
    p = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


def _steps(workdir):
    d = Path(workdir) / "checkpoints" / "state"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def test_sigkill_mid_training_then_resume_is_bitwise_identical(tmp_path):
    out = _run(_cmd(tmp_path / "ref", tmp_path / "ref.npz"))
    assert "START latest=None" in out and "DONE" in out

    run = tmp_path / "run"
    proc = subprocess.Popen(_cmd(run, tmp_path / "killed.npz", sleep=0.25), env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    deadline = time.time() + 500
    while time.time() < deadline and proc.poll() is None and not any(s >= 6 for s in _steps(run)):
        time.sleep(0.1)
    assert proc.poll() is None, "the run finished (or died) before it could be killed"
    time.sleep(0.6)  # land somewhere inside the next steps, possibly during a checkpoint write
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed.npz").exists()
    killed_at = max(_steps(run))
    assert 6 <= killed_at < STEPS

    out = _run(_cmd(run, tmp_path / "resumed.npz"))
    latest = int(out.split("START latest=")[1].split()[0])
    assert 6 <= latest < STEPS  # it really resumed from a checkpoint written before the kill
    ref, res = np.load(tmp_path / "ref.npz"), np.load(tmp_path / "resumed.npz")
    assert sorted(ref.files) == sorted(res.files) and ref.files
    for k in ref.files:
        assert np.array_equal(ref[k].view(np.uint8), res[k].view(np.uint8)), k
    strip = lambda rows: [{k: v for k, v in r.items() if k != "steps_per_s"} for r in rows]  # noqa: E731
    assert strip(read_jsonl(run / "metrics.jsonl")) == strip(read_jsonl(tmp_path / "ref" / "metrics.jsonl"))
