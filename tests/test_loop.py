"""The training loop: exact resume, crash safety, NaN stop, determinism, evaluation, outputs."""

import dataclasses
import json
import logging
import shutil

import jax
import numpy as np
import pytest
from engine_helpers import Tiny, assert_bitwise_equal, dataset, init

from jtkd import optim, train
from jtkd.checkpoint import CheckpointMismatchError, TrainCheckpointer
from jtkd.loop import (
    ArraySource,
    EvalSource,
    LoopConfig,
    NonFiniteError,
    Resumable,
    Trainer,
    classification_eval,
    read_jsonl,
)

N_DEV = 4  # tests/conftest.py provides 4 fake CPU devices


def _setup(steps=12, lr=0.05, num_classes=3, ema_decay=0.0, **loop_kw):
    mesh = train.make_mesh(N_DEV)
    model = Tiny(num_classes=num_classes, axis_name=train.AXIS)
    cfg = optim.OptimConfig(optimizer="sgd", lr=lr, weight_decay=1e-3, warmup_steps=2)
    variables = jax.device_get(init(Tiny(num_classes)))  # host copies: the donated state never aliases them
    tx = optim.make_optimizer(cfg, variables["params"], total_steps=steps)
    kw = dict(steps=steps, log_every=2, eval_every=4, checkpoint_every=4, progress=False, async_checkpoint=True)
    kw.update(loop_kw)
    trainer = Trainer(
        mesh,
        train.classification_loss(),
        classification_eval(),
        config=LoopConfig(**kw),
        schedule=optim.make_schedule(cfg, steps),
    )

    def fresh_state():
        return train.replicate(mesh, train.TrainState.create(model.apply, variables, tx, seed=3, ema_decay=ema_decay))

    return trainer, fresh_state


def _data(seed=0):
    return ArraySource(dataset(40, seed=1), batch_size=8, seed=seed), EvalSource(dataset(21, seed=2), batch_size=8)


def _rows(rows):
    return [{k: v for k, v in r.items() if k != "steps_per_s"} for r in rows]


class _Crash(RuntimeError):
    pass


def _crashing(src, at_step):
    def get(step):
        if step == at_step:
            raise _Crash(f"simulated crash before step {step}")
        return src(step)

    return get


def test_resume_after_crash_is_bitwise_identical(tmp_path):
    """With a weight average (ema_decay) in the optimizer state: it resumes too, and is evaluated beside the weights."""
    trainer, fresh = _setup(ema_decay=0.9)
    src, ev = _data()
    ref, ref_rows = trainer.fit(fresh(), src, ev, workdir=tmp_path / "ref")
    evals = [r for r in ref_rows if "eval/accuracy" in r]
    assert len(evals) == 3 and all(r["eval_ema/count"] == 21 and r["eval_ema/loss"] != r["eval/loss"] for r in evals)

    with pytest.raises(_Crash):
        trainer.fit(fresh(), _crashing(src, 10), ev, workdir=tmp_path / "run")
    with TrainCheckpointer(tmp_path / "run" / "checkpoints") as ck:
        assert ck.latest_step() == 8  # checkpoints at 4 and 8; step 9's metrics row is past it
    assert max(r["step"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")) == 10

    trainer2, _ = _setup(ema_decay=0.9)  # a new process would rebuild everything
    resumed, _ = trainer2.fit(fresh(), src, ev, workdir=tmp_path / "run")
    assert int(resumed.step) == 12
    for part in ("params", "batch_stats", "opt_state", "rng", "step"):
        assert_bitwise_equal(getattr(ref, part), getattr(resumed, part))
    # the log after resume is the log of the uninterrupted run (rows past step 8 were replaced)
    assert _rows(read_jsonl(tmp_path / "run" / "metrics.jsonl")) == _rows(
        read_jsonl(tmp_path / "ref" / "metrics.jsonl")
    )
    assert _rows(ref_rows) == _rows(read_jsonl(tmp_path / "ref" / "metrics.jsonl"))


def test_same_seed_same_metrics_and_params(tmp_path):
    trainer, fresh = _setup(steps=6, checkpoint_every=0)
    src, ev = _data()
    a, rows_a = trainer.fit(fresh(), src, ev)
    b, rows_b = trainer.fit(fresh(), _data()[0], ev)
    assert _rows(rows_a) == _rows(rows_b) and len(rows_a) > 3
    assert_bitwise_equal(a.params, b.params)
    _, rows_c = trainer.fit(fresh(), _data(seed=1)[0], ev)  # another data order: different run
    assert _rows(rows_c) != _rows(rows_a)


def test_interrupted_checkpoint_write_is_ignored(tmp_path):
    trainer, fresh = _setup(steps=8)
    src, ev = _data()
    state, _ = trainer.fit(fresh(), src, ev, workdir=tmp_path)
    root = tmp_path / "checkpoints" / "state"
    assert sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) == [4, 8]
    # what a write killed half-way leaves: step 12 copied into orbax's temporary name, files truncated
    partial = root / "12.orbax-checkpoint-tmp-1234567"
    shutil.copytree(root / "8", partial)
    for f in sorted(p for p in partial.rglob("*") if p.is_file())[::2]:
        f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 3])
    ck = TrainCheckpointer(tmp_path / "checkpoints")
    try:
        assert ck.latest_step() == 8
        restored = ck.restore(fresh())
    finally:
        ck.close()
    assert int(restored.step) == 8
    assert_bitwise_equal(restored.params, state.params)


