"""Load ml_collections config files by path, as ``config_flags`` does: ``"configs/sft.py:tiny"``.

Config files import their siblings (``configs/sft.py`` reuses the presets of ``configs/model.py``)
with ``sibling(__file__, "model")``, since ``configs/`` is not a package on ``sys.path``.

What a config file offers, for ``scripts/config_info.py``: ``presets`` (its ``PRESETS``), ``default_preset``,
``flatten`` (every key, dotted, in the config's order), ``load_config_with_comments`` (each key's comment,
from the source line that set it: ``c.optim.lr = 1e-3  # peak learning rate ...``) and ``describe`` (all of
it as the lines the script prints).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pathlib
import re
import shlex
import sys
import tokenize
import types
from collections.abc import Iterator, Sequence
from typing import Any


def load_module(path: str | pathlib.Path) -> types.ModuleType:
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"config file {path} does not exist")
    spec = importlib.util.spec_from_file_location(f"_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sibling(file: str, name: str) -> types.ModuleType:
    """The config module ``name`` next to ``file`` (pass ``__file__``)."""
    return load_module(pathlib.Path(file).with_name(f"{name}.py"))


def load_config(spec: str, overrides: dict[str, Any] | None = None) -> Any:
    """``"path/to/config.py[:arg]"`` -> ``get_config(arg)``, locked as ``config_flags(lock_config=True)``
    locks it (an unknown key is an error, a wrong type too), with dotted-key overrides applied."""
    path, _, arg = spec.partition(":")
    config = load_module(path).get_config(arg or None)
    config.lock()
    if overrides:
        config.update_from_flattened_dict(overrides)
    return config


def presets(module: types.ModuleType) -> tuple[str, ...]:
    """The preset names a config module declares in ``PRESETS`` (a tuple, or a dict's keys), in its order;
    ``()`` for a file without presets (``configs/ablations/*.py``: ``get_config`` ignores its argument)."""
    return tuple(getattr(module, "PRESETS", ()))


def default_preset(module: types.ModuleType) -> str | None:
    """The preset ``get_config(None)`` builds (the one a spec without ``:preset`` gets): the first of
    ``presets(module)`` whose config equals it; ``None`` for a file without presets."""
    names = presets(module)
    if not names:
        return None
    default = module.get_config(None).to_dict()
    return next((name for name in names if module.get_config(name).to_dict() == default), None)


def _is_section(value: Any) -> bool:
    import ml_collections  # only the config tools need it

    return isinstance(value, ml_collections.ConfigDict)


def ordered_items(config: Any) -> list[tuple[str, Any]]:
    """A ``ConfigDict``'s ``(key, value)`` pairs in the order the config file set them (``ConfigDict.items()``
    sorts them), values resolved as ``items()`` resolves them."""
    fields = getattr(config, "_fields", None)  # ml_collections keeps the insertion order there, and sorts on read
    return [(key, config[key]) for key in fields] if isinstance(fields, dict) else list(config.items())


def flatten(config: Any) -> dict[str, Any]:
    """Every leaf of a ``ConfigDict`` by dotted key (``optim.lr``), in the order the config file set them;
    sections are walked, not listed, except an empty one, which is a leaf."""
    flat = {}
    for key, value in ordered_items(config):
        if _is_section(value) and len(value):
            flat.update({f"{key}.{sub}": v for sub, v in flatten(value).items()})
        else:
            flat[key] = value
    return flat


@contextlib.contextmanager
def _record_sets() -> Iterator[dict[tuple[int, str], list[tuple[str, int]]]]:
    """While active, each ``ConfigDict`` field set records where it was set: ``(id(config_dict), key)`` ->
    ``[(file, line), ...]`` in order, the first frame outside ``ml_collections`` (the config file's statement,
    also when ``update`` or a helper such as ``model_config`` does the setting)."""
    import ml_collections

    cls = ml_collections.ConfigDict
    library = os.path.dirname(ml_collections.__file__) + os.sep
    original = cls.__setitem__
    records: dict[tuple[int, str], list[tuple[str, int]]] = {}
    alive = {}  # every recorded ConfigDict, kept alive so that no later one reuses its id

    def setitem(self: Any, key: str, value: Any) -> None:
        frame = sys._getframe(1)
        while frame is not None and frame.f_code.co_filename.startswith(library):
            frame = frame.f_back
        if frame is not None:
            alive[id(self)] = self
            records.setdefault((id(self), key), []).append((frame.f_code.co_filename, frame.f_lineno))
        original(self, key, value)

    cls.__setitem__ = setitem
    try:
        yield records
    finally:
        cls.__setitem__ = original


def line_comments(path: str | pathlib.Path) -> dict[int, tuple[str, str]]:
    """Line number -> (the code before the comment, the comment without ``#``) for each commented line of a
    Python file."""
    with tokenize.open(path) as f:
        lines = f.readlines()
    comments = {}
    for tok in tokenize.generate_tokens(iter(lines).__next__):
        if tok.type == tokenize.COMMENT:
            row, col = tok.start
            comments[row] = (lines[row - 1][:col], tok.string.lstrip("#").strip())
    return comments


def load_config_with_comments(spec: str, overrides: dict[str, Any] | None = None) -> tuple[Any, dict[str, str]]:
    """``load_config(spec, overrides)`` and each key's comment: dotted key (a leaf, or a section such as
    ``model``) -> the comment ending the first source line of the form ``<name>.<...>.<key> = ...  # comment``
    that set it, in whichever config file the line is (``configs/sft.py``'s ``model.*`` come from
    ``configs/model.py``'s ``model_config``). Keys without such a line have no entry."""
    with _record_sets() as records:
        config = load_config(spec, overrides)
    files: dict[str, dict[int, tuple[str, str]]] = {}
    comments = {}

    def comment(node: Any, key: str) -> str | None:
        assigns = re.compile(rf"\.{re.escape(key)}\s*=(?!=)")
        for file, line in records.get((id(node), key), ()):
            if file not in files:
                files[file] = line_comments(file) if os.path.exists(file) else {}
            code, found = files[file].get(line, ("", ""))
            if found and assigns.search(code):
                return found
        return None

    def walk(node: Any, prefix: str) -> None:
        for key, value in ordered_items(node):
            found = comment(node, key)
            if found:
                comments[prefix + key] = found
            if _is_section(value):
                walk(value, f"{prefix}{key}.")

    walk(config, "")
    return config, comments


def _override_example(path: str, spec: str, module: types.ModuleType, flat: dict[str, Any]) -> str:
    """``python scripts/X.py --config=SPEC --config.KEY=VALUE``: the script the config file's docstring runs it
    with, and ``optim.lr`` (else ``seed``, else the first top-level number) at its current value."""
    script = "scripts/SCRIPT.py"
    for match in re.finditer(r"python (scripts/\S+\.py)\b.*?--config=(\S+?\.py)", module.__doc__ or ""):
        if pathlib.Path(match.group(2)).name == pathlib.Path(path).name:
            script = match.group(1)
            break
    numbers = [k for k, v in flat.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    preferred = [k for k in ("optim.lr", "seed") if k in flat] + [k for k in numbers if "." not in k]
    key = (preferred or numbers or list(flat) or ["KEY"])[0]
    value = flat.get(key, "VALUE")
    return f"python {script} --config={shlex.quote(spec)} {shlex.quote(f'--config.{key}={value}')}"


def describe(spec: str) -> list[str]:
    """What ``scripts/config_info.py --config=SPEC`` prints for ``"path/to/config.py[:preset]"``: the file's
    presets with the default marked, every key of the preset (the default without one) as
    ``dotted.key = repr(value)  # comment`` in the config's order (a commented section as ``section.*  # ...``
    before its keys), and how to override a key. A preset the file does not declare is a ``ValueError`` naming
    those it does; a file without ``get_config`` (``configs/ablations/common.py``) is described as a helper."""
    path, _, arg = spec.partition(":")
    module = load_module(path)
    summary = (module.__doc__ or "").strip().split("\n")[0]
    lines = [f"{path}: {summary}" if summary else path]
    if not hasattr(module, "get_config"):
        return [*lines, f"{path} has no get_config(): not a config file but a helper its sibling config files import"]
    names = presets(module)
    if names:
        if arg and arg not in names:
            raise ValueError(f"unknown preset {arg!r} of {path}: {', '.join(names)}")
        default = default_preset(module)
        lines.append(f"presets: {', '.join(names)} (default: {default})")
        preset = arg or default
    else:
        if arg:
            raise ValueError(f"{path} has no presets (its get_config takes none): use --config={path}")
        lines.append("presets: none (this file is one config; get_config takes no preset)")
        preset = None
    full_spec = f"{path}:{preset}" if preset else path
    config, comments = load_config_with_comments(full_spec)
    flat = flatten(config)
    lines += ["", f"keys of {full_spec}:"]
    shown = set()
    for key, value in flat.items():
        parts = key.split(".")
        for i in range(1, len(parts)):
            section = ".".join(parts[:i])
            if section not in shown and section in comments:
                lines.append(f"{section}.*  # {comments[section]}")
            shown.add(section)
        text = "{}" if _is_section(value) else repr(value)
        lines.append(f"{key} = {text}  # {comments[key]}" if key in comments else f"{key} = {text}")
    lines += [
        "",
        "Override any key with --config.KEY=VALUE on a script that takes this file, e.g.",
        "  " + _override_example(path, full_spec, module, flat),
    ]
    return lines


def check_positive(config: Any, keys: Sequence[str], allow_zero: Sequence[str] = ()) -> None:
    """Raise ``ValueError`` naming the first of ``keys`` (dotted, e.g. ``"optim.lr"``) whose value is not > 0
    (or not >= 0 for the keys in ``allow_zero``): a config that makes no sense fails before anything is built."""
    for key in keys:
        value = config
        for part in key.split("."):
            value = value[part]
        if value < 0 or (value == 0 and key not in allow_zero):
            need = ">= 0" if key in allow_zero else "> 0"
            raise ValueError(f"config.{key}={value!r} must be {need}")
