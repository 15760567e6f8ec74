"""Load ml_collections config files by path, as ``config_flags`` does: ``"configs/sft.py:tiny"``.

Config files import their siblings (``configs/sft.py`` reuses the presets of ``configs/model.py``)
with ``sibling(__file__, "model")``, since ``configs/`` is not a package on ``sys.path``.
"""

from __future__ import annotations

import importlib.util
import pathlib
import types
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
