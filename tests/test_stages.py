"""The main job end to end on the quick preset; a rerun skips every finished stage; the quickstart
notebook runs against the same job; a small ablation sweep uses the job's stages as its upstream."""

import json
import pathlib
import subprocess
import sys

import pytest
from conftest import REPO, load_config, load_config_module

from instructjax import ablate, ablate_report, loop, stages, train_ppo, train_rm, train_sft
from instructjax.data import world_tasks


@pytest.fixture(scope="module")
def quick_job(tmp_path_factory):
    """The quick pipeline, run once for this module: ``(config, workdir, results)``."""
    config = load_config("configs/pipeline.py", "quick")
    workdir = tmp_path_factory.mktemp("quick_job")
    return config, workdir, stages.run(config, workdir)


@pytest.mark.slow
def test_quick_pipeline_end_to_end_and_rerun_skips(quick_job, monkeypatch, capsys):
    config, tmp_path, results = quick_job
    assert set(results["models"]) == {"base", "sft", "ppo_init", "ppo", "ppo_ptx"}
    sft = results["models"]["sft"]
    assert sft["gold_win_rate_vs_sft"] == sft["rm_win_rate_vs_sft"] == 0.5 and sft["kl_to_sft"] == 0.0
    for name, r in results["models"].items():
        assert 0.0 <= r["gold_score"] <= 1.0 and r["pretrain_nll"] > 0, name
        assert 0.0 <= r["gold_win_rate_vs_sft"] <= 1.0 and 0.0 <= r["rm_win_rate_vs_sft"] <= 1.0, name
        by_family = r["gold_by_family"]  # the mean over all prompts lies between the families' means
        assert set(by_family) <= set(world_tasks.FAMILIES) and len(by_family) > 3, name
        assert min(by_family.values()) - 1e-9 <= r["gold_score"] <= max(by_family.values()) + 1e-9, name
        assert json.loads((tmp_path / name / "summary.json").read_text())["status"] == "done"
    assert json.loads((tmp_path / "results.json").read_text())["models"] == results["models"]
    report = (tmp_path / "report.md").read_text()
    assert "| sft |" in report and "training_curves.png" in report
    assert (tmp_path / "training_curves.png").stat().st_size > 10_000
    assert (tmp_path / "ppo_vs_kl.png").exists() and "ppo_vs_kl.png" in report
    assert 0.0 <= results["rm"]["val_accuracy"] <= 1.0 and "Reward model" in report
    ppo_init = json.loads((tmp_path / "ppo_init" / "summary.json").read_text())
    assert "score" in ppo_init["final"]  # the quick preset selects by the RM score (§3.5)
    assert load_config("configs/pipeline.py", "default").ppo_init.select_by == "val_loss"  # docs/results.md

    def no_training(*args, **kwargs):
        raise AssertionError("a finished stage was trained again")

    monkeypatch.setattr(train_sft, "train", no_training)
    monkeypatch.setattr(train_rm, "train", no_training)
    monkeypatch.setattr(train_ppo, "train", no_training)
    capsys.readouterr()
    again = stages.run(config, tmp_path)
    assert again["models"] == results["models"]  # same params, greedy decoding: the same evaluation
    shown = capsys.readouterr().out  # the progress display names every stage in order
    assert "[2/8] base: finished earlier" in shown and "[7/8] ppo_ptx: finished earlier" in shown
    assert "[8/8] evaluation: done in" in shown

    sample = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts/sample.py"),
            f"--workdir={tmp_path / 'sft'}",
            "--prompt=sort 5 2 9 =>",
            "--prompt=add 12 7 =>",
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=pathlib.Path(tmp_path),
    )
    assert sample.stdout.count("->") == 2 and "sort 5 2 9 =>" in sample.stdout


def test_win_rate_counts_ties_half():
    from instructjax import evaluate

    assert evaluate.win_rate([1.0, 1.0, 0.0], [0.0, 0.0, 0.0]) == pytest.approx(2.5 / 3)
    assert evaluate.win_rate([0.2, 0.9], [0.5, 0.9]) == 0.25
    with pytest.raises(ValueError, match="paired scores"):
        evaluate.win_rate([1.0], [1.0, 2.0])


@pytest.mark.slow
def test_quickstart_notebook_runs(quick_job, monkeypatch):
    """The notebook executes top to bottom (so it cannot rot). It reuses this module's finished job, so
    its ``stages.run`` skips the training stages and re-evaluates."""
    import nbformat
    from nbclient import NotebookClient

    _, workdir, results = quick_job
    monkeypatch.setenv("INSTRUCTJAX_QUICKSTART_WORKDIR", str(workdir))
    notebook = nbformat.read(REPO / "notebooks/quickstart.ipynb", as_version=4)
    NotebookClient(
        notebook, timeout=600, startup_timeout=300, resources={"metadata": {"path": str(REPO / "notebooks")}}
    ).execute()
    outputs = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs]
    text = "".join(out.get("text", "") for out in outputs)
    markdown = "".join(out.get("data", {}).get("text/markdown", "") for out in outputs)
    assert f"workdir: {workdir}" in text and "finished earlier" in text
    for name in stages.POLICIES:
        assert f"| {name} | {results['models'][name]['gold_score']:.3f} |" in markdown  # the job's own numbers
    assert markdown.count("| `") == 8  # the side-by-side samples: one row per prompt
    assert sum("image/png" in out.get("data", {}) for out in outputs) == 2


