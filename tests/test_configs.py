"""Every config file loads; every model preset has its documented parameter count (within 1%)."""

import subprocess
import sys

import jax.numpy as jnp
import pytest
from conftest import REPO, load_config, load_config_module

from instructjax.model import ModelConfig, Transformer, count_params
from instructjax.sharding import abstract_params

CONFIG_FILES = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "configs").glob("*.py"))


@pytest.mark.parametrize("path", CONFIG_FILES)
def test_config_file_loads(path):
    config = load_config(path)
    assert config.to_dict()


@pytest.mark.parametrize("preset", sorted(load_config_module("configs/model.py").PRESETS))
def test_preset_parameter_count_matches_documented_size(preset):
    config = load_config("configs/model.py", preset)
    model = Transformer(ModelConfig.from_dict(config.model))
    n = count_params(abstract_params(model, jnp.zeros((1, 8), jnp.int32)))
    assert abs(n - config.documented_params) <= 0.01 * config.documented_params, (n, config.documented_params)
    if preset.startswith("tiny"):
        assert n < 1_000_000


def test_import_is_fast():
    code = "import time; t = time.perf_counter(); import instructjax; print(time.perf_counter() - t)"
    seconds = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert seconds < 3.0
