"""Typed configs: dataclass defaults <- YAML file <- ``key=value`` overrides.

Every pipeline describes its options as (nested) dataclasses. Each field documents itself through
``field(metadata={"help": ...})`` (see :func:`option`), which ``--help`` prints. Loading merges three
layers with OmegaConf (so YAML and the CLI share one grammar, e.g. ``s2=[a,b]``), rejects unknown keys
with the list of valid ones, checks types, and finally builds the dataclass so its ``__post_init__``
validation runs.

Example:
    >>> cfg = load_config(PretrainConfig, ["--config", "configs/pretrain/default.yaml", "loss.gamma=0.5"])
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import sys
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


class ConfigError(ValueError):
    """A config key, value or file is invalid; the message names it and what was expected."""


def option(default: Any = dataclasses.MISSING, help: str = "", replaces: tuple[str, ...] = (), **kw: Any) -> Any:
    """A dataclass field with a help text (mutable defaults are wrapped in a factory).

    ``replaces``: sibling keys this one is an alternative to. Set on the command line, it drops them
    from the config file, unless the command line sets them too (``train_set=`` in place of the default
    config's ``dataset``; both on the command line still reach ``__post_init__``'s check).
    """
    meta = {"help": help, "replaces": tuple(replaces)}
    if isinstance(default, list | dict) or dataclasses.is_dataclass(default):
        value = default
        return dataclasses.field(
            default_factory=lambda: _copy(value), metadata=meta, **kw
        )
    if default is dataclasses.MISSING:
        return dataclasses.field(metadata=meta, **kw)
    return dataclasses.field(default=default, metadata=meta, **kw)


def _copy(value: Any) -> Any:
    import copy

    return copy.deepcopy(value)


def nested(cls: type) -> Any:
    """A nested dataclass section with its defaults."""
    return dataclasses.field(default_factory=cls, metadata={"help": (cls.__doc__ or "").strip()})


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _is_list_type(tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin in (list, Sequence):
        return True
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return any(_is_list_type(a) for a in typing.get_args(tp) if a is not type(None))
    return False


def flat_keys(cls: type, prefix: str = "") -> dict[str, tuple[Any, str, Any]]:
    """All dotted keys of a config class: key -> (type, help, default)."""
    out: dict[str, tuple[Any, str, Any]] = {}
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        tp = hints[f.name]
        if _is_dataclass_type(tp):
            out.update(flat_keys(tp, key + "."))
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = "<required>"
        out[key] = (tp, f.metadata.get("help", ""), default)
    return out


def _type_name(tp: Any) -> str:
    s = str(tp).replace("typing.", "")
    return getattr(tp, "__name__", s) if isinstance(tp, type) else s


def help_text(cls: type, title: str = "", defaults: dict[str, Any] | None = None, source: str = "") -> str:
    """Every key with its type, default and meaning, for ``--help``.

    Args:
        defaults: the config a run would get without overrides (``to_dict`` of it), when a YAML file
            (``source``) sets some keys: those are shown rather than the dataclass defaults.
    """
    lines = [title, "", "usage: [--config PATH] [key=value ...]   (lists: key=[a,b])", ""]
    if source:
        lines[-1:-1] = [f"defaults below: the dataclass defaults <- {source}"]
    for key, (tp, doc, default) in flat_keys(cls).items():
        if defaults is not None:
            node: Any = defaults
            for part in key.split("."):
                node = node[part]
            default = node
        lines.append(f"  {key} ({_type_name(tp)}, default {default!r})")
        if doc:
            lines.append(f"      {doc}")
    return "\n".join(lines)


def _check_keys(cls: type, data: dict[str, Any], source: str, prefix: str = "") -> None:
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k, v in data.items():
        if k not in names:
            raise ConfigError(f"unknown config key '{prefix}{k}' in {source}; {unknown_key_hint(cls, k, prefix)}")
        if isinstance(v, dict) and not _is_dataclass_type(hints[k]) and typing.get_origin(hints[k]) is not dict:
            sub = next(iter(v), "")
            raise ConfigError(
                f"unknown config key '{prefix}{k}.{sub}' in {source}: '{prefix}{k}' is a single value "
                f"({_type_name(hints[k])}), not a section; set it as {prefix}{k}=VALUE"
            )
        if _is_dataclass_type(hints[k]):
            if not isinstance(v, dict):
                raise ConfigError(
                    f"config key '{prefix}{k}' in {source} is a section; expected a mapping of "
                    f"its keys, got {v!r}"
                )
            _check_keys(hints[k], v, source, prefix + k + ".")


def unknown_key_hint(cls: type, key: Any, prefix: str = "", help_hint: str = "--help lists every key") -> str:
    """What to say of a key of ``cls`` (dotted, below ``prefix``) that is not one: the closest valid
    keys of the deepest section it names, else that section's keys when few, else ``help_hint``."""
    parts = str(key).split(".")  # YAML 1.1 reads a key `on:` as True
    while len(parts) > 1 and _is_dataclass_type(_hints(cls).get(parts[0])):
        cls, prefix = _hints(cls)[parts[0]], prefix + parts[0] + "."
        parts = parts[1:]
    keys = sorted(flat_keys(cls, prefix))
    # a misspelt section ('trian') is compared with the sections, a misspelt leaf with the keys
    names = sorted({k[len(prefix):].split(".")[0] for k in keys})
    close = difflib.get_close_matches(parts[0], names, n=3, cutoff=0.6)
    if close:
        return "did you mean " + " or ".join(f"'{prefix}{c}'" for c in close) + f"? ({help_hint})"
    if len(keys) <= 12:
        return "valid keys: " + ", ".join(keys)
    return help_hint


