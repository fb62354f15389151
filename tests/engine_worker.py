"""A training run in its own process, for the crash (SIGKILL) and multi-host tests.

    python tests/engine_worker.py --workdir W --steps N --out OUT.npz [--sleep S]
        [--process_id P --num_processes K --port PORT --local_devices D]

Prints 'START latest=<step or None>' before training and 'DONE' at the end; writes the final
params (and the eval metrics) to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ap = argparse.ArgumentParser()
ap.add_argument("--workdir", default="")
ap.add_argument("--steps", type=int, default=20)
ap.add_argument("--out", required=True)
ap.add_argument("--sleep", type=float, default=0.0)
ap.add_argument("--process_id", type=int, default=-1)
ap.add_argument("--num_processes", type=int, default=1)
ap.add_argument("--port", type=int, default=0)
ap.add_argument("--local_devices", type=int, default=4)
args = ap.parse_args()

os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.local_devices}"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402

if args.process_id >= 0:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{args.port}", num_processes=args.num_processes,
                               process_id=args.process_id)

import numpy as np  # noqa: E402

from engine_helpers import Tiny, dataset, init  # noqa: E402
from jtkd import optim, train  # noqa: E402
from jtkd.checkpoint import TrainCheckpointer  # noqa: E402
from jtkd.loop import ArraySource, EvalSource, LoopConfig, Trainer, classification_eval  # noqa: E402

mesh = train.make_mesh()
cfg = optim.OptimConfig(optimizer="adamw", lr=0.01, weight_decay=0.01, warmup_steps=2)
variables = jax.device_get(init(Tiny(3)))
tx = optim.make_optimizer(cfg, variables["params"], total_steps=args.steps)
state = train.replicate(mesh, train.TrainState.create(Tiny(3, axis_name=train.AXIS).apply, variables, tx, seed=1))
trainer = Trainer(mesh, train.classification_loss(), classification_eval(),
                  config=LoopConfig(steps=args.steps, log_every=2, eval_every=0, checkpoint_every=2, max_to_keep=2,
                                    progress=False, best_metric=""),
                  schedule=optim.make_schedule(cfg, args.steps))
src = ArraySource(dataset(64, seed=1), batch_size=16, seed=0)  # each process reads its slice


def data(step):
    if args.sleep:
        time.sleep(args.sleep)  # widen the window in which the parent kills us
    return src(step)


latest = None
if args.workdir:
    with TrainCheckpointer(os.path.join(args.workdir, "checkpoints")) as ck:
        latest = ck.latest_step()
print(f"START latest={latest}", flush=True)
state, rows = trainer.fit(state, data, EvalSource(dataset(30, seed=2), batch_size=8),
                          workdir=args.workdir or None)
params = jax.device_get(state.params)
flat = {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(params)}
np.savez(args.out, **flat)
with open(args.out + ".json", "w") as f:
    json.dump([{k: v for k, v in r.items() if k != "steps_per_s"} for r in rows], f)
print("DONE", flush=True)
