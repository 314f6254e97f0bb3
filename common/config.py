"""Configuration files: TOML into frozen dataclasses, strictly.

Every config section is a frozen dataclass whose fields carry a docstring-like ``metadata["doc"]``; the loader
refuses unknown keys, wrong types and missing required values, naming the exact key (``server.listen``). Relative
paths are resolved against the config file's folder, and so is the file of a relative ``sqlite:///`` URL
(:data:`DatabaseUrl`). Environment overrides are explicit: each config class lists
the variables it honours in ``ENV_OVERRIDES`` (variable -> dotted key); nothing else is read from the environment.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NewType, TypeVar

from common.errors import HeduiError

T = TypeVar("T")

#: A SQLAlchemy URL in a config file. A relative SQLite file (``sqlite:///data/x.db``) is resolved against the config
#: file's folder like any other path, not against the directory the program happens to be started from.
DatabaseUrl = NewType("DatabaseUrl", str)
_SQLITE_PREFIX = "sqlite:///"


def _database_url(value: str, base: Path) -> str:
    if not value.startswith(_SQLITE_PREFIX):
        return value
    file, sep, query = value[len(_SQLITE_PREFIX) :].partition("?")
    if not file or file == ":memory:" or file.startswith("/") or file.startswith("file:"):
        return value
    return f"{_SQLITE_PREFIX}{(base / file).resolve()}{sep}{query}"


class ConfigError(HeduiError):
    """A configuration file is missing, unreadable or wrong; the message names the key."""

    code = "config"


def doc(text: str, **kwargs: Any) -> Any:
    """A dataclass field with documentation (``default`` / ``default_factory`` as usual)."""
    return dataclasses.field(metadata={"doc": text}, **kwargs)


def load_file(cls: type[T], path: Path, env: Mapping[str, str] | None = None) -> T:
    """Load ``cls`` from the TOML file at ``path`` with the environment overrides ``cls.ENV_OVERRIDES``."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} does not exist") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    environ = os.environ if env is None else env
    for variable, dotted in getattr(cls, "ENV_OVERRIDES", {}).items():
        if variable in environ:
            _set_dotted(data, dotted, environ[variable])
    return build(cls, data, base=path.parent, where="")


def _set_dotted(data: dict[str, Any], dotted: str, value: str) -> None:
    *parents, last = dotted.split(".")
    node = data
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value


def build(cls: type[T], data: Any, *, base: Path, where: str) -> T:
    """Build dataclass ``cls`` from parsed TOML ``data``; ``where`` is the dotted prefix for messages."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a table")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key(s) in {where or 'config'}: {', '.join(unknown)}")
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for name, field in fields.items():
        key = f"{where}.{name}" if where else name
        if name in data:
            values[name] = _convert(hints[name], data[name], base=base, where=key)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key {key}")
    try:
        return cls(**values)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{where or 'config'}: {exc}") from exc


def _convert(hint: Any, value: Any, *, base: Path, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None or value == "":
            return None
        return _convert(options[0], value, base=base, where=where)
    if dataclasses.is_dataclass(hint):
        return build(hint, value, base=base, where=where)  # type: ignore[arg-type]
    if origin is tuple:
        (item,) = typing.get_args(hint)[:1]
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list")
        return tuple(_convert(item, v, base=base, where=f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        key_type, value_type = typing.get_args(hint)
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a table")
        return {
            _convert(key_type, k, base=base, where=where): _convert(value_type, v, base=base, where=f"{where}.{k}")
            for k, v in value.items()
        }
    if hint is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where} must be a path")
        path = Path(value)
        return path if path.is_absolute() else (base / path).resolve()
    if hint is DatabaseUrl:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a database URL (text)")
        return _database_url(value, base)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {"true", "false"}:
            return value.lower() == "true"
        raise ConfigError(f"{where} must be true or false")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ConfigError(f"{where} must be an integer")
        try:
            return int(value)
        except ValueError as exc:
            raise ConfigError(f"{where} must be an integer") from exc
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise ConfigError(f"{where} must be a number")
        try:
            return float(value)
        except ValueError as exc:
            raise ConfigError(f"{where} must be a number") from exc
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string")
        return value
    raise ConfigError(f"{where}: unsupported config type {hint!r}")


def describe(cls: type[Any], prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, documentation) for every field, for generated docs and ``--help-config``."""
    rows: list[tuple[str, str, str]] = []
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        key = f"{prefix}{field.name}"
        if dataclasses.is_dataclass(hints[field.name]):
            rows.extend(describe(hints[field.name], key + "."))
            continue
        item = typing.get_args(hints[field.name])[:1]
        if typing.get_origin(hints[field.name]) is tuple and item and dataclasses.is_dataclass(item[0]):
            rows.append((f"[[{key}]]", "none", field.metadata.get("doc", "")))
            rows.extend(describe(item[0], f"{key}[]."))  # type: ignore[arg-type]
            continue
        if field.default is not dataclasses.MISSING:
            default = repr(field.default)
        elif field.default_factory is not dataclasses.MISSING:
            default = repr(field.default_factory())
        else:
            default = "(required)"
        rows.append((key, default, field.metadata.get("doc", "")))
    return rows
