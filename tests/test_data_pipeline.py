"""batches(): seeded epochs, resume, eval padding + mask, per-host slices; prefetch_to_mesh on 4 devices."""

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jtkd import data, train

ONE_HOST = {"process_index": 0, "process_count": 1}


@pytest.fixture(scope="module")
def test_split():
    return data.digits("test", image_size=8)  # 450 examples


def test_eval_pads_final_batch_and_masks_every_example_once(test_split):
    out = list(data.batches(test_split, 64, with_index=True, **ONE_HOST))
    assert len(out) == data.steps_per_epoch(450, 64, drop_remainder=False) == 8
    assert all(b["image"].shape == (64, 8, 8, 3) and b["mask"].dtype == np.bool_ for b in out)
    assert [int(b["mask"].sum()) for b in out] == [64] * 7 + [450 - 7 * 64]
    idx = np.concatenate([b["index"][b["mask"]] for b in out])
    np.testing.assert_array_equal(idx, np.arange(450))  # ordered, each exactly once
    last = out[-1]
    assert (last["index"][~last["mask"]] == -1).all() and (last["image"][~last["mask"]] == 0).all()
    np.testing.assert_array_equal(last["image"][last["mask"]], test_split.images[448:])
    np.testing.assert_array_equal(last["label"][last["mask"]], test_split.labels[448:])


def test_train_reshuffles_each_epoch_drops_remainder_and_is_seeded(test_split):
    kw = dict(train=True, num_epochs=3, with_index=True, **ONE_HOST)
    run = list(data.batches(test_split, 100, seed=1, **kw))
    assert len(run) == 3 * 4 and all("mask" not in b and b["image"].shape[0] == 100 for b in run)
    epochs = [np.concatenate([b["index"] for b in run[e * 4 : (e + 1) * 4]]) for e in range(3)]
    for e in epochs:
        assert len(np.unique(e)) == 400  # no repeats within an epoch, 50 dropped
    assert not np.array_equal(epochs[0], epochs[1])
    again = list(data.batches(test_split, 100, seed=1, **kw))
    assert all(np.array_equal(a["index"], b["index"]) for a, b in zip(run, again))
    other = next(data.batches(test_split, 100, seed=2, **kw))
    assert not np.array_equal(other["index"], run[0]["index"])
    b = run[5]
    np.testing.assert_array_equal(b["image"], test_split.images[b["index"]])
    np.testing.assert_array_equal(b["label"], test_split.labels[b["index"]])


def test_start_step_resumes_the_same_stream(test_split):
    kw = dict(train=True, seed=3, with_index=True, **ONE_HOST)
    full = data.batches(test_split, 64, **kw)
    head = [next(full)["index"] for _ in range(12)]  # crosses the epoch boundary (7 steps per epoch)
    resumed = data.batches(test_split, 64, start_step=5, **kw)
    for want in head[5:]:
        np.testing.assert_array_equal(next(resumed)["index"], want)


@pytest.mark.parametrize("train_mode", [False, True])
def test_hosts_split_each_global_batch(test_split, train_mode):
    kw = {"train": train_mode, "num_epochs": 1, "seed": 0, "with_index": True}
    glob = list(data.batches(test_split, 96, process_index=0, process_count=1, **kw))
    hosts = [list(data.batches(test_split, 96, process_index=p, process_count=3, **kw)) for p in range(3)]
    assert all(len(h) == len(glob) for h in hosts)  # every host takes the same number of steps
    for step, g in enumerate(glob):
        parts = [h[step] for h in hosts]
        assert all(part["image"].shape[0] == 32 for part in parts)
        for k in g:
            np.testing.assert_array_equal(np.concatenate([part[k] for part in parts]), g[k])


