"""Compile every TPU preset of ``configs/tpu.py`` ahead of time, each on its slice and on the next smaller one,
plus one PPO preset with each memory-saving choice undone, and print docs/scaling.md's tables (markdown).

    pip install -e '.[tpu]'
    python scripts/aot_sweep.py --out=/tmp/aot            # ~30 min on a 2-core CPU; rerun skips finished rows
    python scripts/aot_sweep.py --out=/tmp/aot --only=preset:sft_1p3b,ppo:remat_none

Every row is one ``scripts/aot_compile.py`` process (its command is in the row's ``args``), whose last stdout
line, the JSON report, is appended to ``OUT/runs.jsonl`` with the row's tag; ``--tables_only`` re-renders.
"""

import json
import pathlib
import re
import subprocess
import sys
import time

from absl import app, flags

REPO = pathlib.Path(__file__).resolve().parents[1]
_OUT = flags.DEFINE_string("out", "/tmp/aot", "directory for runs.jsonl and the compile logs")
_ONLY = flags.DEFINE_list("only", [], "compile only these row tags (default: every row)")
_TABLES_ONLY = flags.DEFINE_bool("tables_only", False, "compile nothing; print the tables of runs.jsonl")

T = "configs/tpu.py"
PRESETS = (
    "sft_1p3b",
    "sft_6p7b",
    "sft_llama3_8b",
    "rm_1p3b",
    "rm_6p7b",
    "rm_llama3_8b",
    "ppo_ptx_1p3b",
    "ppo_ptx_6p7b",
    "ppo_ptx_llama3_8b",
)


def _accum(minibatch: int, steps: int) -> list[str]:
    return [
        f"--config.minibatch_size={minibatch}",
        f"--config.optim.grad_accum_steps={steps}",
        f"--config.value_optim.grad_accum_steps={steps}",
    ]


# (tag, what it shows, aot_compile.py arguments). The smaller slices keep the paper's batch per update through
# more accumulation; v5e:2x2 (4 chips) is the smallest v5e slice libtpu describes, so the 1.3B SFT and RM
# presets have no smaller one.
ROWS = [(f"preset:{p}", p, [f"--config={T}:{p}"]) for p in PRESETS] + [
    (
        "ppo:remat_none",
        "remat none (policy and value model)",
        [
            f"--config={T}:ppo_ptx_1p3b",
            "--what=train_step",
            "--config.aot.policy_model.remat=none",
            "--config.aot.value_model.remat=none",
        ],
    ),
    (
        "ppo:remat_dots",
        "remat dots (save the matmul outputs)",
        [
            f"--config={T}:ppo_ptx_1p3b",
            "--what=train_step",
            "--config.aot.policy_model.remat=dots",
            "--config.aot.value_model.remat=dots",
        ],
    ),
    (
        "ppo:tensor4_one_step",
        "mesh (1, 16, 4) with the whole minibatch (64 episodes) in one step",
        [f"--config={T}:ppo_ptx_1p3b", "--what=train_step", "--config.mesh_shape=(1,16,4)", *_accum(64, 1)],
    ),
    ("ppo:frozen_f32", "frozen reference and RM in float32", [f"--config={T}:ppo_ptx_1p3b", "--config.frozen_dtype="]),
    (
        "ppo:data_parallel",
        "data parallelism instead of FSDP, mesh (64, 1, 1)",
        [f"--config={T}:ppo_ptx_1p3b", "--config.mesh_shape=(64,1,1)"],
    ),
    (
        "ppo:tensor4",
        "tensor parallelism 4, mesh (1, 16, 4), 16 episodes x 4 steps",
        [f"--config={T}:ppo_ptx_1p3b", "--config.mesh_shape=(1,16,4)", *_accum(16, 4)],
    ),
    (
        "smaller:sft_6p7b",
        "v5e:2x4, mesh (1, 8, 1)",
        [
            f"--config={T}:sft_6p7b",
            "--topology=v5e:2x4",
            "--what=train_step",
            "--config.mesh_shape=(1,8,1)",
            "--config.eval_batch_size=8",
        ],
    ),
    (
        "smaller:sft_llama3_8b",
        "v5e:2x4, mesh (1, 8, 1)",
        [
            f"--config={T}:sft_llama3_8b",
            "--topology=v5e:2x4",
            "--what=train_step",
            "--config.mesh_shape=(1,8,1)",
            "--config.eval_batch_size=8",
        ],
    ),
    (
        "smaller:rm_6p7b",
        "v5e:4x4, mesh (1, 2, 8), 2 prompts x 32 steps",
        [
            f"--config={T}:rm_6p7b",
            "--topology=v5e:4x4",
            "--what=train_step",
            "--config.mesh_shape=(1,2,8)",
            "--config.batch_size=2",
            "--config.optim.grad_accum_steps=32",
        ],
    ),
    (
        "smaller:rm_llama3_8b",
        "v5e:4x4, mesh (1, 2, 8), 2 prompts x 32 steps",
        [
            f"--config={T}:rm_llama3_8b",
            "--topology=v5e:4x4",
            "--what=train_step",
            "--config.mesh_shape=(1,2,8)",
            "--config.batch_size=2",
            "--config.optim.grad_accum_steps=32",
        ],
    ),
    (
        "smaller:ppo_ptx_1p3b",
        "v5e:4x8, mesh (1, 32, 1), 32 episodes x 2 steps",
        [
            f"--config={T}:ppo_ptx_1p3b",
            "--topology=v5e:4x8",
            "--config.mesh_shape=(1,32,1)",
            *_accum(32, 2),
            "--config.eval_batch_size=224",
        ],
    ),
    (
        "smaller:ppo_ptx_6p7b",
        "v5e:8x8, mesh (1, 16, 4), 16 episodes x 4 steps",
        [
            f"--config={T}:ppo_ptx_6p7b",
            "--topology=v5e:8x8",
            "--config.mesh_shape=(1,16,4)",
            *_accum(16, 4),
            "--config.eval_batch_size=208",
        ],
    ),
    (
        "smaller:ppo_ptx_llama3_8b",
        "v5e:4x8, mesh (1, 4, 8), 4 episodes x 16 steps",
        [
            f"--config={T}:ppo_ptx_llama3_8b",
            "--topology=v5e:4x8",
            "--config.mesh_shape=(1,4,8)",
            *_accum(4, 16),
            "--config.eval_batch_size=200",
        ],
    ),
    (
        "noscan:sft_1p3b",
        "sft_1p3b train step with scan_layers off (24 blocks unrolled)",
        [f"--config={T}:sft_1p3b", "--what=train_step", "--config.model.scan_layers=False"],
    ),
]
GiB = 1024**3


