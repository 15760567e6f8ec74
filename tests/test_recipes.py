"""The public-data recipes (configs/recipes/): every preset loads, and each recipe runs end to end, a few steps
per stage, from fixture files in its dataset's schema through ``prepare_data`` and a tiny imported HF model.

The fixture text is made of the fixture tokenizer's own words (``w3`` .. ``w127``), so it tokenizes to real
ids; it is made up here, never copied from a dataset."""

import json
import random

import pytest
from conftest import REPO, load_config, load_config_module

from instructjax import hf, stages
from instructjax.data import prepare

RECIPES = ("tldr", "hh", "ultrafeedback")
FIXTURES = REPO / "tests/fixtures/hf"
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def words(rng: random.Random, n: int) -> str:
    return " ".join(f"w{rng.randrange(3, 128)}" for _ in range(n))


def write_fixture(recipe: str, directory, rng: random.Random):
    """A small dataset in the recipe's public schema: train and test splits, as jsonl files."""
    directory.mkdir()
    for split, n in (("train", 48), ("test", 16)):
        rows = []
        for _ in range(n):
            if recipe == "hh":
                prefix = (
                    f"\n\nHuman: {words(rng, 4)}\n\nAssistant: {words(rng, 2)}\n\nHuman: {words(rng, 3)}\n\nAssistant:"
                )
                rows.append({"chosen": prefix + " " + words(rng, 3), "rejected": prefix + " " + words(rng, 4)})
            elif recipe == "tldr":
                info = {"post": words(rng, 8), "title": words(rng, 2), "subreddit": "w5"}
                summaries = [{"text": " " + words(rng, 3)}, {"text": " " + words(rng, 4)}]
                rows.append({"info": info, "summaries": summaries, "choice": rng.randrange(2)})
            else:
                completions = [
                    {"response": words(rng, 2 + j), "overall_score": float(rng.randrange(1, 10))} for j in range(4)
                ]
                if len({c["overall_score"] for c in completions}) == 1:
                    completions[0]["overall_score"] = 10.0
                rows.append({"instruction": words(rng, 5), "completions": completions})
        (directory / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_preset_loads_and_sizes_its_stages(recipe):
    module = load_config_module(f"configs/recipes/{recipe}.py")
    for preset in module.PRESETS:
        c = load_config(f"configs/recipes/{recipe}.py", preset)
        assert c.data_dir == "" and c.base_from == ""  # the two paths every recipe needs
        for name in ("sft", "rm", "ppo_init", "ppo", "ppo_ptx"):
            assert c[name].mesh_shape[1] == -1, (preset, name)
        assert c.ppo.ptx_coef == 0.0 and c.ppo_ptx.ptx_coef > 0.0, preset
        if preset != "smoke":  # the update still sees the recipe's batch
            assert c.sft.batch_size * c.sft.optim.grad_accum_steps == 32
            assert c.rm.batch_size * c.rm.optim.grad_accum_steps == 64
            assert c.ppo.minibatch_size * c.ppo.optim.grad_accum_steps == 64
    with pytest.raises(ValueError, match="unknown recipe preset"):
        load_config(f"configs/recipes/{recipe}.py", "cpu")
    c = load_config(f"configs/recipes/{recipe}.py", "gpu")
    if recipe == "tldr":  # Huang et al. 2024's settings
        assert c.ppo_from == "sft" and c.ppo.max_new_tokens == 53 and c.ppo.temperature == 0.7
        assert (c.ppo.kl.mode, c.ppo.kl.init_coef, c.ppo.ppo_epochs, c.ppo.value_coef) == ("fixed", 0.05, 4, 0.1)
        assert not c.ppo.whiten_rewards and c.ppo_ptx.ptx_coef == 27.8
    if recipe == "ultrafeedback":
        assert c.rm.data.k_max == 4


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_runs_end_to_end_from_public_schema_files(recipe, tmp_path):
    rng = random.Random(recipe)
    write_fixture(recipe, tmp_path / "raw", rng)
    family = "qwen2" if recipe == "ultrafeedback" else "gpt2"  # the instruct recipe: a model with a chat template
    model_dir = tmp_path / "hf"
    model_dir.mkdir()
    for f in (FIXTURES / family).iterdir():
        (model_dir / f.name).write_bytes(f.read_bytes())
    if recipe == "ultrafeedback":
        config = json.loads((model_dir / "tokenizer_config.json").read_text()) | {"chat_template": CHATML}
        (model_dir / "tokenizer_config.json").write_text(json.dumps(config))
    report = prepare.prepare(
        recipe, tmp_path / "raw", tmp_path / "data", tokenizer=model_dir, valid_fraction=0.25, max_len=48
    )
    assert report["rows"]["prompts_test"] == 16 and not report["skipped"]
    if recipe == "ultrafeedback":
        assert "chat template" in report["template"]
        assert "<|im_start|>assistant" in (tmp_path / "data" / "prompts_train.jsonl").read_text()
    hf.import_to_workdir(model_dir, tmp_path / "base")

    config = load_config(f"configs/recipes/{recipe}.py", "smoke")
    config.data_dir, config.base_from = str(tmp_path / "data"), str(tmp_path / "base")
    results = stages.run(config, tmp_path / "job")

    expected = {"base", "sft", "ppo", "ppo_ptx"} | ({"ppo_init"} if recipe != "tldr" else set())
    assert set(results["models"]) == expected
    for name, r in results["models"].items():
        assert 0.0 <= r["rm_win_rate_vs_sft"] <= 1.0 and r["pretrain_nll"] > 0, name
        assert not {"gold_score", "gold_by_family", "gold_win_rate_vs_sft"} & set(r), name  # no world.json
    assert results["rm"]["val_accuracy"] is not None and results["rm"]["gold_accuracy"] is None
    # ``base_from`` is the base model: no stage 0, and every stage has the imported shape and reads data_dir
    assert not (tmp_path / "job" / "base").exists() and results["seconds"]["base"] == 0.0
    assert "| base | – | – |" in (tmp_path / "job" / "report.md").read_text()
    d_model = json.loads((tmp_path / "base" / "config.json").read_text())["model"]["d_model"]
    for name in ("sft", "rm") + (("ppo_init",) if recipe != "tldr" else ()):
        stage_config = json.loads((tmp_path / "job" / name / "config.json").read_text())
        assert stage_config["model"]["d_model"] == d_model, name
        assert stage_config["data"]["world_dir"] == str(tmp_path / "data"), name
    assert not (tmp_path / "data" / "tfds").exists() and (tmp_path / "job" / "tfds").is_dir()  # the job's cache
    for name in ("ppo", "ppo_ptx"):
        summary = json.loads((tmp_path / "job" / name / "summary.json").read_text())
        assert summary["status"] == "done", name
    ppo = json.loads((tmp_path / "job" / "ppo" / "config.json").read_text())
    if recipe == "tldr":
        assert not (tmp_path / "job" / "ppo_init").exists()  # PPO starts from SFT
        assert ppo["policy_from"] == "../sft"  # stored relative to the workdir (stage.write_config)
        assert (ppo["temperature"], ppo["value_coef"], ppo["ppo_epochs"]) == (0.7, 0.1, 4)
    else:
        assert ppo["policy_from"] == "../ppo_init"
