"""scripts/config_info.py and the configlib functions under it: every config file's presets load, every key is
listed in order with its value, the config files' comments are found; docs/tpu.md and scripts/tpu_vm.sh state
no slice for a TPU preset other than its ``tpu_slice`` in configs/tpu.py. Loads configs only, trains nothing."""

import re
import subprocess
import sys

import pytest
from conftest import REPO

from instructjax import configlib

CONFIG_FILES = sorted(
    p.relative_to(REPO).as_posix() for folder in ("configs", "configs/ablations") for p in (REPO / folder).glob("*.py")
)


def module(path):
    return configlib.load_module(REPO / path)


CONFIGS = [p for p in CONFIG_FILES if hasattr(module(p), "get_config")]
WITH_PRESETS = [p for p in CONFIGS if configlib.presets(module(p))]
SPECS = [(p, preset) for p in CONFIGS for preset in configlib.presets(module(p)) or (None,)]


def spec(path, preset=None):
    return f"{REPO / path}:{preset}" if preset else str(REPO / path)


def leaves(tree, prefix=""):
    """The dotted keys of a nested dict (``config.to_dict()``), flattened independently of configlib."""
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            yield from leaves(value, f"{prefix}{key}.")
        else:
            yield prefix + key


def listed(lines):
    """``key = value`` lines of describe()'s output: (key, the rest of the line)."""
    return [m.groups() for m in map(re.compile(r"^([\w.]+) = (.*)$").match, lines) if m]


def test_which_files_have_presets():
    assert len(CONFIG_FILES) >= 13 and "configs/ablations/kl_coef.py" in CONFIGS
    assert [p for p in CONFIG_FILES if p not in CONFIGS] == ["configs/ablations/common.py"]  # a helper, no config
    assert [p for p in CONFIGS if not p.startswith("configs/ablations/")] == WITH_PRESETS
    assert configlib.presets(module("configs/sft.py")) == ("tiny", "base", "ppo_init", "paper_1p3b", "paper_6b")
    assert configlib.presets(module("configs/model.py"))[:2] == ("tiny", "tiny_llama")  # a dict: its keys
    defaults = {p: configlib.default_preset(module(p)) for p in WITH_PRESETS}
    assert defaults["configs/pipeline.py"] == "default" and defaults["configs/tpu.py"] == "sft_1p3b"
    assert all(defaults[p] == configlib.presets(module(p))[0] for p in WITH_PRESETS)
    assert configlib.default_preset(module("configs/ablations/kl_coef.py")) is None


@pytest.mark.parametrize("path, preset", SPECS)
def test_every_preset_loads_and_lists_every_key(path, preset):
    config = configlib.load_config(spec(path, preset))
    traced, comments = configlib.load_config_with_comments(spec(path, preset))
    assert traced.to_dict() == config.to_dict()  # recording the comments changes nothing
    flat = configlib.flatten(traced)
    assert sorted(flat) == sorted(leaves(config.to_dict()))  # every listed key is a key, every key is listed
    for key, value in flat.items():
        node = config
        for part in key.split("."):
            node = node[part]
        assert node == value, key
    sections = {key.rsplit(".", 1)[0] for key in flat if "." in key}
    sections |= {s.rsplit(".", i)[0] for s in set(sections) for i in range(1, s.count(".") + 1)}
    assert set(comments) <= set(flat) | sections
    lines = configlib.describe(spec(path, preset))
    assert [key for key, _ in listed(lines)] == list(flat)  # in the config's order
    for key, rest in listed(lines):
        text = "{}" if hasattr(flat[key], "lock") else repr(flat[key])  # an empty section, else the value's repr
        assert rest == (f"{text}  # {comments[key]}" if key in comments else text), key
    assert any(line.startswith("presets: ") for line in lines)
    assert "--config." in lines[-1] and lines[-1].strip().startswith("python scripts/")


@pytest.mark.parametrize("path", WITH_PRESETS)
def test_unknown_preset_is_an_error_naming_the_presets(path):
    names = configlib.presets(module(path))
    with pytest.raises(ValueError, match="no_such_preset") as raised:
        configlib.load_config(spec(path, "no_such_preset"))
    assert all(name in str(raised.value) for name in names), str(raised.value)
    with pytest.raises(ValueError, match=", ".join(names)):
        configlib.describe(spec(path, "no_such_preset"))


def test_files_without_presets_say_so():
    lines = configlib.describe(spec("configs/ablations/kl_coef.py"))
    assert "presets: none" in "\n".join(lines)
    with pytest.raises(ValueError, match="has no presets"):
        configlib.describe(spec("configs/ablations/kl_coef.py", "tiny"))
    lines = configlib.describe(spec("configs/ablations/common.py"))
    assert "has no get_config" in lines[-1] and not listed(lines)


