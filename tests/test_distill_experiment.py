"""experiments/distill.py: CLI parsing, the few-label transfer split, a resumable end-to-end run from a
torch checkpoint (metrics, plot, exported student), and the results table writer."""

import json

import numpy as np
import pytest
import torch
import torchvision

from experiments import distill as exp
from jtkd import config as cfglib
from jtkd.loop import ArraySource, read_jsonl


def test_cli_parses_into_typed_config():
    cfg = cfglib.parse_args(
        exp.DistillRun(),
        ["--teacher", "resnet34:a.pth,resnet50:b.pth", "--student", "resnet18", "--method", "kd+at",
         "--weights", "0.9,1000", "--temperature", "3", "--data", "tfds:cifar100", "--steps", "7", "--lr", "0.1"],
    )
    assert cfg.teacher == ("resnet34:a.pth", "resnet50:b.pth")
    assert cfg.distill.method == "kd+at" and cfg.distill.weights == (0.9, 1000.0) and cfg.distill.temperature == 3.0
    assert cfg.loop.steps == 7 and cfg.optim.lr == 0.1 and cfg.data == "tfds:cifar100"
    with pytest.raises(ValueError, match="--data must be"):
        cfglib.parse_args(exp.DistillRun(), ["--data", "imagenet"])
    with pytest.raises(cfglib.ConfigError, match="unknown option"):
        cfglib.parse_args(exp.DistillRun(), ["--tempreature", "3"])
    for argv in (["--method", "dkd"], ["--method", "kd + dkd"], ["--table", "--methods", "ce,dkd@1"]):
        with pytest.raises(ValueError, match="DKD needs one target class per image"):
            cfglib.parse_args(exp.DistillRun(), [*argv, "--cutmix_alpha", "1"])
    with pytest.raises(ValueError, match="mixup_alpha must be >= 0"):
        cfglib.parse_args(exp.DistillRun(), ["--mixup_alpha", "-0.1"])


def test_function_matching_run_mixes_with_the_teacher_live(tmp_path):
    """kd with ce_weight 0 and MixUp / CutMix: the teacher runs on the mixed images in the step (cached
    outputs, the default without augmentation, would be of unmixed images and the step refuses them)."""
    torch.manual_seed(0)
    ckpt = tmp_path / "teacher.pth"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), ckpt)
    res = exp.main(["--teacher", f"resnet18:{ckpt}", "--student", "resnet18", "--student_width", "8", "--method", "kd",
                    "--ce_weight", "0", "--mixup_alpha", "1", "--cutmix_alpha", "1", "--data", "digits",
                    "--image_size", "16", "--batch_size", "16", "--steps", "2", "--log_every", "1", "--eval_every", "0",
                    "--no-progress", "--workdir", str(tmp_path / "run")])
    rows = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "train/loss" in r]
    assert len(rows) == 2 and all(np.isfinite(r["train/loss_kd"]) and r["train/loss_kd"] > 0 for r in rows)
    assert 0 <= res["accuracy"] <= 1


def test_few_labels_keeps_a_transfer_set_and_mixed_batches_carry_labels():
    labels = np.repeat(np.arange(4), 10).astype(np.int32)
    images = np.arange(40, dtype=np.float32)[:, None, None, None] * np.ones((1, 2, 2, 3), np.float32)
    split = exp.Split({"image": images, "label": labels}, 4)
    labelled, transfer = exp.few_labels(split, 3, seed=1, keep_unlabelled=True)
    assert labelled.n == 12 and np.array_equal(np.bincount(labelled.arrays["label"]), [3, 3, 3, 3])
    rows = labelled.arrays["image"][:, 0, 0, 0].astype(int)
    assert np.array_equal(labels[rows], labelled.arrays["label"])  # labels stay attached to their images
    assert transfer.n == 40 and np.all(transfer.arrays["label"] == -1)
    alone, none = exp.few_labels(split, 3, seed=1, keep_unlabelled=False)
    assert none is None and np.array_equal(alone.arrays["label"], labelled.arrays["label"])
    assert not np.array_equal(exp.few_labels(split, 3, seed=2, keep_unlabelled=True)[0].arrays["image"], labelled.arrays["image"])
    mixed = exp.MixedSource(ArraySource(labelled.arrays, 4, seed=0), ArraySource(transfer.arrays, 6, seed=1))
    for step in range(5):
        b = mixed(step)
        assert b["image"].shape[0] == 10 and np.all(b["label"][:4] >= 0) and np.all(b["label"][4:] == -1)
        assert all(np.array_equal(b[k], mixed(step)[k]) for k in b)  # a pure function of the step (resume)