def _parse_overrides(cls: type, overrides: Sequence[str]) -> dict[str, Any]:
    keys = flat_keys(cls)
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"bad argument {item!r}: expected key=value (see --help)")
        key, raw = item.split("=", 1)
        key = key.strip().lstrip("+")
        if key not in keys:
            # Let _check_keys produce the message with the valid key list.
            _place(tree, key, raw, keys)
            continue
        tp = keys[key][0]
        quoted = len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\""
        if raw.strip() == "":
            value = _empty_value(key, tp)
        elif tp is str and not quoted:
            # names, paths and URIs stay as typed: YAML reads 27997_00000 (a Tune trial id) as the
            # integer 2799700000, and 1e3 or 0x1f as numbers
            value: Any = raw
        else:
            try:
                value = yaml.safe_load(raw) if raw != "" else ""
            except yaml.YAMLError as e:
                raise ConfigError(f"{key}={raw}: not a valid value ({getattr(e, 'problem', e)}); "
                                  "lists are written key=[a,b]") from None
            if raw.strip().lower() in ("null", "none", "~"):
                value = None
        value = _bare_as_list(tp, value)
        if isinstance(value, list):
            value = [str(v) if not isinstance(v, int | float | bool) else v for v in value]
        _place(tree, key, value, keys)
    return tree


def _place(tree: dict[str, Any], key: str, value: Any, keys: dict[str, Any]) -> None:
    """Put ``value`` at dotted ``key`` in the override tree, refusing (as :func:`_check_keys` would) a
    key below a single-valued key, in either order (``data=x data.shards=y``, ``data.shards=y data=x``)."""
    node = tree
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        parent = ".".join(parts[:i + 1])
        if not isinstance(node.get(part, {}), dict):
            if parent in keys:
                _below_single_value(key, parent, keys)
            if any(k.startswith(parent + ".") for k in keys):
                raise ConfigError(f"config key '{parent}' in command line is a section; expected a mapping of "
                                  f"its keys, got {node[part]!r}")
            node[part] = {}  # an unknown key either way: _check_keys names it
        node = node.setdefault(part, {})
    if isinstance(node.get(parts[-1]), dict) and node[parts[-1]] and not isinstance(value, dict) \
            and key in keys:  # an earlier override put entries below this single value
        _below_single_value(f"{key}.{next(iter(node[parts[-1]]))}", key, keys)
    node[parts[-1]] = value


