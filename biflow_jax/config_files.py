"""Config files and command-line overrides, with one-line errors a person can act on.

`load(path[:arg])` imports an experiment file (configs/*.py, `get_config(arg)`);
`apply_overrides(config, ["train.steps=10", ...])` sets values with the types the config
declares, and a key the config lacks fails naming the nearest valid keys. Every CLI of
the package (main, import_torch, bench) goes through here, so they all behave alike.

Defaults live in one place, `configs/common.py`: `defaults(name)` is its section `name` and
`section(config, name)` a config's section over it, so a mode or CLI reading a run saved
before a key existed gets the config's default, never a second table of its own.
"""

from __future__ import annotations

import ast
import difflib
import functools
import importlib.util
import math
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import ml_collections

from biflow_jax.errors import EXPECTED_ERRORS, ConfigError, exit_with_one_line

OVERRIDE_PREFIX = "--config."
COMMON_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "common.py")
_CLI_OVERRIDES: list[str] = []


def load(spec: str) -> ml_collections.ConfigDict:
    """`path/to/file.py[:arg]` -> get_config(arg), locked against new keys."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path!r} (expected e.g. configs/digits.py[:quick])")
    configs_package(os.path.dirname(os.path.abspath(path)))  # `from configs import common`, from anywhere
    module_spec = importlib.util.spec_from_file_location(f"_biflow_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path!r} has no get_config(arg) function")
    try:
        config = module.get_config(arg) if arg else module.get_config()
    except ValueError as e:
        raise ConfigError(f"config {spec!r}: {e}") from None
    config.lock()
    return config


@functools.cache
def _common() -> Any:
    """configs/common.py of this checkout (data only: it imports ml_collections, never biflow_jax)."""
    if not os.path.isfile(COMMON_FILE):
        raise ConfigError(f"the default config sections {COMMON_FILE} are missing (run from a checkout of the repo)")
    module_spec = importlib.util.spec_from_file_location("_biflow_config_common", COMMON_FILE)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def defaults(name: str) -> dict[str, Any]:
    """configs/common.py's section `name` (e.g. 'sample', 'fid') as a plain dict: every default."""
    return _common().__dict__[name]().to_dict()


def section(config: Any, name: str, key: str | None = None) -> dict[str, Any]:
    """`config[key or name]` (absent or partial in an older run's config) over configs/common.py's
    section `name`; keys the defaults lack are kept as the config gives them."""
    given = (config.get(key or name, None) if config is not None else None) or {}
    given = given.to_dict() if isinstance(given, ml_collections.ConfigDict) else dict(given)
    return {**defaults(name), **given}


REPOSITORY_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def configs_package(config_dir: str) -> None:
    """Make `configs` the repository's configs/ package (else, installed without it, the config file's own
    configs/ folder) without putting any folder on sys.path: a file beside a downloaded config (say
    orbax.py) is never imported in place of a library."""
    if "configs" in sys.modules:
        return
    folder = REPOSITORY_CONFIGS
    if not os.path.isfile(os.path.join(folder, "__init__.py")) and os.path.basename(config_dir) == "configs":
        folder = config_dir
    init = os.path.join(folder, "__init__.py")
    if not os.path.isfile(init):
        return  # a stand-alone config file: it imports only itself
    spec = importlib.util.spec_from_file_location("configs", init, submodule_search_locations=[folder])
    package = importlib.util.module_from_spec(spec)
    sys.modules["configs"] = package
    spec.loader.exec_module(package)


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(argv without `--config.KEY=VALUE` items, ['KEY=VALUE', ...])."""
    rest, overrides = [], []
    args = list(argv)
    i = 0
    while i < len(args):
        a = args[i]
        if a.startswith(OVERRIDE_PREFIX):
            item = a[len(OVERRIDE_PREFIX):]
            if "=" not in item:  # `--config.key value`
                if i + 1 >= len(args):
                    raise ConfigError(f"{a} needs a value: {a}=VALUE")
                item = f"{item}={args[i + 1]}"
                i += 1
            overrides.append(item)
        else:
            rest.append(a)
        i += 1
    return rest, overrides


def all_keys(config: Any, prefix: str = "") -> list[str]:
    keys = []
    for key, value in config.items():
        keys.append(prefix + key)
        if isinstance(value, (ml_collections.ConfigDict, dict)):
            keys += all_keys(value, f"{prefix}{key}.")
    return keys


def unknown_key(config: Any, dotted: str) -> ConfigError:
    matches = difflib.get_close_matches(dotted, all_keys(config), n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(repr(m) for m in matches)}?" if matches else \
        "; run with --mode=describe or see the config file for the valid keys"
    return ConfigError(f"unknown config key {dotted!r}{hint}")


def parse_value(text: str, current: Any, declared: type | None, key: str) -> Any:
    """The override's text as the type the config declares for `key`."""
    kind = declared if declared is not None else (type(current) if current is not None else None)
    if kind is bool:
        lowered = text.strip().lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise ConfigError(f"config key {key!r} takes true or false, got {text!r}")
    if kind is str:
        return text
    if text.strip().lower() in ("none", "null"):
        return None
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if kind in (int, float, list, tuple):
            article = "an" if kind is int else "a"
            raise ConfigError(f"config key {key!r} takes {article} {kind.__name__}, got {text!r}") from None
        return text
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value) if abs(value) < 2 ** 1024 else math.inf  # a huge integer overflows like 1e999
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"config key {key!r} takes a finite number, got {text!r} (it reads as {value})")
    if kind in (list, tuple) and isinstance(value, (list, tuple)):
        return kind(value)
    if kind is not None and not isinstance(value, kind):
        raise ConfigError(f"config key {key!r} takes {'an' if kind is int else 'a'} {kind.__name__}, got {text!r}")
    return value


def apply_overrides(config: ml_collections.ConfigDict, overrides: Iterable[str]) -> ml_collections.ConfigDict:
    """Set each 'a.b.c=value' on a (locked) config; unknown keys and bad values raise ConfigError."""
    for item in overrides:
        dotted, _, text = item.partition("=")
        *parents, leaf = dotted.split(".")
        node = config
        for i, part in enumerate(parents):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                raise unknown_key(config, ".".join(parents[: i + 1]) if i < len(parents) - 1 else dotted)
            node = node[part]
        if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
            raise unknown_key(config, dotted)
        try:
            declared = node.get_ref(leaf).get_type()
        except (AttributeError, KeyError, TypeError):
            declared = None
        value = parse_value(text, node[leaf], declared, dotted)
        with node.unlocked() if hasattr(node, "unlocked") else _nullcontext():
            try:
                node[leaf] = value
            except TypeError as e:
                raise ConfigError(f"config key {dotted!r}: {e}") from None
    return config


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def cli_overrides() -> list[str]:
    """The `--config.KEY=VALUE` items `run_cli` took off the command line, as 'KEY=VALUE'."""
    return list(_CLI_OVERRIDES)


def run_cli(main: Callable[[list[str]], None]) -> None:
    """absl's app.run(main) for a command-line module: `--config.KEY=VALUE` items are taken off the
    command line first (read them with `cli_overrides()`), and expected errors (bad config, data,
    workdir or weights) print one line `error: ...` and exit 2 instead of a traceback."""
    from absl import app

    global _CLI_OVERRIDES
    try:
        argv, _CLI_OVERRIDES = split_overrides(sys.argv)
        app.run(main, argv=argv)
    except EXPECTED_ERRORS as e:
        exit_with_one_line(e)
