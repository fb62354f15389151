"""Users' own images in torchvision's ImageFolder layout: `root/<class name>/**/<image>`.

Classes are the sub-folders of `root` sorted by name, labels their sorted index (as torchvision),
unless `classes` fixes the order or the map. Files are checked when the source is built:

* a file that is not an image, or one PIL cannot read, raises `BadImageError` naming it; with
  `on_bad='skip'` it is left out instead, with one warning listing every skipped file (also kept
  in `info.skipped`). Hidden files (`.DS_Store`, ...) and files directly in `root` are ignored.
* a class folder without usable images raises; `on_empty='drop'` leaves the class out and
  relabels the rest 0..k-1 (warning with the new map), `on_empty='keep'` keeps its label unused.
* `validate='header'` (default) opens and verifies every file (cheap: catches non-images, empty
  and most corrupt files); `'full'` decodes every file (also catches truncated JPEGs); `'none'`
  checks nothing. A file that still fails later raises `BadImageError` naming it.

An evaluation folder takes the training folder's labels (`eval_folder`), never its own: two folders
whose sub-folders differ (`val/zebra` beside `train/yak`) would otherwise pair labels by sorted
position and shift them silently. `FolderOptions` carries these checks on the command lines
(`--folder.on_bad skip`, `--folder.on_empty drop`, `--folder.validate full`).

Every image is returned as RGB: grayscale, palette, RGBA (alpha dropped, as torchvision's loader),
CMYK and 16-bit images are converted.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from jtkd.data.source import DatasetInfo, relabel

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")


class BadImageError(ValueError):
    """A file that is not a readable image; `path` names it."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