def test_a_checkpoint_whose_average_holds_frozen_parameters_resumes(tmp_path):
    """Before the average kept only the trainable parameters it held all of them: such a checkpoint restores
    into a state with a trainable mask, the frozen entries dropped and the rest of the average as saved; any
    other difference is still a mismatch."""
    from engine_helpers import HEAD, STAGES

    variables = jax.device_get(init(Tiny(3)))
    trainable = optim.trainable_mask(variables["params"], "partial", freeze_stages=2, stages=STAGES, head=HEAD)
    tx = optim.make_optimizer(optim.OptimConfig(lr=0.1), variables["params"], total_steps=4, trainable=trainable)
    make = lambda mask: train.TrainState.create(Tiny(3).apply, variables, tx, ema_decay=0.9, trainable=mask)  # noqa: E731
    old = make(None)  # the earlier layout: an average of every parameter
    old = old.replace(ema=jax.tree.map(lambda a: a + 1.0, old.ema))  # distinguishable from the parameters
    with TrainCheckpointer(tmp_path / "ck", async_save=False) as ck:
        ck.save(old)
    with TrainCheckpointer(tmp_path / "ck") as ck:
        restored = ck.restore(make(trainable))
        frozen = {k for k, v in trainable.items() if not any(jax.tree.leaves(v))}
        assert frozen and set(restored.ema["params"]) == set(variables["params"]) - frozen
        for k in restored.ema["params"]:
            assert_bitwise_equal(restored.ema["params"][k], old.ema["params"][k])
        assert_bitwise_equal(restored.ema["batch_stats"], old.ema["batch_stats"])
        with pytest.raises(CheckpointMismatchError, match="ema"):  # a run without an average does not take it
            ck.restore(train.TrainState.create(Tiny(3).apply, variables, tx))


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path):
    trainer, fresh = _setup(steps=12, log_every=2, checkpoint_every=2)
    src, ev = _data()

    def poisoned(step):
        batch = src(step)
        if step == 6:  # the 7th update sees a NaN input
            batch = {**batch, "image": np.full_like(batch["image"], np.nan)}
        return batch

    with pytest.raises(NonFiniteError, match=r"at step 7") as info:
        trainer.fit(fresh(), poisoned, ev, workdir=tmp_path)
    assert info.value.step == 7 and info.value.last_checkpoint == 6
    with TrainCheckpointer(tmp_path / "checkpoints") as ck:
        assert ck.latest_step() == 6
        good = ck.restore(fresh())
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(good.params))
    assert max(r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")) == 6


def test_best_export_and_max_to_keep(tmp_path):
    trainer, fresh = _setup(steps=16, eval_every=2, checkpoint_every=2, max_to_keep=2, lr=0.2)
    src, ev = _data()
    trainer.fit(fresh(), src, ev, workdir=tmp_path)
    with TrainCheckpointer(tmp_path / "checkpoints", best_metric="eval/accuracy") as ck:
        assert ck.all_steps() == [14, 16]
        evals = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "eval/accuracy" in r]
        best = max(evals, key=lambda r: r["eval/accuracy"])  # the first of equal maxima is kept
        assert ck.best_step() == best["step"]
        variables, metrics = ck.restore_best()
    assert metrics["eval/accuracy"] == best["eval/accuracy"]
    assert set(variables) == {"params", "batch_stats"}


def test_eval_counts_every_example_once_with_padding():
    trainer, fresh = _setup(steps=1)
    data = dataset(23, seed=5)  # 23 rows, batches of 8 on 4 devices: last batch 7 real + 1 pad
    state = fresh()
    got = trainer.evaluate(state, EvalSource(data, batch_size=8))
    logits = np.asarray(Tiny(3).apply(jax.device_get(state.variables), data["image"], train=False))
    assert got["eval/count"] == 23
    np.testing.assert_allclose(got["eval/accuracy"], (logits.argmax(-1) == data["label"]).mean(), rtol=1e-6)
    ce = -np.take_along_axis(jax.nn.log_softmax(logits), data["label"][:, None], 1).mean()
    np.testing.assert_allclose(got["eval/loss"], ce, rtol=1e-5)


