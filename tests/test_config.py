"""Typed configs with command-line overrides."""

import dataclasses

import pytest

from jtkd import config
from jtkd.config import ConfigError
from jtkd.finetune import FinetuneConfig


def test_short_dotted_bool_tuple_and_literal_overrides():
    cfg = config.parse_args(
        FinetuneConfig(),
        ["--mode", "partial", "--lr", "0.01", "--optim.schedule=step", "--no-precompute_features", "--loop.progress",
         "false", "--stages", r"conv1|bn1|layer1_\d+,layer2_\d+", "--steps", "7", "--dtype", "bfloat16"],
    )
    assert cfg.mode == "partial" and cfg.optim.lr == 0.01 and cfg.optim.schedule == "step"
    assert cfg.precompute_features is False and cfg.loop.progress is False and cfg.loop.steps == 7
    assert cfg.stages == (r"conv1|bn1|layer1_\d+", r"layer2_\d+") and cfg.dtype == "bfloat16"
    assert config.parse_args(FinetuneConfig(), ["--precompute_features"]).precompute_features is True


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--mode", "half"], r"--mode: 'half' is not one of full, scratch, linear, partial"),
        (["--lr", "fast"], r"--optim.lr: expected float"),
        (["--nope", "1"], r"unknown option --nope; valid options: .*--optim.lr"),
        (["--lr"], r"--lr needs a value"),
        (["--optim.layer_decay", "1.5"], r"layer_decay must be in \(0, 1\]"),
        (["--loop.steps", "0"], r"steps must be >= 1"),
    ],
)
def test_bad_input_names_the_problem(argv, message):
    with pytest.raises((ConfigError, ValueError), match=message):
        config.parse_args(FinetuneConfig(), argv)


def test_ambiguous_short_key():
    @dataclasses.dataclass(frozen=True)
    class A:
        lr: float = 0.1

    @dataclasses.dataclass(frozen=True)
    class B:
        a: A = dataclasses.field(default_factory=A)
        b: A = dataclasses.field(default_factory=A)

    with pytest.raises(ConfigError, match=r"--lr is ambiguous: use one of --a.lr, --b.lr"):
        config.parse_args(B(), ["--lr", "1"])
    assert config.parse_args(B(), ["--b.lr", "1"]).b.lr == 1.0


def test_saved_config_round_trips_and_later_flags_win(tmp_path):
    cfg = config.parse_args(FinetuneConfig(), ["--mode", "linear", "--lr", "0.3", "--stages", "a,b"])
    config.save(cfg, tmp_path / "c.json")
    assert config.load(FinetuneConfig, tmp_path / "c.json") == cfg
    again = config.parse_args(FinetuneConfig(), ["--config", str(tmp_path / "c.json"), "--lr", "0.5"])
    assert again == dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr=0.5))
    (tmp_path / "bad.json").write_text('{"optim": {"lr": 1, "momentun": 0.5}}')
    with pytest.raises(ConfigError, match="momentun"):
        config.load(FinetuneConfig, tmp_path / "bad.json")
