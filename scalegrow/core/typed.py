"""YAML into typed values: a mapping read from a file, and each value checked against its type hint.
Model configs (`--target`) and run configs (`configs/runs/*.yaml`) both read through here, so every
bad value is an `InputError` naming its file and key."""
from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

import yaml

from scalegrow.errors import InputError


def coerce(hint: Any, value: Any, where: str) -> Any:
    """Check (and normalise) a YAML value against a type hint; errors name the key.

    `None` passes (validation decides whether it may); PyYAML reads `1e-3` (no dot) as a string, so
    numeric strings are accepted as floats.
    """
    if hint is Any or value is None:
        return value
    choices = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    for target in choices[:-1]:  # a union: the first of its types that takes the value
        try:
            return _coerce_one(target, value, where)
        except InputError:
            pass
    return _coerce_one(choices[-1], value, where)


def _coerce_one(target: Any, value: Any, where: str) -> Any:
    if target is bool:
        if isinstance(value, bool):
            return value
    elif target is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif target is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif target is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif target in (dict, list):
        if isinstance(value, target):
            return value
    raise InputError(f"{where}: expected {getattr(target, '__name__', target)}, got {value!r}")


def load_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """Read a YAML file that must hold a mapping; every failure is an `InputError` naming the file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise InputError(f"{path}: cannot read YAML file ({exc.strerror})") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise InputError(f"{path}: malformed YAML{where}: {getattr(exc, 'problem', exc)}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a mapping of Megatron argument names, got "
                         f"{type(data).__name__}")
    return data