def test_comments_come_from_the_line_that_set_the_key():
    _, sft = configlib.load_config_with_comments(spec("configs/sft.py"))
    assert "peak learning rate" in sft["optim.lr"]
    assert sft["optim.b1"] == "Adam betas of the paper" and "optim.b2" not in sft  # b2's line has no comment
    assert sft["model.d_model"] == "residual stream width D"  # set in configs/model.py's model_config
    assert sft["model"] == "architecture (configs/model.py)"  # a section's own line
    assert "data.kind" in sft and "'demos' (SFT)" in sft["data.kind"]
    _, base = configlib.load_config_with_comments(spec("configs/sft.py", "base"))
    assert base["data.max_len"].startswith("tokens per sequence")  # set twice: the first comment
    _, tpu = configlib.load_config_with_comments(spec("configs/tpu.py", "rm_6p7b"))
    assert "smallest TPU slice" in tpu["tpu_slice"] and tpu["optim.lr"].startswith("tiny model")  # from rm.py
    _, pipeline = configlib.load_config_with_comments(spec("configs/pipeline.py"))
    assert pipeline["base"].startswith("stage 0") and "peak learning rate" in pipeline["sft.optim.lr"]
    _, sweep = configlib.load_config_with_comments(spec("configs/ablations/kl_coef.py"))
    assert sweep["seeds"].startswith("each point's stages") and "points" in sweep


def test_order_and_comment_rules(tmp_path):
    (tmp_path / "toy.py").write_text(
        "import ml_collections\n"
        "def get_config(arg=None):\n"
        "    c = ml_collections.ConfigDict()\n"
        "    c.zeta = 1  # set first, listed first\n"
        '    c.text = "a # b"  # a hash in a string\n'
        "    c.update(dict(alpha=2, beta=3))  # not a line of the form c.alpha = ...\n"
        "    c.sub = ml_collections.ConfigDict()\n"
        "    c.sub.y = 0\n"
        "    c.sub.x = 0  # x\n"
        "    c.zeta = 2  # set again\n"
        "    return c\n"
    )
    config, comments = configlib.load_config_with_comments(str(tmp_path / "toy.py"))
    assert list(configlib.flatten(config)) == ["zeta", "text", "alpha", "beta", "sub.y", "sub.x"]
    assert comments == {"zeta": "set first, listed first", "text": "a hash in a string", "sub.x": "x"}
    flat = configlib.flatten(configlib.load_config(spec("configs/sft.py")))
    assert list(flat)[:3] == ["stage", "model.vocab_size", "model.d_model"]  # as configs/sft.py sets them


def test_the_script():
    def run(*args):
        argv = [sys.executable, "scripts/config_info.py", *args]
        return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120)

    r = run("--config=configs/sft.py:base")
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    assert "presets: tiny, base, ppo_init, paper_1p3b, paper_6b (default: tiny)" in out
    assert "data.kind = 'pretrain'  # 'demos' (SFT) or 'pretrain' (stage 0: packed text, no prompt masking)" in out
    assert any(line.startswith("optim.lr = 0.002  # peak learning rate") for line in out)
    assert out[-1] == "  python scripts/train_sft.py --config=configs/sft.py:base --config.optim.lr=0.002"
    r = run("--config=configs/sft.py:nope")
    assert r.returncode != 0 and "tiny, base, ppo_init, paper_1p3b, paper_6b" in r.stderr


TPU_PRESETS = module("configs/tpu.py").SLICES
SLICE = re.compile(r"\bv\d+[a-z]*:(\d+)x(\d+)\b")
PRESET = re.compile(r"\b(" + "|".join(sorted(TPU_PRESETS, key=len, reverse=True)) + r")\b")


def slice_claims(text):
    """(preset, slice) for each slice named within 40 characters after a TPU preset ("sft_1p3b and rm_1p3b are
    for v5e:2x2", "(ppo_ptx_1p3b: v5e:8x8)"), and (slice, v5litepod-N) for each "v5e:AxB, i.e. v5litepod-N"."""
    claims = []
    for m in SLICE.finditer(text):
        claims += [(p, m.group(0)) for p in PRESET.findall(text[max(0, m.start() - 40) : m.start()])]
        pod = re.match(r",?[\s#]*i\.e\.\s*v5litepod-(\d+)", text[m.end() :])
        if pod:
            claims.append((m.group(0), int(m.group(1)) * int(m.group(2)) == int(pod.group(1))))
    return claims


def test_slice_claims_match_configs_tpu():
    assert slice_claims("sft_1p3b and rm_1p3b are for v5e:4x4, i.e. v5litepod-8") == [
        ("sft_1p3b", "v5e:4x4"),
        ("rm_1p3b", "v5e:4x4"),
        ("v5e:4x4", False),
    ]
    docs = slice_claims((REPO / "docs/tpu.md").read_text())
    assert len(docs) >= 4, docs  # the checker finds the statements it is meant to
    script = slice_claims((REPO / "scripts/tpu_vm.sh").read_text())
    for claim in docs + script:
        if isinstance(claim[1], bool):
            assert claim[1], f"{claim[0]} is not the v5litepod named after it"
        else:
            assert TPU_PRESETS[claim[0]]["tpu_slice"] == claim[1], claim
    # the help names no preset's slice: it says where to look it up
    help_text = (REPO / "scripts/tpu_vm.sh").read_text()
    assert "create --accelerator=v5litepod-CHIPS" in help_text
    assert "scripts/config_info.py --config=configs/tpu.py:sft_1p3b" in help_text