def test_shift_augment_is_a_seeded_translation():
    x = np.random.default_rng(0).standard_normal((5, 8, 8, 3)).astype(np.float32)
    aug = exp.shift_augment(2)
    a = aug({"image": x, "label": np.arange(5)}, np.random.default_rng(3))
    b = aug({"image": x, "label": np.arange(5)}, np.random.default_rng(3))
    assert a["image"].shape == x.shape and np.array_equal(a["image"], b["image"])
    assert not np.array_equal(a["image"], x)
    # the centre of every image is a shifted copy of the original (edge padding only at the border)
    for i in range(5):
        assert any(np.array_equal(a["image"][i, 2:6, 2:6], x[i, 2 + dy : 6 + dy, 2 + dx : 6 + dx])
                   for dy in range(-2, 3) for dx in range(-2, 3))


def test_end_to_end_run_from_torch_checkpoint_resumes(tmp_path):
    torch.manual_seed(0)
    teacher = torchvision.models.resnet18(num_classes=10)
    ckpt = tmp_path / "teacher.pth"
    torch.save(teacher.state_dict(), ckpt)
    work = tmp_path / "run"
    args = ["--teacher", f"resnet18:{ckpt}", "--student", "resnet18", "--method", "dkd", "--data", "digits",
            "--image_size", "16", "--labels_per_class", "3", "--batch_size", "16", "--log_every", "2",
            "--eval_every", "0", "--no-progress", "--no-cache_teacher", "--workdir", str(work)]
    first = exp.main(args + ["--steps", "2"])
    assert first["labelled_examples"] == 30 and first["transfer_examples"] > 1000  # few labels + transfer set
    assert len(first["teacher_accuracy"]) == 1 and 0 <= first["teacher_accuracy"][0] <= 1
    second = exp.main(args + ["--steps", "4"])  # same workdir: continues from the step-2 checkpoint
    rows = read_jsonl(work / "metrics.jsonl")
    assert [r["step"] for r in rows if "train/loss" in r] == [2, 4]
    assert {"train/loss_dkd", "train/ce", "train/teacher_accuracy", "train/agreement"} <= set(rows[0])
    assert (work / "metrics.png").stat().st_size > 0 and (work / "config.json").exists()
    assert json.loads((work / "results.json").read_text())["accuracy"] == second["accuracy"]
    # the student goes back to torchvision intact
    model = torchvision.models.resnet18(num_classes=10)
    model.load_state_dict(torch.load(work / "student.pth", weights_only=True), strict=True)