def _runs(path: pathlib.Path) -> dict[str, dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    return {r["tag"]: r for r in rows}


def compile_row(tag: str, args: list[str], out: pathlib.Path) -> dict:
    """One ``aot_compile.py`` process: its JSON report with the tag, or, where the process failed, how it
    ended and the programs it had compiled by then (its log, ``OUT/<tag>.log``, has the rest)."""
    log = out / f"{tag.replace(':', '_')}.log"
    start = time.perf_counter()
    with log.open("w") as stderr:
        proc = subprocess.run(
            [sys.executable, str(REPO / "scripts/aot_compile.py"), *args],
            cwd=REPO,
            stderr=stderr,
            stdout=subprocess.PIPE,
            text=True,
        )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode or not lines or not lines[-1].startswith("{"):
        # A crash of the compiler itself (libtpu has segfaulted on some programs): keep what it compiled
        # before, from the log, and the way it ended.
        text = log.read_text()
        done = re.findall(r"^\[aot\]   (.+): ([0-9.]+) GiB per device", text, re.M)
        ended = "segmentation fault" if "Segmentation fault" in text else f"exit {proc.returncode}"
        print(f"[sweep] {tag}: failed ({ended}), see {log}", file=sys.stderr)
        return {"tag": tag, "args": args, "failed": ended, "compiled_before": done}
    report = json.loads(lines[-1])
    report.update(tag=tag, args=args, process_seconds=round(time.perf_counter() - start))
    return report


def _gib(x: float) -> str:
    return f"{x / GiB:.2f}"


def _program_rows(report: dict, label: str) -> list[str]:
    rows = []
    for p in report["programs"]:
        fits = "yes" if p["fits"] else "**no**"
        note = " (refused by the compiler: temps is what it asked for)" if p["error"] else ""
        rows.append(
            f"| {label} | {report['topology']} | {tuple(report['mesh'].values())} | {p['name']}{note} | "
            f"{_gib(p['argument_bytes'])} | {_gib(p['temp_bytes'])} | {_gib(p['resident_bytes'])} | "
            f"{_gib(p['total_bytes'])} | {_gib(p['headroom_bytes'])} | {fits} | {p['flops'] / 1e12:.1f} | "
            f"{p['compile_seconds']:.0f} |"
        )
        label = ""  # the preset's name once, on its first program
    return rows


HEADER = (
    "| preset | slice | mesh | program | args | temps | resident | total | headroom | fits | TFLOPs/chip | "
    "compile s |\n|---|---|---|---|---:|---:|---:|---:|---:|---|---:|---:|"
)


def tables(runs: dict[str, dict]) -> str:
    """docs/scaling.md's tables from the rows compiled so far (missing rows are listed, not invented)."""
    out = []
    sections = (
        ("Presets on their slices", "preset:"),
        ("The next smaller slice", "smaller:"),
        ("PPO: each choice undone on ppo_ptx_1p3b", "ppo:"),
        ("scan_layers off", "noscan:"),
    )
    for title, prefix in sections:
        out += [f"### {title}", "", HEADER]
        for tag, what, _ in ROWS:
            if not tag.startswith(prefix):
                continue
            if tag not in runs:
                out.append(f"| {what} | not compiled | | | | | | | | | | |")
                continue
            label = tag.split(":", 1)[1] if prefix in ("preset:", "smaller:") else what
            run = runs[tag]
            if "failed" in run:  # the compiler crashed: what it had compiled, then how it ended
                before = "; ".join(f"{name} {gib} GiB" for name, gib in run["compiled_before"]) or "nothing"
                out.append(f"| {label} | {what} | | compiler crashed ({run['failed']}) after: {before} |" + " |" * 8)
                continue
            out += _program_rows(run, label)
        out.append("")
    return "\n".join(out)


def main(argv):
    del argv
    out = pathlib.Path(_OUT.value)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "runs.jsonl"
    known = {tag for tag, _, _ in ROWS}
    unknown = sorted(set(_ONLY.value) - known)
    if unknown:
        raise app.UsageError(f"--only: unknown row tags {unknown}; known: {sorted(known)}")
    if not _TABLES_ONLY.value:
        done = _runs(path)
        todo = [(t, a) for t, _, a in ROWS if t not in done and (not _ONLY.value or t in _ONLY.value)]
        for i, (tag, args) in enumerate(todo, 1):
            print(f"[sweep] {i}/{len(todo)} {tag}: python scripts/aot_compile.py {' '.join(args)}", file=sys.stderr)
            report = compile_row(tag, args, out)
            with path.open("a") as f:
                f.write(json.dumps(report) + "\n")
            if "fits" in report:
                print(f"[sweep]   fits: {report['fits']}, {report['process_seconds']} s", file=sys.stderr)
    print(tables(_runs(path)))


if __name__ == "__main__":
    app.run(main)
