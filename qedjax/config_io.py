"""Frozen config dataclasses from and to plain mappings: strict building, dicts, a stable hash.

The bottom of the config layering: it imports nothing from qedjax, so every module that reads or
ships a config section (the run config in config.py, rollout workers rebuilding the grpo section)
can use it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from typing import Any, Mapping, Sequence


def _check_type(value: Any, tp: Any, key: str) -> Any:
    """Converts YAML values to the field's type, or raises naming the key."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(value, arg, key)
            except (TypeError, ValueError) as e:
                errors.append(str(e))
        raise TypeError(errors[0] if len(errors) == 1 else f"config key {key}: {value!r} fits none of {tp}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise TypeError(f"config key {key}: expected a mapping, got {type(value).__name__}")
        return build(tp, value, f"{key}.")
    if origin in (tuple, Sequence, list) or tp in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"config key {key}: expected a list, got {type(value).__name__} {value!r}")
        args = typing.get_args(tp)
        inner = args[0] if args else Any
        return tuple(_check_type(v, inner, f"{key}[{i}]") for i, v in enumerate(value))
    if origin in (dict, Mapping) or tp in (dict,):
        if not isinstance(value, Mapping):
            raise TypeError(f"config key {key}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise TypeError(f"config key {key}: expected true/false, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"config key {key}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"config key {key}: expected an integer, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise TypeError(f"config key {key}: expected a string, got {value!r}")
        return value
    return value


def build(cls, data: Mapping[str, Any], where: str = ""):
    """A frozen dataclass from a mapping; unknown keys and wrong types raise naming the key."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown config key(s) {[f'{where}{k}' for k in unknown]}; "
                         f"known under {where.rstrip('.') or 'the top level'}: {sorted(names)}")
    kwargs = {k: _check_type(v, hints[k], f"{where}{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"config {where.rstrip('.') or 'top level'}: {e}") from None


def to_dict(cfg: Any) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def config_hash(cfg: Any) -> str:
    return hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True).encode()).hexdigest()[:16]