def test_table_writer(tmp_path):
    cfg = exp.table_defaults(exp.DistillRun(methods=("ce", "kd"), seeds=(0, 1), workdir=str(tmp_path)))
    runs = [{"method": m, "seed": s, "accuracy": a, "student_params": 700_000} for m, s, a in [("ce", 0, 0.6), ("ce", 1, 0.7), ("kd", 0, 0.9), ("kd", 1, 0.94)]]
    for r in runs:
        d = tmp_path / r["method"] / f"seed{r['seed']}"
        d.mkdir(parents=True)
        (d / "metrics.jsonl").write_text(json.dumps({"step": 10, "eval/accuracy": r["accuracy"]}) + "\n")
    summary = exp.summarise(runs, cfg, {"spec": ["resnet34:t.pth"], "jax_accuracy": [0.98], "torch_accuracy": 0.98}, 12.0)
    exp.write_table(summary, tmp_path)
    rows = {r["method"]: r for r in json.loads((tmp_path / "results.json").read_text())["rows"]}
    assert rows["kd"]["mean"] == pytest.approx(0.92) and rows["ce"]["std"] == pytest.approx(np.std([0.6, 0.7], ddof=1))
    md = (tmp_path / "results.md").read_text()
    assert "| KD (Hinton) (λ=0.9 default) | 0.9200 | 0.0283 |" in md and "5 labels per class" in md
    assert "(0.70M parameters)" in md
    assert (tmp_path / "results.png").stat().st_size > 1000


def test_folder_data_labels_the_eval_split_with_the_training_classes(tmp_path):
    """folder:PATH reads PATH/train and PATH/test; a test split without class 'b' keeps 'c' at label 2."""
    import warnings

    from PIL import Image

    rng = np.random.default_rng(0)
    for split, classes in (("train", "abc"), ("test", "ac")):
        for c in classes:
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 256, (9, 9, 3), dtype=np.uint8)).save(tmp_path / split / c / f"{i}.png")
    cfg = exp.DistillRun(data=f"folder:{tmp_path}", image_size=8)
    with pytest.raises(ValueError, match=r"no folder for training class\(es\) \['b'\]"):
        exp.load_data(cfg)
    keep = cfglib.parse_args(cfg, ["--folder.on_empty", "keep"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr, te, _ = exp.load_data(keep)
    assert tr.num_classes == te.num_classes == 3
    assert sorted(tr.arrays["label"].tolist()) == [0, 0, 1, 1, 2, 2]
    assert sorted(te.arrays["label"].tolist()) == [0, 0, 2, 2]


def test_googlenet_student_has_no_auxiliary_classifiers(tmp_path):
    """A googlenet student (random or from a checkpoint with aux heads) trains one output: before, its
    train-mode (logits, aux2, aux1) tuple read as a three-head student and the run failed."""
    import jax

    torch.save(torchvision.models.googlenet(num_classes=5, aux_logits=True, init_weights=False).state_dict(),
               tmp_path / "g.pth")
    module = exp.Student.load("googlenet", 3, 32).module()
    assert module.aux_logits is False
    module = module.clone(axis_name=None)  # the train step's BatchNorm syncs over the mesh axis; not here
    for spec in ("googlenet", f"googlenet:{tmp_path / 'g.pth'}"):
        student = exp.Student.load(spec, 3, 32)
        # the random init by shape (eager, it costs ~40 s of per-op compiles); the checkpoint's converted
        v = student.variables(seed=0) if ":" in spec else jax.eval_shape(lambda: student.variables(seed=0))
        assert not any(k.startswith("aux") for k in v["params"]) and v["params"]["fc"]["kernel"].shape == (1024, 3)
        # shapes only (traced, not run): a (logits, aux2, aux1) tuple would fail here
        out, _ = jax.eval_shape(lambda v: module.apply(v, np.zeros((2, 32, 32, 3), np.float32), train=True,
                                                       mutable=["batch_stats"], rngs={"dropout": jax.random.key(0)}), v)
        assert out.shape == (2, 3)


def test_student_width_with_a_checkpoint_is_refused_before_loading(tmp_path):
    """--student_width builds a non-torchvision width, so NAME:CKPT with a width is an error that says so,
    raised before the checkpoint is read (the path need not exist)."""
    with pytest.raises(ValueError, match="student_width"):
        exp.Student.load(f"resnet18:{tmp_path / 'absent.pth'}", 3, 32, width=8)
    with pytest.raises(KeyError, match="unknown model .resnet1.*resnet18"):  # lists the supported ones
        exp.Student.load("resnet1", 3, 32)
