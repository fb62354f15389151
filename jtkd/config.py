"""Typed dataclass configs with command-line overrides.

    cfg = parse_args(FinetuneConfig(), ["--mode", "full", "--lr", "0.01", "--optim.schedule", "step"])

A key is a dotted path into nested dataclasses (`--optim.lr`) or, when unambiguous, a bare field name
(`--lr`). Values are parsed from the field's type hint (int, float, str, bool, tuple[...], Optional,
Literal); a bool also accepts the flag forms `--name` / `--no-name`. `--config FILE.json` loads a
saved config first, so `config.json` in a run directory reproduces the run. Unknown keys, bad values
and ambiguous short keys are errors that name the key and list the choices.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

C = TypeVar("C")


class ConfigError(ValueError):
    pass


def _fields(cfg: Any, prefix: str = "") -> dict[str, tuple[Any, dataclasses.Field, Any]]:
    """dotted key -> (owning dataclass instance, field, resolved type) for every leaf field."""
    hints = typing.get_type_hints(type(cfg))
    out: dict[str, tuple[Any, dataclasses.Field, Any]] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out.update(_fields(value, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = (cfg, f, hints[f.name])
    return out


def _parse(text: str, tp: Any, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if text.lower() in ("none", "null") and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _parse(text, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError("; ".join(errors))
    if origin is typing.Literal:
        for a in args:
            if str(a) == text:
                return a
        raise ConfigError(f"--{key}: {text!r} is not one of {', '.join(map(str, args))}")
    if origin in (tuple, list):
        parts = [p for p in text.split(",") if p.strip()] if text.strip() else []
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            vals = [_parse(p.strip(), args[0], key) for p in parts]
        elif origin is tuple:
            if len(parts) != len(args):
                raise ConfigError(f"--{key}: expected {len(args)} comma-separated values, got {text!r}")
            vals = [_parse(p.strip(), a, key) for p, a in zip(parts, args)]
        else:
            vals = [_parse(p.strip(), args[0] if args else str, key) for p in parts]
        return tuple(vals) if origin is tuple else vals
    if origin is dict or tp is dict:
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--{key}: expected a JSON object, got {text!r} ({e})") from None
        if not isinstance(value, dict):
            raise ConfigError(f"--{key}: expected a JSON object, got {text!r}")
        return value
    if tp is bool:
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"--{key}: expected a boolean (true/false), got {text!r}")
    if tp in (int, float, str):
        try:
            return tp(text)
        except ValueError:
            raise ConfigError(f"--{key}: expected {tp.__name__}, got {text!r}") from None
    raise ConfigError(f"--{key}: unsupported config type {tp}")


def _is_bool(tp: Any) -> bool:
    return tp is bool or (typing.get_origin(tp) in (typing.Union, types.UnionType) and bool in typing.get_args(tp))


def _resolve(key: str, table: dict[str, Any]) -> str:
    if key in table:
        return key
    matches = [k for k in table if k.rsplit(".", 1)[-1] == key]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise ConfigError(f"--{key} is ambiguous: use one of {', '.join('--' + m for m in matches)}")
    raise ConfigError(f"unknown option --{key}; valid options: {', '.join('--' + k for k in sorted(table))}")


def _replace_path(cfg: C, dotted: str, value: Any) -> C:
    head, _, rest = dotted.partition(".")
    if not rest:
        return dataclasses.replace(cfg, **{head: value})
    return dataclasses.replace(cfg, **{head: _replace_path(getattr(cfg, head), rest, value)})


def override(cfg: C, updates: dict[str, Any]) -> C:
    """A copy of `cfg` with dotted/short keys replaced by already-typed (or string) values."""
    table = _fields(cfg)
    for key, value in updates.items():
        full = _resolve(key, table)
        tp = table[full][2]
        if isinstance(value, str) and tp is not str:
            value = _parse(value, tp, full)  # also checks Literal choices
        elif isinstance(value, list) and typing.get_origin(tp) is tuple:
            value = tuple(value)
        cfg = _replace_path(cfg, full, value)
    _validate(cfg)
    return cfg


def parse_args(cfg: C, argv: Sequence[str]) -> C:
    """Apply `--key value` / `--flag` / `--no-flag` / `--config FILE.json` overrides to `cfg`."""
    argv = list(argv)
    if "--help" in argv or "-h" in argv:
        print(describe(cfg))
        raise SystemExit(0)
    table = _fields(cfg)
    i = 0
    updates: list[tuple[str, Any]] = []
    while i < len(argv):
        tok = argv[i]
        if not tok.startswith("--"):
            raise ConfigError(f"expected --key value, got {tok!r}")
        key, eq, inline = tok[2:].partition("=")
        if key == "config":
            path = inline if eq else (argv[i + 1] if i + 1 < len(argv) else "")
            cfg = load(type(cfg), path, base=cfg)
            table = _fields(cfg)
            i += 1 if eq else 2
            continue
        negated = False
        try:
            full = _resolve(key, table)
        except ConfigError:
            if key.startswith(("no-", "no_")):
                full, negated = _resolve(key[3:], table), True
            else:
                raise
        tp = table[full][2]
        if negated:
            if not _is_bool(tp):
                raise ConfigError(f"--{key}: --{full} is not a boolean")
            updates.append((full, False))
            i += 1
        elif eq:
            updates.append((full, _parse(inline, tp, full)))
            i += 1
        elif _is_bool(tp) and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
            updates.append((full, True))
            i += 1
        else:
            if i + 1 == len(argv):
                raise ConfigError(f"--{key} needs a value")
            updates.append((full, _parse(argv[i + 1], tp, full)))
            i += 2
    for full, value in updates:
        cfg = _replace_path(cfg, full, value)
    _validate(cfg)
    return cfg


def parse_cli(cfg: C, argv: Sequence[str]) -> C:
    """`parse_args` for a program's command line: an unknown option, a bad value or a config that fails its
    `validate` ends the program with one line naming the problem on stderr and exit status 2 (as argparse
    does), not a traceback."""
    try:
        return parse_args(cfg, argv)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def _validate(cfg: Any) -> None:
    for obj, _, _ in {id(o): (o, None, None) for o, _, _ in _fields(cfg).values()}.values():
        check = getattr(obj, "validate", None)
        if callable(check):
            check()
    check = getattr(cfg, "validate", None)
    if callable(check):
        check()


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(cls: type[C], data: dict[str, Any], base: C | None = None) -> C:
    """Build `cls` from a (possibly partial) nested dict, e.g. a saved config.json."""
    cfg = base if base is not None else cls()
    flat: dict[str, Any] = {}

    def walk(d: dict[str, Any], prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, dict) and dataclasses.is_dataclass(getattr(_get(cfg, prefix + k), "__class__", None)):
                walk(v, f"{prefix}{k}.")
            else:
                flat[prefix + k] = v

    walk(data, "")
    table = _fields(cfg)
    for k in flat:
        if k not in table:
            raise ConfigError(f"config key {k!r} is not a field of {cls.__name__}")
    return override(cfg, flat)


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part, None)
    return cfg


def save(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(json.dumps(to_dict(cfg), indent=2, sort_keys=True) + "\n")


def _dotted(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_dotted(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def changes(cfg: Any, path: str | Path) -> list[str]:
    """How `cfg` differs from the config saved at `path`, one 'key: saved -> now' each; [] when equal
    or when there is no readable file."""
    try:
        old = _dotted(json.loads(Path(path).read_text()))
    except (OSError, ValueError):
        return []
    new, gone = _dotted(json.loads(json.dumps(to_dict(cfg)))), "(absent)"  # tuples as the file holds them
    return [f"{k}: {old.get(k, gone)!r} -> {new.get(k, gone)!r}" for k in sorted(old.keys() | new.keys())
            if old.get(k, gone) != new.get(k, gone)]


def load(cls: type[C], path: str | Path, base: C | None = None) -> C:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config: no such file {str(path)!r}")
    return from_dict(cls, json.loads(p.read_text()), base=base)


def describe(cfg: Any) -> str:
    """Every option with its current value, for --help."""
    lines = [f"options of {type(cfg).__name__} (--key value; short keys work when unambiguous):"]
    for key, (obj, f, tp) in _fields(cfg).items():
        doc = getattr(type(obj), "__doc_fields__", {}).get(f.name, "")
        tname = getattr(tp, "__name__", str(tp).replace("typing.", ""))
        lines.append(f"  --{key} ({tname}) = {getattr(obj, f.name)!r}" + (f"  # {doc}" if doc else ""))
    return "\n".join(lines)
