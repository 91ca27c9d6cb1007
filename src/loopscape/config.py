"""Typed configuration: dataclasses, loaded from YAML or TOML, with CLI overrides.

A config is a tree of dataclasses. ``load_config(cls, files, overrides)`` reads
the files in order (a later one overrides an earlier one, setting by
setting), applies ``key.sub=value`` overrides (values parsed as YAML, so
``seeds=[0,1,2]`` and ``alpha=2.5`` work), checks every value's type, and runs
each section's ``validate()``. Any problem raises :class:`ConfigError` with
one line naming the field and what is allowed.

Presets (``loopscape reproduce --quick``, ``loopscape algorithmic --preset``)
are YAML files shipped in ``loopscape/configs/`` (:func:`preset_file`) and
go through the same loader as a user's file.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

T = TypeVar("T")
NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
PRESETS_DIR = Path(__file__).parent / "configs"


class ConfigError(ValueError):
    """A configuration value is missing, of the wrong type, or out of range."""


def require(ok: bool, field: str, allowed: str, value: Any) -> None:
    """Raise ``ConfigError`` saying ``field must be <allowed> (got <value>)`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{field} must be {allowed} (got {value!r})")


MAX_SEED = 2**63 - 1  # torch.manual_seed takes a signed 64-bit integer


def require_seeds(seeds: list[int], field: str) -> None:
    """A non-empty list of distinct seeds, each one ``torch.manual_seed`` and NumPy accept."""
    require(len(seeds) >= 1, field, "a non-empty list of integers", seeds)
    require(len(set(seeds)) == len(seeds), field, "distinct integers", seeds)
    bad = next((s for s in seeds if not 0 <= s <= MAX_SEED), None)
    require(bad is None, field, f"integers from 0 to {MAX_SEED} (2^63 - 1)", bad)


def _coerce(value: Any, tp: Any, field: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        return _coerce(value, next(a for a in args if a is not type(None)), field)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [_coerce(v, item, f"{field}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        names = ", ".join(f.name for f in dataclasses.fields(tp))
        require(
            isinstance(value, dict),
            field,
            f"a table of settings ({names}); set one with --set {field}.<setting>=<value>",
            value,
        )
        return from_dict(tp, value, prefix=f"{field}.")
    if tp is bool:
        if value in (0, 1) and not isinstance(value, bool):
            value = bool(value)  # --set flag=1 reads as YAML's integer
        require(isinstance(value, bool), field, "true or false", value)
        return value
    if tp is int:
        require(isinstance(value, int) and not isinstance(value, bool), field, "an integer", value)
        return value
    if tp is float:
        if isinstance(value, str) and NUMBER.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads 1e6 and 1e-3 (no dot) as text
        require(isinstance(value, (int, float)) and not isinstance(value, bool), field, "a number", value)
        require(math.isfinite(value), field, "a finite number", value)
        return float(value)
    if tp is str:
        require(isinstance(value, str), field, "a string", value)
        return value
    return value


def _field_default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def from_dict(cls: type[T], data: dict, prefix: str = "") -> T:
    """Build dataclass ``cls`` from a nested dict, rejecting unknown keys.

    A section given in part is read over ``cls``'s own default for that field, not over
    the section class's defaults: ``model: {init_scale: 0.5}`` in a study whose default
    model has three loops keeps the three loops (an override changes that field and nothing else).
    A class with a static ``upgrade(data) -> data`` first maps settings it renamed to their new
    names, so older run folders and command lines still read.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if hasattr(cls, "upgrade"):  # settings renamed since a run folder was written: read under their new names
        data = cls.upgrade(dict(data))
    for key in data:
        require(key in fields, f"{prefix}{key}", f"one of {sorted(fields)}", key)
    data = dict(data)
    for key, value in data.items():
        default = _field_default(fields[key])
        if isinstance(value, dict) and dataclasses.is_dataclass(default):
            data[key] = merge(dataclasses.asdict(default), value)
    kwargs = {k: _coerce(v, hints[k], f"{prefix}{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ValueError as err:  # a dataclass that checks itself on construction
        raise ConfigError(f"{prefix}{err}") from None


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def _set(data: dict, dotted: str, value: Any, cls: Any = None, overridden: Any = ()) -> None:
    """``data[a][b][c] = value`` for ``dotted`` ``a.b.c``; ``cls`` (the config's class) and ``overridden``
    (the overrides set before this one) name what is wrong when ``a`` or ``a.b`` already holds a value."""
    *parents, leaf = dotted.split(".")
    node = data
    for i, p in enumerate(parents):
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(_not_a_table(".".join(parents[: i + 1]), dotted, node, cls, overridden))
    node[leaf] = value


def _not_a_table(path: str, dotted: str, value: Any, cls: Any, overridden: Any) -> str:
    """The line for setting ``dotted`` inside ``path``, which holds ``value``, not a table of settings."""
    if cls is None or not _is_section(cls, path):
        return f"{dotted} must be a path to a setting (got {dotted!r})"
    if path not in overridden:  # the value came from a file
        return f"{path} is a section; give a setting inside it (got {value!r})"
    shown = _as_typed(value)
    return f"--set {path}={shown}: {path} is a section; give a setting inside it (e.g. {dotted}={shown})"


def _is_section(cls: Any, dotted: str) -> bool:
    """Whether ``dotted`` names a table of settings (a dataclass field) in config class ``cls``."""
    tp = cls
    for name in dotted.split("."):
        hints = typing.get_type_hints(tp) if dataclasses.is_dataclass(tp) else {}
        if name not in hints:
            return False
        tp = hints[name]
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            tp = next((a for a in typing.get_args(tp) if a is not type(None)), None)
    return dataclasses.is_dataclass(tp)


def _as_typed(value: Any) -> str:
    """``value`` as it is written after ``--set key=`` (YAML)."""
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    return str(value)


def parse_override(text: str) -> tuple[str, Any]:
    """``"train.epochs=100"`` -> ``("train.epochs", 100)``; the value is read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override must look like key.sub=value (got {text!r})")
    try:
        return key.strip(), yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or "not YAML"
        raise ConfigError(f"--set {key.strip()}: the value {raw!r} does not parse ({problem})") from None


def read_mapping(path: str | Path, what: str = "config file") -> dict:
    """A YAML or TOML file whose top level is a mapping; any problem is one :class:`ConfigError` line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {str(path)!r} does not exist or is not a file")
    if path.suffix not in (".toml", ".yaml", ".yml"):
        raise ConfigError(f"{what} must end in .yaml, .yml or .toml (got {path.name!r})")
    try:
        text = path.read_text(encoding="utf-8")
        data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{what} {str(path)!r} cannot be read ({err})") from None
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as err:
        where = getattr(err, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(f"{what} {str(path)!r} is not valid {path.suffix[1:].upper()}{at}: {problem}") from None
    if data is None:
        return {}
    require(
        isinstance(data, dict), f"{what} {str(path)!r}", "a mapping of settings at its top level", type(data).__name__
    )
    return data


def validate_tree(config: Any, prefix: str = "") -> None:
    """Call ``validate(prefix)`` on every dataclass section, depth first."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            validate_tree(value, f"{prefix}{f.name}.")
    if hasattr(config, "validate"):
        config.validate(prefix)


def machine_memory() -> int:
    """This machine's physical memory in bytes (the budget that size checks compare with)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _is_cuda(device: Any) -> bool:
    return device is not None and str(device).startswith("cuda")


def device_memory(device: Any = None) -> int:
    """Bytes of memory where tensors on ``device`` live: a CUDA device's own, else this machine's."""
    if _is_cuda(device):
        import torch  # here only: reading a config needs no torch

        return torch.cuda.get_device_properties(device).total_memory
    return machine_memory()


def require_fits(needed_bytes: float, field: str, value: Any, what: str, device: Any = None) -> None:
    """Refuse a size whose estimated memory (``what``: what is counted) exceeds this machine's, or
    that of the CUDA ``device`` where it will live."""
    have = device_memory(device)
    where = f"{device} has" if _is_cuda(device) else "this machine has"
    require(
        needed_bytes <= have,
        field,
        f"small enough to fit in memory ({what}: about {needed_bytes / 2**30:,.1f} GiB, "
        f"{where} {have / 2**30:,.1f} GiB)",
        value,
    )


def preset_file(*parts: str) -> Path:
    """A shipped preset, e.g. ``preset_file("algorithmic", "paper", "parity.yaml")``."""
    return PRESETS_DIR.joinpath(*parts)


def merge(base: dict, over: dict) -> dict:
    """``over`` on top of ``base``, section by section (nested tables merge, values replace)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(
    cls: type[T],
    files: str | Path | list[str | Path] | None = None,
    overrides: dict[str, Any] | None = None,
) -> T:
    """Files (in order, optional), then overrides, then type checks and validation."""
    if files is None:
        files = []
    elif isinstance(files, (str, Path)):
        files = [files]
    data: dict = {}
    for path in files:
        data = merge(data, read_mapping(path))
    done: list[str] = []
    for key, value in (overrides or {}).items():
        _set(data, key, value, cls, done)
        done.append(key)
    config = from_dict(cls, data)
    validate_tree(config)
    return config
