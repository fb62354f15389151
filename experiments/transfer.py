"""Transfer learning end to end, offline: PyTorch pre-training -> torchvision checkpoint -> JAX fine-tuning.

    python -m experiments.transfer            # ~ a few minutes on a 2-core CPU
    python -m experiments.transfer --quick    # seconds-scale smoke run (used by the tests)
    python -m experiments.transfer --seeds 5 --labels_per_class 5 --out runs/transfer5

1. Source task: a torchvision ResNet-18 is trained in PyTorch on scikit-learn digits 0-4 (the
   8x8 scans upscaled to 32x32, ImageNet-normalised) and saved as a plain `.pth` state_dict.
2. The checkpoint is loaded with `converters.torchvision.load_checkpoint`, converted with a new
   5-way head (`convert(..., head='reinit')`), and the JAX model's logits are compared with the torch
   model's on the source test set (the import is exact).
3. Target task: digits 5-9 with only `labels_per_class` labelled examples per class. Each mode is
   fine-tuned in JAX from the same checkpoint (scratch: from a random init) for the same number of
   steps, over several seeds (the seed draws the labelled subset, the head init and the data order).
4. Output in `--out`: results.md (Markdown table, also printed), results.json, transfer.png (test
   accuracy curves and final accuracies), and each run's metrics.jsonl / metrics.png.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import torch

from jtkd import config as jconfig
from jtkd.xla_flags import use_cpu_flags
from jtkd.finetune import FinetuneConfig
from jtkd.loop import LoopConfig
from jtkd.optim import OptimConfig

MODES = ("scratch", "linear", "partial", "full")


@dataclasses.dataclass(frozen=True)
class TransferConfig:
    out: str = "runs/transfer"
    model: str = "resnet18"
    image_size: int = 32
    source_classes: tuple[int, ...] = (0, 1, 2, 3, 4)
    target_classes: tuple[int, ...] = (5, 6, 7, 8, 9)
    labels_per_class: int = 10
    seeds: int = 3
    modes: tuple[str, ...] = MODES
    # source pre-training (PyTorch)
    source_epochs: int = 6
    source_batch_size: int = 64
    source_lr: float = 0.05
    source_examples: int = 0  # use only the first N source training images (0: all)
    reuse_source: bool = True  # reuse out/source_<model>.pth if it was trained with the same settings
    # target fine-tuning (JAX); one batch holds all the labelled examples by default
    steps: int = 40
    batch_size: int = 25
    eval_every: int = 10
    lr_scratch: float = 0.05
    lr_linear: float = 0.1
    lr_partial: float = 0.02
    lr_full: float = 0.02
    weight_decay: float = 5e-4
    warmup_steps: int = 5
    freeze_stages: int = 2
    augment: bool = True  # random translations of up to `shift` pixels (not for cached probe features)
    shift: int = 3
    quick: bool = False  # tiny everything: a smoke run of the whole pipeline
    threads: int = 0  # torch intra-op threads (0: torch's default)
    progress: bool = True

    def validate(self) -> None:
        bad = [m for m in self.modes if m not in MODES]
        if bad:
            raise ValueError(f"unknown modes {bad}; choose from {MODES}")
        if self.seeds < 1:
            raise ValueError("seeds must be >= 1")
        overlap = set(self.source_classes) & set(self.target_classes)
        if overlap:
            raise ValueError(f"source and target classes overlap: {sorted(overlap)}")

    def quick_version(self) -> TransferConfig:
        return dataclasses.replace(
            self,
            seeds=1,
            source_epochs=1,
            source_examples=128,
            steps=4,
            lr_scratch=self.lr_full,
            eval_every=2,
            labels_per_class=4,
            batch_size=20,
            warmup_steps=1,
        )


# ------------------------------------------------------------------------------------------ data
def _load(
    cfg: TransferConfig, split: str, classes: tuple[int, ...], labels_per_class: int | None = None, seed: int = 0
):
    from jtkd import data

    ds = data.digits(split, classes=classes, labels_per_class=labels_per_class, image_size=cfg.image_size, seed=seed)
    return {"image": ds.images, "label": ds.labels}


def translate(shift: int):
    """Augmentation: shift each image by up to `shift` pixels (edge padding), vectorised numpy."""

    def augment(batch: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
        x = batch["image"]
        n, h, w, _ = x.shape
        padded = np.pad(x, ((0, 0), (shift, shift), (shift, shift), (0, 0)), mode="edge")
        dy, dx = rng.integers(0, 2 * shift + 1, (2, n))
        rows = dy[:, None] + np.arange(h)[None]  # (n, h)
        cols = dx[:, None] + np.arange(w)[None]  # (n, w)
        out = padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]
        return {**batch, "image": np.ascontiguousarray(out)}

    return augment


# ------------------------------------------------------------------------------- source (torch)
def train_source(cfg: TransferConfig, out: Path, log: logging.Logger) -> tuple[Path, dict[str, Any]]:
    """Train torchvision `cfg.model` on the source classes; save its state_dict as .pth."""
    import torchvision

    path = out / f"source_{cfg.model}.pth"
    meta_path = path.with_suffix(".json")
    settings = {
        k: getattr(cfg, k)
        for k in (
            "model",
            "image_size",
            "source_classes",
            "source_epochs",
            "source_batch_size",
            "source_lr",
            "source_examples",
            "shift",
            "augment",
        )
    }
    settings["source_classes"] = list(settings["source_classes"])
    if cfg.reuse_source and path.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("settings") == settings:
            log.info("source: reusing %s (trained with the same settings)", path)
            return path, meta
    tr, te = _load(cfg, "train", cfg.source_classes), _load(cfg, "test", cfg.source_classes)
    if cfg.source_examples:
        tr = {k: v[: cfg.source_examples] for k, v in tr.items()}
    torch.manual_seed(0)
    model = torchvision.models.get_model(cfg.model, weights=None, num_classes=len(cfg.source_classes))
    steps_per_epoch = max(len(tr["label"]) // cfg.source_batch_size, 1)
    total = cfg.source_epochs * steps_per_epoch
    opt = torch.optim.SGD(model.parameters(), lr=cfg.source_lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.source_lr, total_steps=total, pct_start=0.15)
    augment = translate(cfg.shift) if cfg.augment else None
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    model.train()
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc="source (torch)", leave=False, disable=not cfg.progress)
    for _ in range(cfg.source_epochs):
        perm = rng.permutation(len(tr["label"]))
        for b in range(steps_per_epoch):
            idx = perm[b * cfg.source_batch_size : (b + 1) * cfg.source_batch_size]
            batch = {k: v[idx] for k, v in tr.items()}
            if augment is not None:
                batch = augment(batch, rng)
            x = torch.from_numpy(batch["image"]).permute(0, 3, 1, 2)
            loss = torch.nn.functional.cross_entropy(model(x), torch.from_numpy(batch["label"]).long())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(te["image"]).permute(0, 3, 1, 2)).numpy()
    acc = float((logits.argmax(-1) == te["label"]).mean())
    out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    meta = {
        "settings": settings,
        "source_test_accuracy": acc,
        "train_seconds": time.perf_counter() - t0,
        "steps": total,
    }
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    log.info(
        "source: %s trained %d steps in %.0fs, source test accuracy %.4f -> %s",
        cfg.model,
        total,
        meta["train_seconds"],
        acc,
        path,
    )
    return path, meta


def import_parity(cfg: TransferConfig, path: Path) -> float:
    """Max |logit difference| between the torch checkpoint and its JAX conversion on source test images."""
    import jax
    import torchvision

    from converters.torchvision import convert, load_checkpoint
    from jtkd import models

    sd = load_checkpoint(path)
    variables = convert(cfg.model, sd)  # head kept: the source classifier
    x = _load(cfg, "test", cfg.source_classes)["image"][:64]
    module = models.create(cfg.model, num_classes=len(cfg.source_classes))
    with jax.default_matmul_precision("highest"):
        ours = np.asarray(module.apply(variables, x, train=False))
    tm = torchvision.models.get_model(cfg.model, weights=None, num_classes=len(cfg.source_classes))
    tm.load_state_dict(sd)
    tm.eval()
    with torch.no_grad():
        ref = tm(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    return float(np.abs(ours - ref).max())


# --------------------------------------------------------------------------------- fine-tuning
def mode_config(cfg: TransferConfig, mode: str) -> FinetuneConfig:
    lr = {"scratch": cfg.lr_scratch, "linear": cfg.lr_linear, "partial": cfg.lr_partial, "full": cfg.lr_full}[mode]
    return FinetuneConfig(
        model=cfg.model,
        mode=mode,  # type: ignore[arg-type]
        freeze_stages=cfg.freeze_stages,
        head_init="zero",
        image_size=cfg.image_size,
        batch_size=cfg.batch_size,
        eval_batch_size=128,
        num_devices=1,
        optim=OptimConfig(
            optimizer="sgd",
            lr=lr,
            momentum=0.9,
            nesterov=True,
            weight_decay=cfg.weight_decay,
            schedule="cosine",
            warmup_steps=cfg.warmup_steps,
        ),
        loop=LoopConfig(
            steps=cfg.steps,
            log_every=min(5, cfg.steps),
            eval_every=cfg.eval_every,
            checkpoint_every=0,
            progress=cfg.progress,
            checkpoints=False,
        ),
    )


def run(cfg: TransferConfig) -> dict[str, Any]:
    cfg.validate()
    if cfg.quick:
        cfg = cfg.quick_version()
    log = logging.getLogger("jtkd")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    jconfig.save(cfg, out / "config.json")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t_start, cpu_start = time.perf_counter(), _cpu_seconds()

    src_path, src_meta = train_source(cfg, out, log)
    parity = import_parity(cfg, src_path)
    log.info("import: max |torch - jax| logits on source test images = %.2e", parity)

    import jax

    from converters.torchvision import load_checkpoint
    from jtkd import finetune, train

    state_dict = load_checkpoint(src_path)
    mesh = train.make_mesh(1)
    n_cls = len(cfg.target_classes)
    test = _load(cfg, "test", cfg.target_classes)
    augment = translate(cfg.shift) if cfg.augment else None
    evaluator = finetune.Evaluator(cfg.model, n_cls, mesh, 128)
    results_test_n = len(test["label"])
    results: dict[str, Any] = {"modes": {}, "config": jconfig.to_dict(cfg)}
    tuners: dict[Any, Any] = {}
    for mode in cfg.modes:
        mcfg = mode_config(cfg, mode)
        # scratch and full differ only in their start: with equal settings they share one compiled step
        key = dataclasses.replace(mcfg, mode="full") if mode in ("scratch", "full") else mcfg
        ft = tuners.get(key)
        accs, curves = [], []
        for seed in range(cfg.seeds):
            scfg = dataclasses.replace(mcfg, seed=seed)
            variables = finetune.initial_variables(scfg, n_cls, None if mode == "scratch" else state_dict)
            if ft is None:
                ft = tuners[key] = finetune.Finetuner(key, variables, n_cls, mesh, evaluator)  # compiled once
            few = _load(cfg, "train", cfg.target_classes, cfg.labels_per_class, seed=seed)
            aug = None if ft.probe else augment
            t0 = time.perf_counter()
            final, history = ft.fit(
                variables,
                few,
                test,
                augment=aug,
                seed=seed,
                workdir=out / "runs" / f"{mode}_seed{seed}",
                desc=f"{mode} seed {seed}",
            )
            if ft.probe:  # the full model (backbone + trained head) on images, not the cached features
                acc = evaluator(final, test)["accuracy"]
            else:  # the loop's final evaluation is already the full model on the whole test split
                acc = next(r["eval/accuracy"] for r in reversed(history) if "eval/accuracy" in r)
            accs.append(acc)
            curves.append([(r["step"], r["eval/accuracy"]) for r in history if "eval/accuracy" in r])
            log.info("%s seed %d: test accuracy %.4f (%.0fs)", mode, seed, acc, time.perf_counter() - t0)
            del final
        results["modes"][mode] = {
            "accuracy_mean": float(np.mean(accs)),
            "accuracy_std": float(np.std(accs)),
            "accuracy_per_seed": accs,
            "eval_curves": curves,
        }
    results["source"] = {
        "test_accuracy": src_meta["source_test_accuracy"],
        "checkpoint": str(src_path),
        "import_max_abs_logit_diff": parity,
    }
    results["target_test_examples"] = results_test_n
    results["wall_seconds"] = time.perf_counter() - t_start
    results["cpu_seconds"] = _cpu_seconds() - cpu_start
    results["devices"] = [str(d) for d in jax.devices()]
    table = markdown_table(cfg, results)
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(cfg, results, out / "transfer.png")
    print(table)
    print(
        f"\nwrote {out / 'results.md'}, {out / 'results.json'}, {out / 'transfer.png'} "
        f"({results['wall_seconds']:.0f}s wall, {results['cpu_seconds']:.0f}s CPU)"
    )
    return results


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def markdown_table(cfg: TransferConfig, results: dict[str, Any]) -> str:
    src = results["source"]
    lines = [
        (
            f"Target: digits {','.join(map(str, cfg.target_classes))} with {cfg.labels_per_class} labels per class; "
            f"{cfg.steps} steps per run, {cfg.seeds} seed(s); "
            f"accuracy on all {results['target_test_examples']} target test images."
        ),
        (
            f"Source: torchvision {cfg.model} trained in PyTorch on digits {','.join(map(str, cfg.source_classes))} "
            f"(source test accuracy {src['test_accuracy']:.4f}); "
            f"import max |logit diff| {src['import_max_abs_logit_diff']:.1e}."
        ),
        "",
        "| mode | what trains | test accuracy (mean ± std) | per seed |",
        "|---|---|---|---|",
    ]
    what = {
        "scratch": "all layers, random init",
        "linear": "new head only (frozen backbone, cached features)",
        "partial": f"stages {cfg.freeze_stages + 1}+ and head (stem + first {cfg.freeze_stages} stages frozen)",
        "full": "all layers, from the checkpoint",
    }
    for mode, r in results["modes"].items():
        per = ", ".join(f"{a:.3f}" for a in r["accuracy_per_seed"])
        lines.append(f"| {mode} | {what[mode]} | {r['accuracy_mean']:.4f} ± {r['accuracy_std']:.4f} | {per} |")
    return "\n".join(lines)


def plot(cfg: TransferConfig, results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"scratch": "tab:gray", "linear": "tab:blue", "partial": "tab:orange", "full": "tab:green"}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10.5, 4), gridspec_kw={"width_ratios": [3, 2]})
    for mode, r in results["modes"].items():
        curves = [c for c in r["eval_curves"] if c]
        if not curves:
            continue
        steps = [s for s, _ in curves[0]]
        acc = np.array([[a for _, a in c] for c in curves])
        mean = acc.mean(0)
        ax1.plot(steps, mean, marker="o", ms=3, color=colors.get(mode), label=mode)
        if len(curves) > 1:
            ax1.fill_between(steps, acc.min(0), acc.max(0), color=colors.get(mode), alpha=0.15)
    ax1.set_xlabel("fine-tuning step")
    ax1.set_ylabel("target test accuracy")
    ax1.set_title(
        f"digits {cfg.target_classes[0]}-{cfg.target_classes[-1]}, {cfg.labels_per_class} labels/class "
        f"(mean, min-max over {cfg.seeds} seeds)",
        fontsize=9,
    )
    chance = 1 / len(cfg.target_classes)
    ax1.axhline(chance, color="black", lw=0.8, ls=":", label="chance")
    ax1.set_ylim(0, 1)
    ax1.grid(alpha=0.3)
    ax1.legend(loc="lower right")
    modes = list(results["modes"])
    means = [results["modes"][m]["accuracy_mean"] for m in modes]
    ax2.bar(modes, means, color=[colors.get(m) for m in modes], alpha=0.8)
    for i, m in enumerate(modes):
        per = results["modes"][m]["accuracy_per_seed"]
        ax2.scatter([i] * len(per), per, color="black", s=12, zorder=3)
        ax2.text(i, max(per) + 0.025, f"{means[i]:.3f}", ha="center", fontsize=9)
    ax2.axhline(chance, color="black", lw=0.8, ls=":")
    ax2.set_ylim(0, 1.08)
    ax2.set_ylabel("final test accuracy")
    ax2.set_title("final accuracy per mode (dots: seeds)", fontsize=9)
    ax2.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from jtkd.loop import setup_logging

    setup_logging()
    cfg = jconfig.parse_cli(TransferConfig(), sys.argv[1:] if argv is None else argv)
    return run(cfg)


if __name__ == "__main__":
    use_cpu_flags()  # this process owns XLA: its measured-best CPU flags (no-op on GPU/TPU)
    main()