def _below_single_value(key: str, parent: str, keys: dict[str, Any]) -> None:
    raise ConfigError(f"unknown config key '{key}' in command line: '{parent}' is a single value "
                      f"({_type_name(keys[parent][0])}), not a section; set it as {parent}=VALUE")


def _empty_value(key: str, tp: Any) -> Any:
    """What ``key=`` (nothing after the ``=``) means: an empty string, list or mapping; other types
    have no empty value, so the override is refused rather than read as the string ''."""
    if tp is str:
        return ""
    if _is_list_type(tp):
        return []
    if typing.get_origin(tp) is dict:
        return {}
    raise ConfigError(f"{key}= gives no value: expected {_type_name(tp)}, e.g. {key}={_example_value(tp)}")


def _example_value(tp: Any) -> str:
    """An example value of a scalar type, for error messages."""
    return {bool: "true", int: "1", float: "0.5"}.get(tp, "null")


def _bare_as_list(tp: Any, value: Any) -> Any:
    """A bare value under a list-typed key is a one-item list (``s2_band_order=eurosat`` is ``[eurosat]``)."""
    if _is_list_type(tp) and value is not None and not isinstance(value, list):
        return [value]
    return value


def _bare_values_as_lists(keys: dict[str, tuple[Any, str, Any]], data: dict[str, Any],
                          prefix: str = "") -> dict[str, Any]:
    """YAML ``data`` with :func:`_bare_as_list` applied under each key of ``keys`` (:func:`flat_keys`),
    as on the command line."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = prefix + str(k)
        if isinstance(v, dict) and key not in keys:
            out[k] = _bare_values_as_lists(keys, v, key + ".")
        else:
            out[k] = _bare_as_list(keys[key][0], v) if key in keys else v
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file (local path or URI) into a dict."""
    from deo.io.storage import read_text

    try:
        text = read_text(str(path))
    except FileNotFoundError as e:
        raise ConfigError(f"config file {path} not found") from e
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"config file {path} is not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping of keys, got {type(data).__name__}")
    return data


def build_config(
    cls: type[T],
    yaml_data: dict[str, Any] | None = None,
    overrides: Sequence[str] = (),
    source: str = "YAML",
) -> T:
    """Merge defaults <- yaml_data <- overrides and return a validated ``cls`` instance.

    Raises:
        ConfigError: unknown key, wrong type, or a value rejected by ``__post_init__``.
    """
    base = OmegaConf.structured(cls)
    keys = flat_keys(cls)
    cli_keys = [k for k in (o.split("=", 1)[0].strip().lstrip("+") for o in overrides if "=" in o) if k in keys]
    layers = []
    if yaml_data:
        _check_keys(cls, yaml_data, source)
        yaml_data = _without_replaced(cls, yaml_data, cli_keys)
        layers.append(OmegaConf.create(_bare_values_as_lists(keys, yaml_data)))
    cli = _parse_overrides(cls, overrides)
    if cli:
        _check_keys(cls, cli, "command line")
        layers.append(OmegaConf.create(cli))
    # a mapping given whole on the command line replaces the YAML's (OmegaConf would merge the two, so
    # worker_resources= could not clear {deo_train: 1}); key.entry=v still edits one entry
    whole = [k for k in cli_keys if typing.get_origin(keys[k][0]) is dict]
    try:
        merged = OmegaConf.merge(base, *layers)
        for key in whole:
            node: Any = cli
            for part in key.split("."):
                node = node[part]
            OmegaConf.update(merged, key, node, merge=False)
        obj = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or ""
        # OmegaConf appends its own object model (full_key, reference_type, ...) to the message
        msg = str(getattr(e, "msg", e)).splitlines()[0]
        tp = keys.get(key)
        expected = f" (expected {_type_name(tp[0])})" if tp else ""
        raise ConfigError(f"config key '{key}': {msg}{expected}") from None
    except (TypeError, ValueError) as e:  # raised from a __post_init__
        raise ConfigError(str(e)) from e
    return obj  # type: ignore[return-value]


