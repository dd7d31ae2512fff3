"""Typed configs: YAML files loaded into dataclasses, with dotted ``key=value`` overrides.

Every command of the toolkit describes its options as a (nested) dataclass. ``load_config``
reads a YAML file with ``yaml.safe_load``, applies overrides such as ``optim.lr=0.03`` and
checks every key, type and value. An unknown key, a value of the wrong type or out of its range
raises :class:`ConfigError` naming the key and where it came from (the file or the command line),
so a typo never passes silently and a bad value is refused before any work starts.

Ranges are declared on the dataclass field: ``lr: float = bounded(0.03, gt=0)`` (see
:func:`bounded`); a section's rules that tie several of its keys together go in a ``validate()``
method raising :class:`ConfigError` whose message starts with the key (relative to the section).
Numbers in scientific notation (``1e-3``, which YAML 1.1 reads as a string) are accepted for
float keys, and for integer keys when whole (``1e3``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence, TypeVar, Union, get_args, get_origin

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not match the typed config; ``key`` is the dotted key it
    names, when there is one (used to tell whether the file or the command line set it)."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


RANGE = "sgcl.range"  # dataclasses.field metadata key of a Range


@dataclasses.dataclass(frozen=True)
class Range:
    """Allowed interval of a numeric config value (each bound optional, open or closed)."""

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None

    def __contains__(self, value: float) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        return ((self.gt is None or value > self.gt) and (self.ge is None or value >= self.ge)
                and (self.lt is None or value < self.lt) and (self.le is None or value <= self.le))

    def __str__(self) -> str:
        lo = (f"({self.gt:g}" if self.gt is not None else f"[{self.ge:g}" if self.ge is not None else None)
        hi = (f"{self.lt:g})" if self.lt is not None else f"{self.le:g}]" if self.le is not None else None)
        if lo and hi:
            return f"in {lo}, {hi}"
        if lo:
            return ("> " if lo[0] == "(" else ">= ") + lo[1:]
        if hi:
            return ("< " if hi[-1] == ")" else "<= ") + hi[:-1]
        return "any number"


def bounded(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING,
            gt: float | None = None, ge: float | None = None, lt: float | None = None,
            le: float | None = None) -> Any:
    """A dataclass field whose value must lie in the given range, checked when a config is loaded:
    ``lr: float = bounded(0.03, gt=0)``, ``p: float = bounded(0.5, ge=0, le=1)``. For a list or tuple
    the range applies to each item; ``None`` (an optional key left unset) always passes; NaN and
    infinities never do."""
    return dataclasses.field(default=default, default_factory=default_factory,
                             metadata={RANGE: Range(gt, ge, lt, le)})


def arg_in_range(tp: type, *, gt: float | None = None, ge: float | None = None, lt: float | None = None,
                 le: float | None = None):
    """An argparse ``type=`` for a plain flag (one that is not a config key) with the same range check and
    message as :func:`bounded`: ``p.add_argument("--window", type=arg_in_range(int, ge=1))``; an out-of-range
    value is an argparse error (exit 2) naming the flag."""
    allowed = Range(gt, ge, lt, le)

    def parse(text: str):
        try:
            value = tp(float(text)) if tp is int and _number_text(text) is not None else tp(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if tp is int else 'a number'}, got {text!r}") from None
        if tp is int and _number_text(text) is not None and float(text) != value:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}")
        if value not in allowed:
            raise argparse.ArgumentTypeError(f"{value:g} is out of range; allowed: {allowed}")
        return value

    parse.__name__ = tp.__name__  # argparse names the type in its messages
    return parse


def field_range(f: dataclasses.Field) -> Range | None:
    """The :class:`Range` declared with :func:`bounded` on the dataclass field ``f``, if any."""
    return f.metadata.get(RANGE)


def check_values(cfg: Any) -> None:
    """Check the ranges of ``cfg``'s own fields (not of nested sections) and run its ``validate()``;
    raises :class:`ConfigError` with the key relative to ``cfg``, e.g. ``lr: -1.0 is out of range; allowed: > 0``."""
    for f in dataclasses.fields(cfg):
        allowed = field_range(f)
        value = getattr(cfg, f.name)
        if allowed is None or value is None:
            continue
        seq = isinstance(value, (list, tuple))
        for i, item in enumerate(value if seq else [value]):
            key = f"{f.name}[{i}]" if seq else f.name
            if item is None:
                continue
            if not isinstance(item, (int, float)) or isinstance(item, bool):
                raise ConfigError(f"{key}: expected a number, got {item!r}", key=key)
            if item not in allowed:
                raise ConfigError(f"{key}: {item!r} is out of range; allowed: {allowed}", key=key)
    validate = getattr(cfg, "validate", None)
    if callable(validate):
        validate()


def validate_config(cfg: Any, prefix: str = "") -> None:
    """Check every value of the config ``cfg`` and of its nested sections (ranges and ``validate()``
    rules); raises :class:`ConfigError` naming the dotted key. ``load_config`` does this already;
    use it for a config built in code."""
    try:
        check_values(cfg)
    except ConfigError as exc:
        raise _prefixed(exc, prefix) from None
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            validate_config(value, f"{prefix}{f.name}.")


def _prefixed(exc: ConfigError, prefix: str) -> ConfigError:
    if not prefix:
        return exc
    return ConfigError(prefix + str(exc), key=prefix + exc.key if exc.key else prefix.rstrip("."))


# a number in scientific notation without a dot or without a signed exponent (YAML 1.1 reads it as a string)
_SCI_NUMBER = re.compile(r"[-+]?(\d[\d_]*\.?[\d_]*|\.\d[\d_]*)[eE][-+]?\d+")


def _number_text(value: Any) -> float | None:
    """``value`` as a float when it is a string in scientific notation (``1e-3``), else None."""
    if isinstance(value, str) and _SCI_NUMBER.fullmatch(value.strip()):
        return float(value.strip().replace("_", ""))
    return None


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
        raise ConfigError(f"{key}: {value!r} is not a valid {_type_name(tp)}", key=key)
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {list(choices)}", key=key)
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping for section {tp.__name__}, got {value!r}", key=key)
        return _build(tp, value, prefix=f"{key}.")
    if origin in (list, Sequence) or tp is list:
        (item_tp,) = get_args(tp) or (Any,)
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}", key=key)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        args = get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}", key=key)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}", key=key)
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict or tp is dict:
        args = get_args(tp) or (str, Any)
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}", key=key)
        return {_coerce(k, args[0], key): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}", key=key)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        number = _number_text(value)
        if number is not None and number.is_integer():
            return int(number)
        raise ConfigError(f"{key}: expected an integer, got {value!r}", key=key)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        number = _number_text(value)
        if number is not None:
            return number
        raise ConfigError(f"{key}: expected a number, got {value!r}", key=key)
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}", key=key)
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}", key=key)


def _build(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        known = ", ".join(prefix + k for k in sorted(fields))
        raise ConfigError(f"unknown key {prefix}{unknown[0]!s}; known keys here: {known}", key=prefix + str(unknown[0]))
    kwargs = {name: _coerce(value, hints[name], prefix + name) for name, value in data.items()}
    try:
        cfg = cls(**kwargs)
        check_values(cfg)  # the ranges of this section's keys and its validate() rules
    except TypeError as exc:  # a required field without a value
        raise ConfigError(f"{prefix or cls.__name__}: {exc}", key=prefix.rstrip(".") or None) from None
    except ConfigError as exc:  # raised with the key relative to this section
        raise _prefixed(exc, prefix) from None
    return cfg


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
        raise ConfigError(f"override {text!r} must look like key=value (e.g. optim.lr=0.03 for sgcl pretrain; `sgcl CMD --print-config` lists the keys)")
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
    """Build ``cls`` from dataclass defaults <- ``defaults`` <- YAML file <- dotted overrides, checking every
    key, type and range. An error starts with its source: the file's path, or ``command line`` when the key
    it names was set by an override (flags mapped by :func:`config_from_args` are overrides too)."""
    tree: dict = {}
    if defaults:
        for key, value in defaults.items():
            _set_dotted(tree, key, value)
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
    given: list[str] = []  # dotted keys set on the command line
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
        given.append(key)
    try:
        return _build(cls, tree)
    except ConfigError as exc:
        from_file = path is not None and not (exc.key and any(_same_branch(exc.key, k) for k in given))
        raise ConfigError(f"{path if from_file else 'command line'}: {exc}", key=exc.key) from None


def _same_branch(key: str, given: str) -> bool:
    """``key`` (``a.b[2]``) is ``given`` (``a.b``), inside it, or a section containing it."""
    key = re.sub(r"\[\d+\]", "", key)
    return key == given or key.startswith(given + ".") or given.startswith(key + ".")


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