def test_a_data_dir_missing_a_file_is_named_before_anything_runs(quick_job, tmp_path):
    """``data_dir``: the README's recipe for your own data (run end to end, with an imported Hugging Face model as
    ``base_from``, by tests/test_recipes.py). A missing file is named before any stage starts."""
    import shutil

    config, job, _ = quick_job
    data = tmp_path / "data"
    data.mkdir()
    for name in stages.DATA_FILES:
        if name != "prompts_test":
            shutil.copy(job / "world" / f"{name}.jsonl", data)
    config = config.copy_and_resolve_references()
    config.data_dir = str(data)
    with pytest.raises(FileNotFoundError, match="lacks prompts_test.jsonl"):
        stages.run(config, tmp_path / "job")
    assert not (tmp_path / "job" / "sft").exists()


def _small_sweep(pipeline, upstream: pathlib.Path):
    """Gao et al.'s sweep shrunk: the quick job as upstream, one proxy RM, two seeds, PPO of 4 iterations."""
    common = load_config_module("configs/ablations/common.py")
    config = common.sweep_config("small", "a small sweep")
    config.pipeline = pipeline
    config.upstream_dir = str(upstream)
    config.steps = ("rm", "best_of_n", "ppo")
    config.points = ("rm.data.train_records=40",)
    config.common = "ppo.num_iterations=4,rm.eval_every=2"
    config.seeds, config.workers, config.rl_window = 2, 2, 1
    config.figure = "overoptimization"
    config.eval.update(dict(prompts=40, kl_prompts=16, batch_size=40, bon_prompts=16, bon_ns=(1, 2, 4)))
    return config


@pytest.mark.slow
def test_small_ablation_sweep_a_failed_point_spares_the_others_and_a_rerun_skips(quick_job, tmp_path):
    """``ablate.run`` with the quick job's stages as its upstream (finished: not trained again)."""
    pipeline, upstream, _ = quick_job
    workdir = tmp_path / "sweep"
    config = _small_sweep(pipeline, upstream)
    config.points = ("rm.data.train_records=40", "rm.data.train_records=1000")  # the world has 40 rankings
    with pytest.raises(RuntimeError, match=r"2 of 4 runs failed[\s\S]*train_records=1000,rm.eval_every=2 seed 1: see"):
        ablate.run(config, workdir)
    points = upstream / "points" / "rm+best_of_n+ppo"
    bad = points / "ppo.num_iterations=4,rm.data.train_records=1000,rm.eval_every=2" / "seed0"
    assert "config.data.train_records=1000 but" in (bad / "log.txt").read_text()
    runs = sorted(points.glob("*/seed*/result.json"))
    assert len(runs) == 2 and all("train_records=40," in str(p) for p in runs)  # the good point's two seeds

    stamps = {p: p.stat().st_mtime_ns for p in runs}
    # ptx_coef 0.0 is the pipeline's own value: the same point, which this sweep names with one more key
    config.points = ("rm.data.train_records=40,ppo.ptx_coef=0.0",)
    summary = ablate.run(config, workdir)  # the finished runs are skipped: nothing is trained again
    assert {p: p.stat().st_mtime_ns for p in runs} == stamps
    assert summary["points"][0]["values"]["ppo.ptx_coef"] == 0.0  # this sweep's values, not the stored run's

    (point,) = summary["points"]
    assert point["label"] == "ppo.num_iterations=4,rm.data.train_records=40,rm.eval_every=2" and point["seeds"] == 2
    assert len(point["gold_score"]["values"]) == 2 and 0.0 <= point["gold_score"]["mean"] <= 1.0
    assert 0.0 <= point["gold_win_rate_vs_init"]["mean"] <= 1.0 and 0.0 <= point["val_accuracy"]["mean"] <= 1.0
    assert point["kl_to_init"]["mean"] >= -1.0 and point["alignment_tax"]["mean"] > -10
    assert [row["n"] for row in point["best_of_n"]["table"]] == [1, 2, 4]
    assert point["best_of_n"]["fit"] is not None  # 3 values of n × 2 seeds
    assert [len(s["d"]) for s in point["rl"]["per_seed"]] == [4, 4]
    assert all(c["epoch"] > 0 for curve in point["rm_curves"] for c in curve)
    seeds = [json.loads(p.read_text()) for p in runs]
    assert seeds[0]["best_of_n"] != seeds[1]["best_of_n"]  # the seed reaches the point's stages
    assert (workdir / "figure.png").stat().st_size > 10_000
    table = (workdir / "table.md").read_text().splitlines()
    assert len(table) == 3 and "rm.data.train_records=40" in table[2]
    assert json.loads((workdir / "ablation.json").read_text())["points"][0]["label"] == point["label"]

    # The same summary drawn as the other two kinds of figure and table (every key they read is real).
    for figure, metrics in (("sweep", ("gold_score", "alignment_tax")), ("curves", ("val_loss", "val_accuracy"))):
        other = config.copy_and_resolve_references()
        other.figure, other.metrics, other.x, other.x_scale = figure, metrics, "ppo.ptx_coef", "symlog"
        ablate_report.plot(other, summary, tmp_path / f"{figure}.png")
        assert (tmp_path / f"{figure}.png").stat().st_size > 10_000
        assert len(ablate_report.table(other, summary).splitlines()) == 4  # head, rule, the init's row, the point