@dataclass(frozen=True)
class FolderOptions:
    """`image_folder`'s checks as a config: the fields are its keyword arguments of the same names."""

    on_bad: Literal["error", "skip"] = "error"
    on_empty: Literal["error", "drop", "keep"] = "error"
    validate: Literal["header", "full", "none"] = "header"


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB (16/32-bit grayscale rescaled to 8 bits instead of clipped)."""
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I;16") or img.mode == "I":
        arr = np.asarray(img).astype(np.float64)
        if img.mode.startswith("I;16") or arr.max(initial=0) > 255:
            arr = arr / 257.0  # 65535 -> 255
        return Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode == "F":
        arr = np.asarray(img)
        arr = arr * 255.0 if arr.max(initial=0) <= 1.0 else arr
        return Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # PIL's advice for palette transparency; colours are unchanged
    return img.convert("RGB")


def load_image(path: str) -> Image.Image:
    """Decode `path` to an RGB PIL image; any failure is a `BadImageError` naming the file."""
    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            img.load()
        return to_rgb(img)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise BadImageError(path, f"cannot decode image ({type(e).__name__}: {e})") from e


def check_image(path: str, validate: Literal["header", "full", "none"]) -> str | None:
    """None if `path` passes the check, else the reason it fails."""
    if not path.lower().endswith(IMG_EXTENSIONS):
        return f"not an image file (extension not in {IMG_EXTENSIONS})"
    if validate == "none":
        return None
    try:
        if validate == "full":
            load_image(path)
        else:
            with open(path, "rb") as f:
                Image.open(f).verify()
    except BadImageError as e:
        return e.reason
    except Exception as e:  # noqa: BLE001  PIL raises many types for corrupt files
        return f"not a readable image ({type(e).__name__}: {e})"
    return None


def list_files(class_dir: str) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out.extend(os.path.join(dirpath, f) for f in sorted(filenames) if not f.startswith("."))
    return out


def _class_dirs(root: str) -> list[str]:
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder {root!r} does not exist or is not a directory")
    found = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not found:
        raise ValueError(f"{root!r} has no class sub-folders (expected root/<class>/<image files>)")
    return found


@dataclass(frozen=True)
class ImageFolder:
    """Random-access source over image files: `self[i]` -> {'image': RGB PIL image, 'label': int}."""

    files: tuple[str, ...]
    labels: np.ndarray
    info: DatasetInfo

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": load_image(self.files[index]), "label": int(self.labels[index])}


def image_folder(
    path: str | os.PathLike,
    *,
    classes: Sequence[str] | Mapping[str, int] | None = None,
    on_bad: Literal["error", "skip"] = "error",
    on_empty: Literal["error", "drop", "keep"] = "error",
    validate: Literal["header", "full", "none"] = "header",
    num_workers: int = 8,
    split: str = "",
) -> ImageFolder:
    """Scan and check `path`; see the module docstring for the layout and the failure modes.

    Args:
      classes: None (all sub-folders, sorted), a list of folder names (labels 0..k-1 in that
        order), or an explicit {folder name: label} map whose labels are 0..k-1.
    """
    if on_bad not in ("error", "skip"):
        raise ValueError(f"on_bad must be 'error' or 'skip', got {on_bad!r}")
    if on_empty not in ("error", "drop", "keep"):
        raise ValueError(f"on_empty must be 'error', 'drop' or 'keep', got {on_empty!r}")
    if validate not in ("header", "full", "none"):
        raise ValueError(f"validate must be 'header', 'full' or 'none', got {validate!r}")
    root = os.fspath(path)
    found = _class_dirs(root)

    if classes is None:
        label_map = {c: i for i, c in enumerate(found)}
    elif isinstance(classes, Mapping):
        relabel(list(classes), found)  # checks the names
        label_map = {c: int(v) for c, v in classes.items()}
        if sorted(label_map.values()) != list(range(len(label_map))):
            raise ValueError(f"classes map must use labels 0..{len(label_map) - 1} once each, got {label_map}")
        if on_empty == "drop":
            raise ValueError("on_empty='drop' would renumber labels fixed by the classes map; use 'keep' or 'error'")
    else:
        label_map = relabel(list(classes), found)

    candidates = [(f, c) for c in label_map for f in list_files(os.path.join(root, c))]
    with ThreadPoolExecutor(max(1, num_workers)) as pool:
        reasons = list(
            tqdm(
                pool.map(lambda fc: check_image(fc[0], validate), candidates),
                total=len(candidates),
                desc=f"checking {root}",
                disable=len(candidates) < 2000,
                leave=False,
            )
        )
    bad = [(f, r) for (f, _), r in zip(candidates, reasons) if r is not None]
    if bad and on_bad == "error":
        listing = "\n".join(f"  {f}: {r}" for f, r in bad[:20])
        more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
        raise BadImageError(
            bad[0][0],
            f"{bad[0][1]}\n{len(bad)} bad file(s) under {root!r}:\n{listing}{more}\n"
            "(on_bad='skip', on the command line --folder.on_bad skip, leaves them out)",
        )
    if bad:
        warnings.warn(
            f"image_folder({root!r}): skipped {len(bad)} bad file(s):\n" + "\n".join(f"  {f}: {r}" for f, r in bad),
            stacklevel=2,
        )
    good = [fc for fc, r in zip(candidates, reasons) if r is None]

    present = {c for _, c in good}
    empty = [c for c in label_map if c not in present]
    if empty:
        if on_empty == "error":
            raise ValueError(
                f"class folder(s) {empty} under {root!r} have no usable images "
                "(on_empty='drop' leaves them out and relabels, 'keep' keeps their labels unused; on the command line "
                "--folder.on_empty drop|keep)"
            )
        if on_empty == "drop":
            kept = sorted((v, c) for c, v in label_map.items() if c not in empty)
            label_map = {c: i for i, (_, c) in enumerate(kept)}
            if not label_map:
                raise ValueError(f"every class folder under {root!r} is empty")
            warnings.warn(
                f"image_folder({root!r}): dropped empty classes {empty}; labels are now {label_map}", stacklevel=2
            )
        else:
            warnings.warn(f"image_folder({root!r}): classes {empty} are empty; their labels stay unused", stacklevel=2)

    good = [(f, c) for f, c in good if c in label_map]
    if not good:
        raise ValueError(f"no usable images under {root!r}")
    class_names = tuple(sorted(label_map, key=label_map.get))
    info = DatasetInfo(
        name=f"image_folder:{root}",
        split=split,
        num_examples=len(good),
        class_names=class_names,
        label_map=dict(label_map),
        skipped=tuple(f for f, _ in bad),
    )
    return ImageFolder(tuple(f for f, _ in good), np.asarray([label_map[c] for _, c in good], np.int32), info)


def eval_folder(
    path: str | os.PathLike,
    classes: Sequence[str],
    *,
    on_empty: Literal["error", "drop", "keep"] = "error",
    **folder_kw: Any,
) -> ImageFolder:
    """An evaluation folder labelled as the training data is: `classes` are the training class names
    in label order (`train.info.class_names`), i.e. the model's outputs.

    Unlike `image_folder(path, classes=...)`, which picks a subset, every sub-folder must be one of
    `classes`: one that is not raises, naming it (the model has no output for its images). A class
    without a folder or usable images here raises with on_empty='error', else (drop or keep) its
    label stays unused in evaluation, with a warning; labels are never renumbered. `folder_kw` are
    `image_folder`'s other arguments (on_bad, validate, num_workers, split).
    """
    if on_empty not in ("error", "drop", "keep"):
        raise ValueError(f"on_empty must be 'error', 'drop' or 'keep', got {on_empty!r}")
    root = os.fspath(path)
    classes = list(classes)
    found = _class_dirs(root)
    extra = [c for c in found if c not in classes]
    if extra:
        raise ValueError(
            f"evaluation folder {root!r} has class folder(s) {extra} that the training data has no label for "
            f"(training classes: {classes}); the model has no output for their images"
        )
    missing = [c for c in classes if c not in found]
    if missing and on_empty == "error":
        raise ValueError(
            f"evaluation folder {root!r} has no folder for training class(es) {missing} "
            "(on_empty='keep', on the command line --folder.on_empty keep, evaluates without them)"
        )
    if missing:
        warnings.warn(f"eval_folder({root!r}): no folder for classes {missing}; their labels stay unused", stacklevel=2)
    present = [c for c in classes if c in found]
    own = image_folder(root, classes=present, on_empty="error" if on_empty == "error" else "keep", **folder_kw)
    to_label = np.asarray([classes.index(c) for c in present], np.int32)
    info = dataclasses.replace(own.info, class_names=tuple(classes), label_map={c: i for i, c in enumerate(classes)})
    return ImageFolder(own.files, to_label[own.labels], info)
