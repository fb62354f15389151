"""The two command-line jobs end to end, offline on digits, in their --quick form."""

import json

import jax
import numpy as np
import pytest
import torch
import torchvision

from converters.torchvision import load_checkpoint


def test_transfer_quick(tmp_path):
    from experiments import transfer

    results = transfer.main(["--quick", "--out", str(tmp_path), "--no-progress"])
    assert list(results["modes"]) == ["scratch", "linear", "partial", "full"]
    for r in results["modes"].values():
        assert len(r["accuracy_per_seed"]) == 1 and 0.0 <= r["accuracy_mean"] <= 1.0
        assert r["eval_curves"][0][-1][0] == 4  # evaluated at the last step
    assert results["source"]["import_max_abs_logit_diff"] < 1e-3
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["modes"].keys() == results["modes"].keys()
    table = (tmp_path / "results.md").read_text()
    assert table.count("\n| ") == 5 and "| full |" in table
    assert (tmp_path / "transfer.png").read_bytes()[:4] == b"\x89PNG"
    sd = load_checkpoint(tmp_path / "source_resnet18.pth")
    assert sd["fc.weight"].shape == (5, 512)
    assert (tmp_path / "runs" / "partial_seed0" / "metrics.png").exists()


def test_finetune_cli_quick_checkpoint_export_and_resume(tmp_path):
    from experiments import finetune

    pth = tmp_path / "in.pth"
    torch.save(torchvision.models.resnet18(num_classes=1000).state_dict(), pth)
    argv = [
        "--data",
        "digits",
        "--quick",
        "--checkpoint",
        str(pth),
        "--workdir",
        str(tmp_path / "run"),
        "--mode",
        "partial",
        "--freeze_stages",
        "3",
        "--optimizer",
        "adamw",
        "--lr",
        "1e-3",
        "--label_smoothing",
        "0.1",
        "--ema_decay",
        "0.5",
        "--mixup_alpha",
        "0.2",
        "--cutmix_alpha",
        "1.0",
        "--accum_steps",
        "2",
        "--random_erase",
        "0.5",
    ]
    res = finetune.main(argv)
    assert res["steps"] == 3 and res["num_classes"] == 10 and 0 < res["trainable_params"] < res["total_params"]
    assert res["final_eval"]["eval/count"] == 450  # the whole digits test split, counted once
    run = tmp_path / "run"
    for f in ("config.json", "metrics.jsonl", "metrics.png", "results.json", "final.pth"):
        assert (run / f).exists(), f
    model = torchvision.models.resnet18(num_classes=10)
    model.load_state_dict(torch.load(run / "final.pth", weights_only=True), strict=True)
    # --ema_decay: the weights' moving average is evaluated beside them and exported too
    assert res["final_eval"]["eval_ema/count"] == 450 and "eval_ema/accuracy" in res["final_eval"]
    ema = torch.load(run / "final_ema.pth", weights_only=True)
    model.load_state_dict(ema, strict=True)
    final = torch.load(run / "final.pth", weights_only=True)
    assert not torch.equal(ema["fc.weight"], final["fc.weight"]) and torch.equal(ema["conv1.weight"], final["conv1.weight"])
    saved = json.loads((run / "config.json").read_text())["finetune"]
    assert saved["optim"]["optimizer"] == "adamw" and (saved["mixup_alpha"], saved["cutmix_alpha"]) == (0.2, 1.0)
    losses = [r["train/loss"] for r in map(json.loads, open(run / "metrics.jsonl")) if "train/loss" in r]
    assert len(losses) == 3 and np.isfinite(losses).all()
    again = finetune.main(argv)  # the same command again: resumes at the end, nothing left to do
    assert again["final_eval"] == res["final_eval"]


def test_finetune_cli_bad_input(tmp_path, capsys):
    from experiments import finetune

    with pytest.raises(SystemExit, match="pass --checkpoint PATH or --weights DEFAULT"):
        finetune.main(["--data", "digits", "--quick", "--mode", "full", "--workdir", str(tmp_path)])
    # a bad command line: one line naming the problem and argparse's exit status 2, no traceback
    for argv, message in (
        (["--data", "mnist"], "error: --data must be tfds:NAME, folder:PATH or digits; got 'mnist'"),
        (["--batch_size", "64", "--accum_steps", "3"], "error: batch_size 64 does not divide into loop.accum_steps=3"),
        (["--lr", "fast"], "error: --finetune.optim.lr: expected float, got 'fast'"),
        (["--cutmix_alpha", "-1"], "error: cutmix_alpha must be >= 0, got -1.0"),
        (["--no-augment", "--random_erase", "0.1"], "error: random_erase is augmentation, which --no-augment turns off"),
    ):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            finetune.main([*argv, "--workdir", str(tmp_path)])
        assert exit_info.value.code == 2
        assert capsys.readouterr().err.startswith(message)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        finetune.main(
            ["--data", "digits", "--quick", "--checkpoint", str(tmp_path / "nope.pth"), "--workdir", str(tmp_path)]
        )


def test_finetune_cli_from_a_runs_variables_keeps_the_head(tmp_path):
    """Linear probe, then full fine-tuning from the probe's final/ (orbax variables) with the trained
    head kept (--head_init keep): the second run starts exactly where the first ended."""
    from converters.torchvision import to_torch
    from experiments import finetune
    from jtkd import checkpoint
    from jtkd import finetune as ft_lib

    pth = tmp_path / "in.pth"
    torch.save(torchvision.models.resnet18(num_classes=7).state_dict(), pth)
    common = ["--data", "digits", "--quick", "--digits_classes", "0,1,2"]
    finetune.main([*common, "--checkpoint", str(pth), "--mode", "linear", "--workdir", str(tmp_path / "lp")])
    probe = checkpoint.load_variables(tmp_path / "lp" / "final")
    job = finetune.FinetuneJob(checkpoint=str(tmp_path / "lp" / "final"),
                               finetune=ft_lib.FinetuneConfig(image_size=32, head_init="keep"))
    start = ft_lib.initial_variables(job.finetune, 3, finetune._state_dict(job))
    for a, b in zip(jax.tree.leaves(start), jax.tree.leaves(probe), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.abs(np.asarray(start["params"]["fc"]["kernel"])).max() > 0  # the probe's head, not zeros
    res = finetune.main([*common, "--checkpoint", str(tmp_path / "lp" / "final"), "--head_init", "keep",
                         "--mode", "full", "--workdir", str(tmp_path / "ft")])
    assert res["num_classes"] == 3 and res["steps"] == 3
    with pytest.raises(ValueError, match="classifier has 3 outputs but the data has 10 classes"):
        keep = ft_lib.FinetuneConfig(image_size=32, head_init="keep")
        ft_lib.initial_variables(keep, 10, to_torch("resnet18", probe))
    with pytest.raises(IsADirectoryError, match="load with jtkd.checkpoint.load_variables"):
        load_checkpoint(tmp_path / "lp")
