"""Eval-mode logit parity of every registered model against torchvision.

Random torchvision weights, randomised BatchNorm affine parameters and running statistics
(converters.parity.randomize_), a non-default num_classes, a non-224 odd input size where the
architecture allows and batch > 1. Tolerance: the spec's atol (1e-4 unless justified), fp32 with
highest matmul precision; argmax must agree.
"""

import json
import os

import pytest

from converters import parity
from jtkd.models import get_spec, list_models

NUM_CLASSES = 13


def _params(names):
    # the >300M-parameter models run one at a time in one xdist worker (--dist loadgroup): ~8 GB each
    big = (pytest.mark.slow, pytest.mark.xdist_group("large_models"))
    return [pytest.param(n, marks=big) if get_spec(n).slow else n for n in names]


@pytest.mark.parametrize("name", _params(list_models()))
def test_eval_logits_match_torchvision(name):
    spec = get_spec(name)
    row = parity.parity_row(name, num_classes=NUM_CLASSES, seed=1)
    if os.environ.get("JTKD_PARITY_JSONL"):  # one run yields both the test and PARITY.md's rows
        with open(os.environ["JTKD_PARITY_JSONL"], "a") as f:
            f.write(json.dumps(row) + "\n")
    diff = row["max_abs_logit_diff"]
    assert diff <= spec.atol, f"{name}: max abs logit diff {diff:.3e} > {spec.atol} (max |logit| {row['max_abs_logit']:.3g})"
    assert row["argmax_equal"]
    # every named intermediate output equals the torch module output of the same path
    assert row["features"] >= 1
    rel, tol = row["max_rel_feature_diff"], parity.feature_rtol(spec.atol)
    assert rel <= tol, f"{name}: feature {row['worst_feature']!r} differs by {rel:.3e} relative to its scale (> {tol})"


def test_parity_markdown_names_where_rows_were_measured(tmp_path):
    from converters.parity import write_markdown

    row = {"model": "resnet18", "family": "resnet", "params_m": 11.2, "input": "2x97x131", "max_abs_logit_diff": 2e-6,
           "max_abs_logit": 1.0, "atol": 1e-4, "argmax_equal": True, "convert_s": 0.5, "first_divergence": None}
    bad = {**row, "model": "resnet34", "max_abs_logit_diff": 1e-3}
    write_markdown([row, bad], str(tmp_path / "P.md"), ["vgg11"], where="JAX on a GPU")
    md = (tmp_path / "P.md").read_text()
    assert "1/2 within tolerance. JAX on a GPU." in md and "Not measured in this generation (1): vgg11" in md
