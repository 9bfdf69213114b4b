"""YAML run configurations with command-line overrides, checked against a defaults file.

A run's configuration is three layers, later ones winning:

1. the defaults file (e.g. ``examples/configs/defaults.yaml``): every key that exists, with its
   default value and a comment saying what it does; it is also the schema;
2. a config file (e.g. ``examples/configs/demo.yaml``) that sets some of those keys;
3. overrides ``section.key=value`` from the command line, the value parsed as YAML
   (``optim.lr=3e-4``, ``train.stop_at=null``, ``data.scale=[0.3,1.0]``).

A key that is not in the defaults is an error naming the closest known key, so a typo never
silently does nothing. Values must have the default's type (an int where a float is expected is
fine; ``null`` is allowed everywhere and means "off" / "automatic"; a key whose default is
``auto`` also takes ``true`` / ``false``). A mapping whose default is empty (``{}``) is open: any
keys go (e.g. extra keyword arguments for timm).
"""

from __future__ import annotations

import copy
import difflib
import os
from collections.abc import Iterable, Mapping

import yaml


class ConfigError(ValueError):
    """A configuration file or override that does not fit the defaults (message says which key)."""


class Config(dict):
    """A nested dict whose keys also read as attributes: ``cfg.optim.lr`` is ``cfg["optim"]["lr"]``."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"config has no key {name!r} (keys: {', '.join(self)})") from None

    def __setattr__(self, name, value):
        self[name] = value

    def __deepcopy__(self, memo):
        return Config({k: copy.deepcopy(v, memo) for k, v in self.items()})

    def to_dict(self) -> dict:
        """Plain nested dicts (for YAML, checkpoints)."""
        return {k: v.to_dict() if isinstance(v, Config) else copy.deepcopy(v) for k, v in self.items()}

    def get_path(self, dotted: str):
        node = self
        for part in dotted.split("."):
            node = node[part]
        return node


def _wrap(value):
    if isinstance(value, Mapping):
        return Config({k: _wrap(v) for k, v in value.items()})
    return value


def read_yaml(path) -> dict:
    """A YAML mapping from ``path`` (an empty file is {})."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path} does not exist")
    with open(path) as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, got {type(data).__name__}")
    return data


def _type_name(value) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list"}.get(
        type(value), type(value).__name__
    )


def _coerce(key: str, value, default):
    """``value`` checked against the type of ``default``; returns the value to store."""
    if value is None or default is None:
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif isinstance(default, str):
        if isinstance(value, str) or (default == "auto" and isinstance(value, bool)):
            return value
    elif isinstance(default, list):
        if isinstance(value, (list, tuple)):
            return list(value)
    elif isinstance(default, dict):
        if isinstance(value, dict):
            return value
    else:
        return value
    raise ConfigError(f"{key} must be {_type_name(default)} (like its default {default!r}), got {value!r}")


def _suggest(key: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _flat_keys(tree: Mapping, prefix: str = "") -> list[str]:
    out = []
    for k, v in tree.items():
        name = f"{prefix}{k}"
        out.append(name)
        if isinstance(v, Mapping) and v:
            out += _flat_keys(v, name + ".")
    return out


def _merge(base: dict, update: Mapping, schema: Mapping, where: str, all_keys: list[str]) -> None:
    for k, v in update.items():
        key = f"{where}{k}"
        if not isinstance(k, str):
            raise ConfigError(f"config keys must be strings, got {k!r} in {where.rstrip('.') or 'the top level'}")
        if k not in schema:
            raise ConfigError(f"unknown config key {key!r}{_suggest(key, all_keys)}")
        default = schema[k]
        if isinstance(default, Mapping) and default:  # a section: merge key by key
            if not isinstance(v, Mapping):
                raise ConfigError(f"{key} is a section; give it a mapping of keys, got {v!r}")
            _merge(base[k], v, default, key + ".", all_keys)
        else:
            base[k] = _coerce(key, copy.deepcopy(v), default)


def parse_override(text: str) -> tuple[str, object]:
    """``"optim.lr=3e-4"`` -> ``("optim.lr", 0.0003)``; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"an override looks like section.key=value, got {text!r}")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"an override looks like section.key=value, got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"the value of {key} in {text!r} is not valid YAML: {e}") from None
    return key, value


def _nest(key: str, value) -> dict:
    out: dict = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def load_config(path=None, overrides: Iterable[str] = (), *, defaults) -> Config:
    """The resolved configuration: ``defaults`` (a mapping or a YAML path), then ``path``, then ``overrides``."""
    schema = read_yaml(defaults) if not isinstance(defaults, Mapping) else copy.deepcopy(dict(defaults))
    all_keys = _flat_keys(schema)
    cfg = copy.deepcopy(schema)
    if path is not None:
        try:
            _merge(cfg, read_yaml(path), schema, "", all_keys)
        except ConfigError as e:
            raise ConfigError(f"{os.fspath(path)}: {e}") from None
    for text in overrides:
        key, value = parse_override(text)
        _merge(cfg, _nest(key, value), schema, "", all_keys)
    return _wrap(cfg)


def save_config(cfg: Mapping, path) -> None:
    """Write the resolved configuration as YAML (keys in their defaults' order)."""
    data = cfg.to_dict() if isinstance(cfg, Config) else dict(cfg)
    tmp = f"{os.fspath(path)}.tmp"
    with open(tmp, "w") as f:
        yaml.safe_dump(data, f, sort_keys=False, default_flow_style=None)
    os.replace(tmp, path)
