"""torchvision state_dict <-> Flax variables, strict and one-to-one.

    state_dict = load_checkpoint("resnet50_finetuned.pth")      # weights_only, never arbitrary pickle
    variables = convert("resnet50", state_dict)                  # {'params': ..., 'batch_stats': ...}
    state_dict = to_torch("resnet50", variables)                 # torchvision load_state_dict(strict=True)

The key map is mechanical (see `jtkd.models.registry`): torch `layer1.0.downsample.1.weight` is the
Flax leaf `layer1_0/downsample_1/scale`. Every torch key must be used exactly once and every Flax
leaf filled; all violations are collected and raised together in one `ConversionError`.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import io
import pickle
import re
import types
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jtkd import models
from jtkd.models.registry import ModelSpec, flax_path, get_spec

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DataParallel/DDP, torch.compile
_IGNORED_LEAVES = ("num_batches_tracked",)
_BN_LEAVES = {"running_mean": "mean", "running_var": "var"}


class ConversionError(ValueError):
    """A state_dict that does not fit the Flax model; the message lists every problem at once."""


class UnsafeCheckpointError(ValueError):
    """A checkpoint that can only be loaded by unpickling arbitrary code; refused, nothing executed."""


# --------------------------------------------------------------------------------------------- keys
def _strip_wrappers(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in _WRAPPER_PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p) :], True
    return key


def _to_numpy(v: Any) -> np.ndarray:
    if hasattr(v, "detach"):  # torch.Tensor, without importing torch
        v = v.detach().cpu()
        if str(v.dtype) == "torch.bfloat16":
            v = v.float()
        return v.numpy()
    return np.asarray(v)


@dataclasses.dataclass(frozen=True)
class _Leaf:
    collection: str  # 'params' | 'batch_stats'
    path: tuple[str, ...]  # Flax path within the collection
    kind: str  # 'kernel' | 'plain'


def _flat(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out: dict[tuple[str, ...], Any] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def _unflat(flat: Mapping[tuple[str, ...], Any]) -> dict:
    out: dict = {}
    for path, v in flat.items():
        d = out
        for p in path[:-1]:
            d = d.setdefault(p, {})
        d[path[-1]] = v
    return out


def _map_key(torch_key: str, template: Mapping[tuple[str, ...], Any]) -> _Leaf | None:
    """The Flax leaf a torch key fills, or None if the Flax model has no such leaf."""
    *mod, leaf = flax_path(torch_key)
    mod_t = tuple(mod)
    if leaf in _BN_LEAVES:
        path = mod_t + (_BN_LEAVES[leaf],)
        return _Leaf("batch_stats", path, "plain") if ("batch_stats",) + path in template else None
    candidates: list[tuple[str, str]] = []
    if leaf == "weight":
        candidates = [("kernel", "kernel"), ("scale", "plain"), ("embedding", "plain")]
    candidates.append((leaf, "plain"))
    for name, kind in candidates:
        if ("params",) + mod_t + (name,) in template:
            return _Leaf("params", mod_t + (name,), kind)
    return None


# kernel axis orders: OIHW -> HWIO (conv), OIW -> WIO (Conv1d), (out, in) -> (in, out) (Linear)
_TORCH_TO_FLAX = {4: (2, 3, 1, 0), 3: (2, 1, 0), 2: (1, 0)}
_FLAX_TO_TORCH = {n: tuple(int(i) for i in np.argsort(p)) for n, p in _TORCH_TO_FLAX.items()}


def _torch_to_flax_array(value: Any, kind: str) -> np.ndarray:
    """A checkpoint value as its Flax leaf's array (kernels permuted), never aliasing the value's
    memory: torch may update its tensors in place."""
    src = _to_numpy(value)
    perm = _TORCH_TO_FLAX.get(src.ndim) if kind == "kernel" else None
    if perm is None:
        arr = src
    elif hasattr(value, "permute"):  # torch's copy kernel: resnet50's kernels 0.12 s against numpy's 0.19 s
        arr = _to_numpy(value.detach().permute(*perm).contiguous())
    else:
        arr = np.ascontiguousarray(src.transpose(perm))
    return arr.copy() if np.may_share_memory(arr, src) else arr


def _flax_to_torch_array(arr: np.ndarray, kind: str) -> np.ndarray:
    if kind == "kernel" and arr.ndim in _FLAX_TO_TORCH:
        return np.ascontiguousarray(arr.transpose(_FLAX_TO_TORCH[arr.ndim]))
    return arr


def _is_derived(spec: ModelSpec, key: str) -> bool:
    leaf = key.rsplit(".", 1)[-1]
    return leaf in _IGNORED_LEAVES or any(re.fullmatch(p, key) for p in spec.derived_buffers)


def _owner_prefix(spec: ModelSpec, keys: list[str]) -> str:
    """The prefix every key carries ahead of torchvision's names when the model was an attribute of a
    training wrapper ('model.' for a LightningModule's self.model, 'backbone.', ...), located by the
    classifier's weight; '' when the keys are torchvision's own or no single prefix explains them."""
    head = spec.head + ".weight"
    if head in keys:
        return ""
    for k in keys:
        p = k[: -len(head)]
        if k.endswith("." + head) and all(x.startswith(p) for x in keys):
            return p
    return ""


def _fix_keys(spec: ModelSpec, state_dict: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = collections.OrderedDict()
    if hasattr(state_dict, "_metadata"):  # module versions: torchvision's load hooks read them
        out._metadata = state_dict._metadata  # type: ignore[attr-defined]
    owner = _owner_prefix(spec, [_strip_wrappers(k) for k in state_dict])
    if owner:  # the strict key check below still has to pass, so this cannot fill a wrong leaf
        warnings.warn(f"every checkpoint key starts with {owner!r} (a training wrapper's attribute): stripped", stacklevel=3)
    for k, v in state_dict.items():
        k = _strip_wrappers(_strip_wrappers(k)[len(owner) :])
        for pat, rep in spec.key_fixups:
            k = re.sub(pat, rep, k)
        if k in out:
            raise ConversionError(f"two checkpoint entries map to the same key {k!r}")
        out[k] = v
    return out


def _template(spec: ModelSpec, module: Any) -> Mapping[tuple[str, ...], jax.ShapeDtypeStruct]:
    """The Flax leaves' shapes, traced once per (model, kwargs): about 40% of a repeated convert."""
    return _template_cached(module, spec.input_size)


@functools.lru_cache(maxsize=32)  # Flax modules hash and compare by their fields
def _template_cached(module: Any, input_size: int) -> Mapping[tuple[str, ...], jax.ShapeDtypeStruct]:
    shapes = models.shapes(module, input_size)
    return types.MappingProxyType(_flat(shapes))


def _shape_of(v: Any) -> tuple[int, ...]:
    return tuple(v.shape)


def infer_num_classes(spec: ModelSpec, state_dict: Mapping[str, Any]) -> int:
    """The classifier width of a (fixed-key) torch state_dict; 0 if it has no classifier."""
    for leaf in ("weight", "bias"):
        key = f"{spec.head}.{leaf}"
        if key in state_dict:
            return int(_shape_of(state_dict[key])[0])
    return 0


def _model_kwargs(spec: ModelSpec, state_dict: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    kw: dict[str, Any] = {"num_classes": infer_num_classes(spec, state_dict)}
    if spec.infer_kwargs is not None:
        kw.update(spec.infer_kwargs({k: _shape_of(v) for k, v in state_dict.items()}))
    kw.update(overrides)
    return kw


def model_kwargs(name: str, state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The builder kwargs (num_classes, aux_logits, image_size, ...) a torch state_dict implies."""
    spec = get_spec(name)
    return _model_kwargs(spec, _fix_keys(spec, state_dict), {})


# ------------------------------------------------------------------------------------------ convert
def convert(
    name: str,
    state_dict: Mapping[str, Any],
    *,
    head: str = "keep",
    num_classes: int | None = None,
    rng: jax.Array | None = None,
    **model_kw: Any,
) -> dict[str, dict]:
    """Flax variables {'params', 'batch_stats'} for torchvision model `name` from its torch state_dict.

    `state_dict` values may be torch tensors or numpy arrays; `module.`/`_orig_mod.` prefixes are
    stripped, and so is a prefix every key shares ahead of torchvision's names (`model.` from a
    LightningModule's `self.model`), with a warning. The number of classes is read from the
    checkpoint's classifier.
    head="reinit": drop the checkpoint's classifier (and the auxiliary classifiers' output layers of
    googlenet and inception_v3) and initialise new ones with `num_classes` outputs (from `rng`);
    head="keep" requires `num_classes`, if given, to match the checkpoint.
    Raises ConversionError listing every missing, unexpected and mis-shaped key together.
    """
    if head not in ("keep", "reinit"):
        raise ValueError(f"head must be 'keep' or 'reinit', got {head!r}")
    if not isinstance(state_dict, Mapping):
        raise ConversionError(f"expected a state_dict (a mapping of names to tensors), got {type(state_dict).__name__}")
    spec = get_spec(name)
    sd = _fix_keys(spec, state_dict)
    kw = _model_kwargs(spec, sd, model_kw)
    if head == "reinit":
        if num_classes is None:
            raise ValueError("head='reinit' needs num_classes")
        prefixes = tuple(h + "." for h in (spec.head, *spec.aux_heads))  # auxiliary classifiers get new heads too
        sd = {k: v for k, v in sd.items() if not k.startswith(prefixes)}
        kw["num_classes"] = num_classes
    elif num_classes is not None and num_classes != kw["num_classes"]:
        raise ConversionError(
            f"{name}: checkpoint classifier '{spec.head}' has {kw['num_classes']} outputs, num_classes={num_classes} "
            "was asked; pass head='reinit' to replace the classifier"
        )
    module = models.create(name, **kw)
    template = _template(spec, module)

    filled: dict[tuple[str, ...], np.ndarray] = {}
    unexpected: list[str] = []
    mismatched: list[str] = []
    seen: set[tuple[str, ...]] = set()
    for key, value in sd.items():
        if _is_derived(spec, key):
            continue
        leaf = _map_key(key, template)
        if leaf is None:
            unexpected.append(key)
            continue
        full = (leaf.collection,) + leaf.path
        if full in seen:
            raise ConversionError(f"{name}: torch keys collide on Flax leaf {'/'.join(full)} (at {key!r})")
        seen.add(full)
        arr = _torch_to_flax_array(value, leaf.kind)
        want = template[full].shape
        if arr.shape != tuple(want):
            mismatched.append(f"{key}: checkpoint {tuple(_shape_of(value))} -> {arr.shape}, model expects {tuple(want)} at {'/'.join(full)}")
            continue
        filled[full] = arr.astype(np.float32, copy=False) if arr.dtype != np.float32 else arr

    if head == "reinit":
        filled.update(_fresh_heads(spec, module, rng if rng is not None else jax.random.key(0)))

    missing = [full for full in template if full not in seen and full not in filled]
    if unexpected or missing or mismatched:
        names = _torch_names(name, kw, missing)
        missing_s = [f"{names.get(f, '?')} (Flax {'/'.join(f)})" for f in missing]
        raise ConversionError(_report(name, missing_s, unexpected, mismatched, len(template)))
    variables = _unflat(filled)
    variables.setdefault("params", {})
    variables.setdefault("batch_stats", {})
    return variables


def _fresh_heads(spec: ModelSpec, module: Any, rng: jax.Array) -> dict[tuple[str, ...], np.ndarray]:
    """The classifier's (and auxiliary classifiers' output layers') leaves of the model's own init from
    `rng`. Jitted and pruned to those leaves, XLA drops the rest of the network: googlenet takes 1.6 s
    against 35 s for the eager init, with the same values (flax derives each module's rng from its path)."""
    heads = [("params",) + p for p in (spec.head_path, *(flax_path(h + ".weight")[:-1] for h in spec.aux_heads))]

    def init(key: jax.Array) -> dict[tuple[str, ...], jax.Array]:
        flat = _flat(models.init(module, key, spec.input_size))
        return {k: v for k, v in flat.items() if any(k[: len(h)] == h for h in heads)}

    return {k: np.asarray(v) for k, v in jax.jit(init)(rng).items()}


def _torch_names(name: str, model_kw: Mapping[str, Any], leaves: list[tuple[str, ...]]) -> dict[tuple[str, ...], str]:
    """The torch key each Flax leaf corresponds to, for error messages (from torchvision's own key list)."""
    if not leaves:
        return {}
    try:
        expected = build_torch_model(name, "meta", **model_kw).state_dict()
    except Exception:  # noqa: BLE001  the names are a courtesy; the error is raised regardless
        return {}
    targets = dict.fromkeys(leaves)
    out = {}
    for key in expected:
        leaf = _map_key(key, targets)
        if leaf is not None:
            out[(leaf.collection,) + leaf.path] = key
    return out


def _report(name: str, missing: list[str], unexpected: list[str], mismatched: list[str], total: int) -> str:
    lines = [f"state_dict does not match jtkd model {name!r}:"]
    for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
        if items:
            lines.append(f"  {len(items)} {title} key(s):")
            lines += [f"    {s}" for s in items[:50]]
            if len(items) > 50:
                lines.append(f"    ... and {len(items) - 50} more")
    if max(len(unexpected), len(missing)) + len(mismatched) > total // 4:
        lines.append("  (many keys differ: is this a checkpoint of another architecture?)")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------- to_torch
def build_torch_model(name: str, device: str = "cpu", **kw: Any) -> Any:
    """The (untrained) torchvision model that jtkd model `name` with builder kwargs `kw` mirrors."""
    import torch
    import torchvision

    spec = get_spec(name)
    build = spec.torch_builder or (lambda n, **k: torchvision.models.get_model(n, weights=None, **k))
    try:
        with torch.device(device), warnings.catch_warnings():
            if device == "meta":  # shapes only: googlenet's notice that its default init will change is noise
                warnings.simplefilter("ignore", FutureWarning)
            return build(name, **kw)
    except NotImplementedError:  # builders that compute with tensor values (RegNet's widths) need real ones
        if device == "cpu":
            raise
        return build(name, **kw)


_TORCH_LEAVES = {"kernel": "weight", "scale": "weight", "embedding": "weight", "mean": "running_mean", "var": "running_var"}


def _torch_shapes(flat: Mapping[tuple[str, ...], Any]) -> dict[str, tuple[int, ...]]:
    """torch key -> torch shape for Flax leaves: the inverse of the mechanical key map, enough for a
    spec's infer_kwargs (names whose own '_<n>' is not a torch index come out wrong, harmlessly)."""
    out = {}
    for (_, *path, leaf), v in flat.items():
        parts = []
        for seg in path:
            head, *idx = seg.split("_")
            while idx and not all(i.isdigit() for i in idx):
                head, idx = f"{head}_{idx[0]}", idx[1:]
            parts += [head, *idx]
        shape = tuple(np.shape(v))
        if leaf == "kernel" and len(shape) in _FLAX_TO_TORCH:
            shape = tuple(shape[i] for i in _FLAX_TO_TORCH[len(shape)])
        out[".".join(parts + [_TORCH_LEAVES.get(leaf, leaf)])] = shape
    return out


def _implied(spec: ModelSpec, flat: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
    return spec.infer_kwargs(_torch_shapes(flat)) if spec.infer_kwargs is not None else {}


def implied_kwargs(name: str, variables: Mapping[str, Any]) -> dict[str, Any]:
    """The builder kwargs beyond num_classes that Flax variables' shapes imply (aux_logits, ViT
    image_size and representation_size, MNASNet's legacy_stem), as `model_kwargs` reads them from a
    torch state_dict: `models.create(name, num_classes=..., **implied_kwargs(name, variables))` is
    the module that applies `variables`."""
    return _implied(get_spec(name), _flat({"params": variables.get("params", {})}))


def flax_module(name: str, variables: Mapping[str, Any] | None = None, **kw: Any) -> Any:
    """The Flax module that applies `variables`: built with their num_classes and the builder kwargs their
    shapes imply (ViT image_size, MNASNet legacy_stem, ...), overridden by `kw` (dtype, axis_name;
    num_classes=0 for the backbone alone). variables=None: the builder's defaults."""
    implied = {} if variables is None else {"num_classes": models.num_classes(name, variables),
                                            **implied_kwargs(name, variables)}
    return models.create(name, **{**implied, **kw})


def to_torch(name: str, variables: Mapping[str, Any], **model_kw: Any) -> dict[str, Any]:
    """A torch state_dict for torchvision model `name` from Flax variables; loads with strict=True.

    The builder kwargs (num_classes, aux_logits, ViT image_size, ...) are read from the variables'
    shapes as `convert` reads them from a checkpoint; `model_kw` overrides them.
    """
    import torch

    spec = get_spec(name)
    flat = _flat({"params": variables.get("params", {}), "batch_stats": variables.get("batch_stats", {})})
    kw = {"num_classes": models.num_classes(name, variables), **_implied(spec, flat), **model_kw}
    expected = build_torch_model(name, "meta", **kw).state_dict()
    out: dict[str, Any] = {}
    used: set[tuple[str, ...]] = set()
    missing, mismatched, derived = [], [], []
    for key, ref in expected.items():
        if _is_derived(spec, key):
            derived.append(key)
            continue
        leaf = _map_key(key, flat)
        if leaf is None:
            missing.append(key)
            continue
        full = (leaf.collection,) + leaf.path
        arr = _flax_to_torch_array(np.asarray(flat[full], dtype=np.float32), leaf.kind)
        if arr.shape != tuple(ref.shape):
            mismatched.append(f"{key}: torch expects {tuple(ref.shape)}, Flax {'/'.join(full)} gives {arr.shape}")
            continue
        used.add(full)
        out[key] = torch.from_numpy(arr.copy()).to(ref.dtype)
    unexpected = ["/".join(f) for f in flat if f not in used]
    if missing or mismatched or unexpected:
        raise ConversionError(_report(name, missing, unexpected, mismatched, len(expected)))
    if derived:
        real = build_torch_model(name, "cpu", **kw).state_dict() if any(not k.endswith("num_batches_tracked") for k in derived) else {}
        for key in derived:
            out[key] = real[key].clone() if key in real else torch.zeros((), dtype=expected[key].dtype)
    result = collections.OrderedDict((k, out[k]) for k in expected)
    # module versions, as torch's own state_dict carries them: load hooks (e.g. MNASNet's) read them
    result._metadata = getattr(expected, "_metadata", collections.OrderedDict())  # type: ignore[attr-defined]
    return result


# ------------------------------------------------------------------------------------- checkpoints
def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A torch state_dict from `.pth`/`.pt`/`.bin` (torch.load weights_only=True) or `.safetensors`.

    Training checkpoints that nest the weights under 'state_dict', 'model' or 'model_state_dict'
    are unwrapped. Anything that needs arbitrary unpickling is refused and nothing of it runs.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(
            f"{path} is a directory, not a torch checkpoint file; Flax variables saved there (by `python -m "
            "converters --out`, or a run's final/) load with jtkd.checkpoint.load_variables"
        )
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path)))
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    import torch

    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        msg = re.sub(r"\x1b\[[0-9;]*m", "", str(e).split("\n\nCheck the documentation")[0])  # torch's bold
        raise UnsafeCheckpointError(
            f"{path}: refused, this checkpoint needs arbitrary unpickling (weights_only=True load failed). "
            f"Nothing from it was executed. Save a plain state_dict (torch.save(model.state_dict(), ...)) "
            f"or safetensors instead. torch said: {msg}"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, io.UnsupportedOperation, OSError) as e:
        raise ValueError(f"{path}: truncated or corrupt checkpoint ({type(e).__name__}: {e})") from None
    return _unwrap_state_dict(obj, path)


def _unwrap_state_dict(obj: Any, path: Path) -> dict[str, Any]:
    for _ in range(3):
        if isinstance(obj, Mapping) and obj and all(isinstance(k, str) for k in obj):
            tensors = [v for v in obj.values() if hasattr(v, "shape")]
            if len(tensors) == len(obj):
                return dict(obj)
            for key in ("state_dict", "model_state_dict", "model", "module", "net"):
                if isinstance(obj.get(key), Mapping):
                    obj = obj[key]
                    break
            else:
                break
        else:
            break
    raise ValueError(f"{path}: no state_dict found (a mapping of parameter names to tensors); got {type(obj).__name__}")


def weights_entry(name: str, weights: str = "DEFAULT") -> Any:
    """torchvision's weights enum member for `name` (DEFAULT or a member name): its url, transforms and
    meta (`categories`, accuracies) are in the package, so this works offline."""
    import torchvision

    try:
        enum = torchvision.models.get_model_weights(name)
    except ValueError as e:
        raise ValueError(f"torchvision has no weights for {name!r}: {e}") from None
    member = weights.rsplit(".", 1)[-1]
    try:
        return enum[member] if member != "DEFAULT" else enum.DEFAULT
    except KeyError:
        raise ValueError(f"{name}: unknown weights {weights!r}; choose one of DEFAULT, {', '.join(enum.__members__)}") from None


def eval_transform(name: str, weights: str = "DEFAULT") -> Any:
    """The weights' own evaluation preprocessing (`weights.transforms()`: resize, crop, interpolation, mean
    and std, from torchvision's metadata, offline) as a `jtkd.data.EvalTransform`."""
    from jtkd.data import EvalTransform

    preset = weights_entry(name, weights).transforms()
    return EvalTransform(
        preset.crop_size[0], resize_size=preset.resize_size[0], interpolation=preset.interpolation.value,
        mean=tuple(preset.mean), std=tuple(preset.std),
    )


def download_weights(name: str, weights: str = "DEFAULT") -> dict[str, Any]:
    """A torchvision weights state_dict through torchvision's own API (needs internet)."""
    w = weights_entry(name, weights)
    try:
        return w.get_state_dict(progress=True, check_hash=True)
    except OSError as e:  # urllib.error.URLError is an OSError
        raise ConnectionError(
            f"could not download {w} from {w.url}: {e}. This needs internet; offline, save the weights elsewhere "
            "and pass the file instead (--checkpoint PATH; a distillation teacher as NAME:PATH)"
        ) from None