def test_a_preempted_stage_stops_the_job_before_the_next_one_starts(tmp_path, monkeypatch):
    """SIGTERM inside a stage: it saves and returns status 'preempted'; later stages must not start from its
    half-trained checkpoint, and the pipeline's script exits with loop.EXIT_PREEMPTED."""
    started = []

    def preempted(config, workdir, *args):
        started.append(pathlib.Path(workdir).name)
        return {"status": "preempted", "step": 3, "total_steps": 6, "wall_seconds": 1.0}

    monkeypatch.setattr(train_sft, "train", preempted)
    monkeypatch.setattr(train_rm, "train", preempted)
    with pytest.raises(loop.Preempted, match="base was preempted at step 3 of 6"):
        stages.train_stages(load_config("configs/pipeline.py", "quick"), tmp_path)
    assert started == ["base"]


@pytest.mark.slow
def test_evaluate_script_measures_as_the_pipeline_does(quick_job):
    """scripts/evaluate.py with the pipeline's evaluation settings (its defaults are the default preset's; the
    quick preset's are passed here) gives the report's numbers, the KL and its standard error included."""
    config, job, results = quick_job
    e = config.eval
    command = [
        sys.executable,
        str(REPO / "scripts/evaluate.py"),
        f"--rm={job / 'rm'}",
        "--best=ppo_init",
        f"--prompts_file={job / 'world/prompts_test.jsonl'}",
        f"--pretrain_file={job / 'world/pretrain_heldout.jsonl'}",
        f"--prompts={e.prompts}",
        f"--kl_prompts={e.kl_prompts}",
        f"--batch_size={e.batch_size}",
        f"--max_new_tokens={e.max_new_tokens}",
        *(f"--model={name}={job / name}" for name in ("sft", "ppo_init", "ppo_ptx")),
    ]
    out = subprocess.run(command, check=True, capture_output=True, text=True, cwd=REPO)
    measured = json.loads(out.stdout[out.stdout.index("{") :])
    for name in ("ppo_init", "ppo_ptx"):
        for key in ("kl_to_sft", "kl_to_sft_se", "gold_score", "rm_score", "pretrain_nll"):
            assert measured[name][key] == pytest.approx(results["models"][name][key], abs=1e-6), (name, key)


NOTEBOOKS = {  # notebook: the figures it must draw
    "reward_model": 4,
    "ppo_step_by_step": 1,
    "overoptimization": 1,
    "hf_model": 1,
}


def test_notebooks_are_stored_without_outputs_and_install_themselves_first():
    import nbformat

    for path in sorted((REPO / "notebooks").glob("*.ipynb")):
        notebook = nbformat.read(path, as_version=4)
        code = [cell for cell in notebook.cells if cell.cell_type == "code"]
        assert all(not cell.outputs and cell.execution_count is None for cell in code), path.name
        assert "INSTRUCTJAX_SOURCE" in code[0].source, path.name  # the Colab / Kaggle install cell
    assert {p.stem for p in (REPO / "notebooks").glob("*.ipynb")} == {"quickstart", *NOTEBOOKS}


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_and_draws_its_figures(name, quick_job, monkeypatch, tmp_path):
    """Each notebook executes top to bottom on this module's finished quick job (docs/notebooks.md)."""
    import nbformat
    from nbclient import NotebookClient

    _, workdir, _ = quick_job
    monkeypatch.setenv("INSTRUCTJAX_QUICKSTART_WORKDIR", str(workdir))
    monkeypatch.setenv("INSTRUCTJAX_NOTEBOOK_DIR", str(tmp_path))
    notebook = nbformat.read(REPO / f"notebooks/{name}.ipynb", as_version=4)
    NotebookClient(
        notebook, timeout=600, startup_timeout=300, resources={"metadata": {"path": str(REPO / "notebooks")}}
    ).execute()
    outputs = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs]
    assert not [out for out in outputs if out.get("output_type") == "error"]
    assert sum("image/png" in out.get("data", {}) for out in outputs) == NOTEBOOKS[name]
    text = "".join(out.get("text", "") for out in outputs)
    if name == "ppo_step_by_step":  # twelve iterations, one at a time, and a checkpoint train() resumes from
        assert text.count("iteration ") >= 4 and "checkpoint at step 12" in text
    if name == "hf_model":
        assert "max |logit difference| after export and re-import: 0.0" in text