def test_array_source_is_a_pure_function_of_seed_and_step():
    data = dataset(10)
    a, b = ArraySource(data, 4, seed=7), ArraySource(data, 4, seed=7)
    for step in (0, 3, 2, 11):
        np.testing.assert_array_equal(a(step)["label"], b(step)["label"])
    # each epoch (10 examples = 2.5 batches) visits every example exactly once
    idx = np.concatenate([a.indices(s) for s in range(5)])
    assert sorted(idx[:10]) == list(range(10)) and sorted(idx[10:20]) == list(range(10))
    # multi-host: the process slices concatenate to the global batch
    hosts = [ArraySource(data, 4, seed=7, process_index=p, process_count=2) for p in range(2)]
    np.testing.assert_array_equal(np.concatenate([h.indices(3) for h in hosts]), a.indices(3))
    with pytest.raises(ValueError, match="divide"):
        ArraySource(data, 5, process_count=2, process_index=0)


def test_resumable_iterator_factory_opens_at_the_resumed_step():
    opened = []

    def make(start):
        opened.append(start)
        return ({"step": np.array([s])} for s in range(start, 100))

    r = Resumable(make)
    assert [int(r(s)["step"][0]) for s in (5, 6, 7)] == [5, 6, 7] and opened == [5]


def test_outputs_jsonl_and_png(tmp_path):
    trainer, fresh = _setup(steps=4, checkpoint_every=0)
    src, ev = _data()
    trainer.fit(fresh(), src, ev, workdir=tmp_path)
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows if "train/loss" in r] == [2, 4]
    assert [r["step"] for r in rows if "eval/accuracy" in r] == [4]
    assert all(np.isfinite(r["lr"]) for r in rows if "lr" in r)
    png = (tmp_path / "metrics.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    json.dumps(rows)  # plain JSON types only


def test_loop_config_rejects_misaligned_checkpoints():
    with pytest.raises(ValueError, match="multiple of log_every"):
        LoopConfig(steps=10, log_every=3, checkpoint_every=4).validate()


def test_sigterm_checkpoints_on_a_log_step_and_resume_is_identical(tmp_path):
    import os
    import signal

    from jtkd.loop import Preempted

    trainer, fresh = _setup(steps=12)
    src, ev = _data()
    ref, _ = trainer.fit(fresh(), src, ev, workdir=tmp_path / "ref")

    def preempt_at_5(step):
        if step == 5:
            os.kill(os.getpid(), signal.SIGTERM)  # what a cloud scheduler sends before reclaiming the host
        return src(step)

    with pytest.raises(Preempted, match="Run the same command again") as info:
        trainer.fit(fresh(), preempt_at_5, ev, workdir=tmp_path / "run")
    # the data thread runs ahead of the step, so the stop lands on a log step at or before ~6
    assert info.value.step % 2 == 0 and 2 <= info.value.step < 12 and info.value.checkpoint == info.value.step
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or callable(signal.getsignal(signal.SIGTERM))
    resumed, _ = trainer.fit(fresh(), src, ev, workdir=tmp_path / "run")
    assert_bitwise_equal(ref.params, resumed.params)
    assert _rows(read_jsonl(tmp_path / "run" / "metrics.jsonl")) == _rows(
        read_jsonl(tmp_path / "ref" / "metrics.jsonl")
    )


@dataclasses.dataclass(frozen=True)
class _RunConfig:
    model: str = "tiny3"
    lr: float = 0.05


def test_config_json_follows_a_resume_and_a_foreign_checkpoint_is_named(tmp_path, caplog):
    """fit(config=) writes config.json; a resume with a new lr logs the change and records it; a state
    of another model (5 classes) gets the leaves that do not fit and the changed fields, not orbax's
    tree dump, and config.json still describes the checkpoint."""
    src, ev = _data()
    trainer, fresh = _setup(steps=4)
    trainer.fit(fresh(), src, ev, workdir=tmp_path, config=_RunConfig())
    assert json.loads((tmp_path / "config.json").read_text()) == {"model": "tiny3", "lr": 0.05}
    trainer, fresh = _setup(steps=8, lr=0.01)
    logger = logging.getLogger("jtkd")  # setup_logging (run by other tests in this process) stops propagation
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="jtkd"):
            state, _ = trainer.fit(fresh(), src, ev, workdir=tmp_path, config=_RunConfig(lr=0.01))
    finally:
        logger.removeHandler(caplog.handler)
    assert int(state.step) == 8 and "lr: 0.05 -> 0.01" in caplog.text
    assert json.loads((tmp_path / "config.json").read_text())["lr"] == 0.01
    trainer, fresh = _setup(steps=12, num_classes=5)
    with pytest.raises(CheckpointMismatchError) as info:
        trainer.fit(fresh(), src, ev, workdir=tmp_path, config=_RunConfig(model="tiny5", lr=0.01))
    msg = str(info.value)
    assert "shapes differ" in msg and "params/fc/kernel: checkpoint (8, 3), this run (8, 5)" in msg
    assert "model: 'tiny3' -> 'tiny5'" in msg and "lr" not in msg.split("Config fields changed")[1]
    assert json.loads((tmp_path / "config.json").read_text()) == {"model": "tiny3", "lr": 0.01}