def test_host_whose_slice_is_all_padding_still_gets_a_shaped_batch():
    tiny = data.digits("test", classes=[0], labels_per_class=5, image_size=8)
    b = next(data.batches(tiny, 12, process_index=2, process_count=3))
    assert b["image"].shape == (4, 8, 8, 3) and not b["mask"].any()
    folder_like = _PerExample(tiny)
    b = next(data.batches(folder_like, 12, process_index=2, process_count=3, num_workers=2))
    assert b["image"].shape == (4, 8, 8, 3) and not b["mask"].any()


class _PerExample:
    """A source without get_batch: forces the per-example (threaded) path."""

    def __init__(self, ds):
        self.ds, self.info = ds, ds.info

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        return self.ds[i]


def test_per_example_path_equals_vectorised_path(test_split):
    kw = dict(train=True, num_epochs=1, seed=4, **ONE_HOST)
    for a, b in zip(data.batches(test_split, 50, **kw), data.batches(_PerExample(test_split), 50, num_workers=3, **kw)):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])


def test_bad_batch_arguments(test_split):
    with pytest.raises(ValueError, match="multiple of process_count"):
        data.batches(test_split, 10, process_index=0, process_count=4)  # raised at the call, not on next()
    with pytest.raises(ValueError, match="fewer than one batch"):
        data.batches(test_split, 1000, train=True, **ONE_HOST)


needs4 = pytest.mark.usefixtures("four_devices")


@needs4
def test_prefetch_to_mesh_shards_batches_over_4_devices(test_split):
    mesh = train.make_mesh(4)
    host = list(data.batches(test_split, 64, **ONE_HOST))
    dev = list(data.prefetch_to_mesh(data.batches(test_split, 64, **ONE_HOST), mesh, size=2))
    assert len(dev) == len(host) == 8
    for h, d in zip(host, dev):
        assert d.keys() == h.keys() == {"image", "label", "mask"}
        for k in h:
            arr = d[k]
            assert isinstance(arr, jax.Array) and arr.shape == h[k].shape
            assert arr.sharding.spec == P(train.AXIS) and len(arr.sharding.device_set) == 4
            assert {s.data.shape[0] for s in arr.addressable_shards} == {16}
            np.testing.assert_array_equal(np.asarray(arr), h[k])


@needs4
def test_sharded_eval_counts_every_example_once(test_split):
    mesh = train.make_mesh(4)

    def metrics_fn(state, batch, extra):
        m = batch["mask"].astype(jnp.float32)
        return {"count": m.sum(), "label_sum": (batch["label"] * m).sum()}

    step = train.make_eval_step(mesh, metrics_fn)
    totals = {"count": 0.0, "label_sum": 0.0}
    for batch in data.prefetch_to_mesh(data.batches(test_split, 64, **ONE_HOST), mesh):
        for k, v in jax.device_get(step(jnp.zeros(()), batch)).items():
            totals[k] += float(v)
    assert totals == {"count": 450.0, "label_sum": float(test_split.labels.sum())}


@needs4
def test_prefetch_to_mesh_reraises_and_stops():
    mesh = train.make_mesh(4)

    def broken():
        yield {"image": np.zeros((4, 2, 2, 3), np.float32), "label": np.zeros(4, np.int32)}
        raise RuntimeError("decode failed: /data/x.jpg")

    it = data.prefetch_to_mesh(broken(), mesh)
    assert next(it)["label"].shape == (4,)
    with pytest.raises(RuntimeError, match="x.jpg"):
        next(it)

    def endless():
        while True:
            yield {"image": np.zeros((4, 2, 2, 3), np.float32), "label": np.zeros(4, np.int32)}

    before = threading.active_count()
    it = data.prefetch_to_mesh(endless(), mesh, size=1)
    next(it)
    it.close()
    for t in threading.enumerate():
        if t.name == "jtkd-prefetch-to-mesh":
            t.join(timeout=5)
            assert not t.is_alive()
    assert threading.active_count() <= before
    with pytest.raises(ValueError, match="size"):
        next(data.prefetch_to_mesh(endless(), mesh, size=0))