def _without_replaced(cls: type, data: dict[str, Any], cli_keys: Sequence[str]) -> dict[str, Any]:
    """``data`` (a config file's keys) less those that a command-line key replaces (``option(replaces=...)``)
    and the command line does not set itself."""
    drop = []
    for key in cli_keys:
        section, _, name = key.rpartition(".")
        owner = cls
        for part in section.split(".") if section else ():
            owner = _hints(owner)[part]
        field = next(f for f in dataclasses.fields(owner) if f.name == name)
        drop += [o for o in (f"{section}.{r}" if section else r for r in field.metadata.get("replaces", ()))
                 if o not in cli_keys]
    if not drop:
        return data
    data = _copy(data)
    for key in drop:
        *parents, name = key.split(".")
        node: Any = data
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(name, None)
    return data


def load_config(cls: type[T], argv: Sequence[str], default_config: str | Path | None = None,
                title: str = "") -> T:
    """Parse ``[--config PATH] [key=value ...]`` (or ``--help``) into a validated ``cls``.

    Args:
        cls: the config dataclass.
        argv: command-line arguments without the program name.
        default_config: YAML used when ``--config`` is not given (None: dataclass defaults only).
        title: first line of ``--help``.
    """
    args = list(argv)
    path: str | Path | None = default_config
    if "--config" in args:
        i = args.index("--config")
        if i + 1 >= len(args):
            raise ConfigError("--config needs a path")
        path = args[i + 1]
        del args[i : i + 2]
    for a in args:
        if a.startswith("--config="):
            path = a.split("=", 1)[1]
            args.remove(a)
            break
    if "-h" in args or "--help" in args:
        _print_help(cls, title, path)
        raise SystemExit(0)
    data = read_yaml(path) if path else None
    return build_config(cls, data, args, source=str(path))


def _print_help(cls: type, title: str, path: str | Path | None) -> None:
    """``--help``: the keys with the defaults a run would get from ``path``; when that file cannot be
    used, the dataclass defaults, and on stderr why the file was left out (help is what a user reaches for
    to fix it)."""
    defaults = None
    if path:
        try:
            data = read_yaml(path)
            defaults = to_dict(build_config(cls, data, source=str(path))) if data else None
        except ConfigError as e:
            print(f"note: {path} was left out of the defaults below: {e}", file=sys.stderr)
    print(help_text(cls, title, defaults, str(path) if defaults is not None else ""))


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config dataclass as a plain nested dict."""
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Any) -> str:
    """The resolved config as YAML, loadable again with ``--config``."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def config_changes(saved_yaml: str, cfg: Any) -> list[str]:
    """``key: old -> new`` for every dotted key where ``cfg`` differs from a saved config's YAML text.

    The saved config is resolved as ``cfg``'s class reads it first, so a value an older version wrote in
    another form (``s2_band_order: eurosat`` for ``[eurosat]``) is no change; a file that no longer
    resolves is compared as written.
    """
    saved = yaml.safe_load(saved_yaml) or {}
    try:
        saved = to_dict(build_config(type(cfg), saved))
    except ConfigError:
        pass
    return _dict_changes(saved, to_dict(cfg))


def _dict_changes(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    changes = []
    for k in sorted(set(old) | set(new), key=str):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            changes += _dict_changes(a, b, f"{prefix}{k}.")
        elif a != b:
            changes.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return changes


def config_hash(cfg: Any) -> str:
    """A short stable hash of the resolved config."""
    blob = json.dumps(to_dict(cfg), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def fail(message: str, code: int = 2) -> typing.NoReturn:
    """Print a clear error for a pipeline user and exit non-zero."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)
