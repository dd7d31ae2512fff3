"""Typed configs: YAML files loaded into dataclasses, with dotted ``key=value`` overrides.

Every command of the toolkit describes its options as a (nested) dataclass. ``load_config``
reads a YAML file with ``yaml.safe_load``, applies overrides such as ``train.lr=0.03`` and
checks every key and type. An unknown key or a value of the wrong type raises
:class:`ConfigError` naming the key (and the file), so a typo never passes silently.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence, TypeVar, Union, get_args, get_origin

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not match the typed config."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it converted where lossless."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{key}: {value!r} is not a valid {_type_name(tp)}")
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {list(choices)}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping for section {tp.__name__}, got {value!r}")
        return _build(tp, value, prefix=f"{key}.")
    if origin in (list, Sequence) or tp is list:
        (item_tp,) = get_args(tp) or (Any,)
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        args = get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict or tp is dict:
        args = get_args(tp) or (str, Any)
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {_coerce(k, args[0], key): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def _build(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        known = ", ".join(prefix + k for k in sorted(fields))
        raise ConfigError(f"unknown key {prefix}{unknown[0]!s}; known keys here: {known}")
    kwargs = {name: _coerce(value, hints[name], prefix + name) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field without a value
        raise ConfigError(f"{prefix or cls.__name__}: {exc}") from None


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``key.sub=value``; the value is parsed as YAML (``3`` int, ``[1,2]`` list, ``null``)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value (e.g. train.lr=0.03)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def to_dict(cfg: Any) -> dict:
    """Plain nested dict of a config dataclass (for JSON/YAML dumps and hashing)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def leaf_keys(cls: type) -> list[str]:
    """Dotted names of every leaf key of the config dataclass ``cls`` (e.g. ``patch.patch_size``)."""
    hints = typing.get_type_hints(cls)
    keys: list[str] = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if dataclasses.is_dataclass(hints[f.name]):
            keys += [f"{f.name}.{k}" for k in leaf_keys(hints[f.name])]
        else:
            keys.append(f.name)
    return keys


def with_overrides(cfg: T, overrides: Mapping[str, Any]) -> T:
    """A copy of the config ``cfg`` with dotted ``overrides`` (parsed values, e.g. from
    :func:`parse_override`) applied and checked like a config file: an unknown key or a wrong type
    raises :class:`ConfigError` naming the key."""
    tree = to_dict(cfg)
    for key, value in overrides.items():
        _set_dotted(tree, key, value)
    return _build(type(cfg), tree)


def load_config(
    cls: type[T],
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
    defaults: Mapping[str, Any] | None = None,
) -> T:
    """Build ``cls`` from dataclass defaults <- ``defaults`` <- YAML file <- dotted overrides."""
    tree: dict = {}
    if defaults:
        for key, value in defaults.items():
            _set_dotted(tree, key, value)
    source = "overrides"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; pass an existing YAML file to --config")
        with open(path) as fh:
            try:
                data = yaml.safe_load(fh) or {}
            except yaml.YAMLError as exc:
                raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys")
        _merge(tree, data)
        source = str(path)
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    try:
        return _build(cls, tree)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def _merge(dst: dict, src: Mapping) -> None:
    for key, value in src.items():
        if isinstance(value, Mapping) and isinstance(dst.get(key), dict):
            _merge(dst[key], value)
        else:
            dst[key] = dict(value) if isinstance(value, Mapping) else value


def add_config_arguments(parser: argparse.ArgumentParser, *, example: str) -> None:
    """``--config FILE``, trailing ``key=value`` overrides and ``--print-config``.

    ``example`` is shown in the help of the overrides: a real ``key=value`` of this command's config
    (``tests/test_docs_examples.py`` checks that it loads).
    """
    parser.add_argument("--config", "-c", default=None, help="YAML config file")
    parser.add_argument(
        "overrides", nargs="*", default=[], metavar="key=value",
        help=f"dotted overrides applied after the config file, e.g. {example}",
    )
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config as YAML and exit (nothing is run)")


def config_from_args(
    cls: type[T], args: argparse.Namespace, flag_map: Mapping[str, str] | None = None
) -> T:
    """Load ``cls`` from ``args.config`` and ``args.overrides``; flags in ``flag_map``
    (argparse dest -> dotted key) that were given on the command line win over both."""
    flags = {}
    for dest, dotted in (flag_map or {}).items():
        value = getattr(args, dest, None)
        if value is not None:
            flags[dotted] = value
    cfg_overrides = list(args.overrides) + [f"{k}={json.dumps(v)}" for k, v in flags.items()]
    return load_config(cls, args.config, cfg_overrides)


def print_config(cfg: Any) -> None:
    """Print the resolved config ``cfg`` as YAML (what ``--print-config`` shows)."""
    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)  # libyaml when present: the same text, faster
    print(yaml.dump(to_dict(cfg), Dumper=dumper, sort_keys=False), end="")
