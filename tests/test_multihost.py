"""Two JAX processes on localhost (CPU, gloo collectives) train one data-parallel model: each reads
its slice of every global batch, and both end with the parameters of a one-process run over the
same 4 devices."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

WORKER = Path(__file__).with_name("engine_worker.py")
ROOT = WORKER.parent.parent


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_agree_with_one(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    port = _free_port()
    base = [sys.executable, str(WORKER), "--steps", "6"]
    procs = [
        subprocess.Popen(base + ["--out", str(tmp_path / f"p{i}.npz"), "--workdir", str(tmp_path / "mh"), "--process_id",
                                 str(i), "--num_processes", "2", "--port", str(port), "--local_devices", "2"],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    logs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, logs):
        assert p.returncode == 0, err[-3000:]
    single = subprocess.run(base + ["--out", str(tmp_path / "one.npz"), "--local_devices", "4"], env=env,
                            capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]

    p0, p1, one = (np.load(tmp_path / f) for f in ("p0.npz", "p1.npz", "one.npz"))
    assert sorted(p0.files) == sorted(one.files) and p0.files
    for k in p0.files:
        assert np.array_equal(p0[k], p1[k]), k  # replicated parameters are identical on both hosts
        np.testing.assert_allclose(p0[k], one[k], rtol=2e-5, atol=1e-6, err_msg=k)
    ev = [json.loads((tmp_path / f"{n}.npz.json").read_text())[-1] for n in ("p0", "p1", "one")]
    assert ev[0] == ev[1] and ev[0]["eval/count"] == 30  # eval sums every example once across hosts
    np.testing.assert_allclose(ev[0]["eval/loss"], ev[2]["eval/loss"], rtol=1e-4)
    assert (tmp_path / "mh" / "checkpoints" / "state" / "6").is_dir()  # orbax wrote one checkpoint for both
