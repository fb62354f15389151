"""experiments/evaluate.py: the metrics of a converted torch checkpoint on digits equal scikit-learn's on
torchvision's own predictions, the torch comparison, predictions.csv and the plot, folder data with file
names, and bad input refused before anything is written."""

import csv
import json

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from sklearn import metrics as skm

from converters import parity
from converters.torchvision import convert
from experiments import evaluate
from jtkd import checkpoint, data

SIZE = 33  # odd, and not the digits default


@pytest.fixture(scope="module")
def model_pth(tmp_path_factory):
    """A resnet18 with random weights and BatchNorm statistics whose classifier is fitted (ridge regression on
    its random features of the digits train split), so its predictions are spread over the classes."""
    torch.manual_seed(0)
    model = parity.randomize_(torchvision.models.resnet18(num_classes=10), seed=3).eval()
    train = data.digits("train", image_size=SIZE)
    x = torch.from_numpy(train.images.transpose(0, 3, 1, 2))
    with torch.no_grad():
        feats = torch.flatten(model.avgpool(model.layer4(model.layer3(model.layer2(model.layer1(
            model.maxpool(model.relu(model.bn1(model.conv1(x))))))))), 1).double().numpy()
    mu, sd = feats.mean(0), feats.std(0) + 1e-6
    f = (feats - mu) / sd
    y = np.eye(10)[train.labels]
    w = np.linalg.solve(f.T @ f + 10 * np.eye(f.shape[1]), f.T @ (y - y.mean(0)))
    with torch.no_grad():
        model.fc.weight.copy_(torch.from_numpy((w / sd[:, None]).T).float())
        model.fc.bias.copy_(torch.from_numpy(y.mean(0) - (mu / sd) @ w).float())
    path = tmp_path_factory.mktemp("model") / "r18.pth"
    torch.save(model.state_dict(), path)
    return path, model


def _torch_test_logits(model):
    test = data.digits("test", image_size=SIZE)
    with torch.no_grad():
        return model(torch.from_numpy(test.images.transpose(0, 3, 1, 2))).numpy(), test.labels


def test_metrics_equal_sklearn_on_torchvisions_predictions(model_pth, tmp_path):
    path, model = model_pth
    out = tmp_path / "eval"
    res = evaluate.main(["--model", "resnet18", "--checkpoint", str(path), "--data", "digits", "--image_size", str(SIZE),
                         "--compare_torch", "--no-progress", "--out", str(out)])
    ref, labels = _torch_test_logits(model)
    pred = ref.argmax(1)
    assert res["torch"]["top1_agreement"] == 1.0 and res["torch"]["max_abs_logit_diff"] < 1e-3
    assert 0.3 < res["accuracy"] == pytest.approx(skm.accuracy_score(labels, pred), abs=0)
    assert len(set(pred)) == 10  # a real spread of predictions, not one class
    np.testing.assert_array_equal(res["confusion"], skm.confusion_matrix(labels, pred, labels=range(10)))
    p, r, _, support = skm.precision_recall_fscore_support(labels, pred, labels=range(10), zero_division=0)
    got = res["per_class"]
    np.testing.assert_allclose([c["precision"] for c in got], p)
    np.testing.assert_allclose([c["recall"] for c in got], r)
    assert [c["support"] for c in got] == support.tolist() and res["count"] == len(labels) == 450
    assert res["macro_recall"] == pytest.approx(r.mean())
    assert res["top5_accuracy"] == pytest.approx(skm.top_k_accuracy_score(labels, ref, k=5, labels=range(10)))
    probs = torch.softmax(torch.from_numpy(ref).double(), 1).numpy()
    assert res["loss"] == pytest.approx(skm.log_loss(labels, probs, labels=range(10)), rel=1e-4)
    assert json.loads((out / "metrics.json").read_text())["accuracy"] == res["accuracy"]
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert len(rows) == 450 and [int(r["index"]) for r in rows] == list(range(450))
    assert [int(r["prediction"]) for r in rows] == pred.tolist() and [int(r["label"]) for r in rows] == labels.tolist()
    assert (out / "confusion.png").stat().st_size > 10_000


def test_jtkd_variables_and_folder_data_with_file_names(model_pth, tmp_path):
    path, model = model_pth
    variables = convert("resnet18", torch.load(path, weights_only=True))
    checkpoint.save_variables(tmp_path / "variables", variables)
    # a folder per class of real digit scans (8x8 px PNGs); the evaluation transform resizes them
    test = data.digits("test", image_size=8, normalize_images=False)
    root = tmp_path / "val"
    for i in range(20):
        d = root / str(test.labels[i])
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray((test.images[i] * 255).round().astype(np.uint8)).save(d / f"{i:03d}.png")
    out = tmp_path / "eval"
    res = evaluate.main(["--model", "resnet18", "--checkpoint", str(tmp_path / "variables"), "--data", f"folder:{root}",
                         "--class_folder", str(root), "--image_size", str(SIZE), "--limit", "7", "--compare_torch",
                         "--no-progress", "--num_workers", "2", "--out", str(out)])
    assert res["count"] == 7 and res["torch"]["top1_agreement"] == 1.0 and res["torch"]["max_abs_logit_diff"] < 1e-3
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    src = data.image_folder(root)
    assert [r["file"] for r in rows] == [str(f) for f in src.files[:7]]
    assert [r["label"] for r in rows] == [src.info.class_names[k] for k in src.labels[:7]]


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys):
    pth = tmp_path / "seven.pth"
    torch.save(torchvision.models.resnet18(num_classes=7).state_dict(), pth)
    for argv, message in (
        (["--checkpoint", str(pth)], "error: the model predicts 7 classes but digits has 10"),
        (["--checkpoint", str(pth), "--weights", "DEFAULT"], "error: pass exactly one of --checkpoint PATH and --weights"),
        (["--checkpoint", str(tmp_path / "missing.pth")], "error: checkpoint not found"),
        (["--checkpoint", str(pth), "--data", "imagenet"], "error: --data must be digits, tfds:NAME or folder:PATH"),
    ):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            evaluate.main([*argv, "--out", str(tmp_path / "out"), "--no-progress"])
        assert exit_info.value.code == 2
        assert capsys.readouterr().err.startswith(message)
    assert not (tmp_path / "out").exists()
