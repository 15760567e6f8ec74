"""scripts/tpu_vm.sh in --dry-run: the gcloud commands it would run, and its argument errors.

No network and no gcloud: dry-run prints each command, shell-quoted, one per line. The launch test also
runs the printed remote command in a local bash with a stand-in venv, so the quoting is checked end to end.
"""

import os
import pathlib
import shlex
import shutil
import subprocess
import time

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "tpu_vm.sh"
BASH = shutil.which("bash")
pytestmark = pytest.mark.skipif(BASH is None, reason="needs bash")

LOC = ["--name=ij-test", "--zone=us-central2-b"]
STAGE = [
    "python",
    "scripts/train_sft.py",
    "--config=configs/tpu.py:sft_1p3b",
    "--workdir=/mnt/gcs/my runs/sft",
    "--config.sft.optim.lr=1e-5",
    '--config.data.note=it\'s "quoted" $HOME',
]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TPU_VM_")}
    env["PATH"] = "/nonexistent"  # dry-run needs neither gcloud nor any other program
    env.update(extra)
    return env


def tpu_vm(*args, dry_run=True, env=None):
    argv = [BASH, str(SCRIPT), *(["--dry-run"] if dry_run else []), *args]
    return subprocess.run(argv, capture_output=True, text=True, env=env or _env(), timeout=60)


def commands(result):
    """The printed commands, each split into its argv."""
    assert result.returncode == 0, result.stderr
    return [shlex.split(line) for line in result.stdout.splitlines() if line.strip()]


def one_gcloud(result):
    cmds = [c for c in commands(result) if c[0] == "gcloud"]
    assert len(cmds) == 1, cmds
    return cmds[0]


def flag(argv, name):
    values = [a.split("=", 1)[1] for a in argv if a.startswith(name + "=")]
    assert len(values) == 1, (name, argv)
    return values[0]


def test_help_exits_zero():
    for h in ("-h", "--help"):
        r = tpu_vm(h, dry_run=False)
        assert r.returncode == 0
        for word in (
            "create",
            "copy",
            "install",
            "launch",
            "run",
            "logs",
            "stop",
            "delete",
            "ssh",
            "--dry-run",
            "Cloud TPU docs",
        ):
            assert word in r.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["create", "--zone=us-central2-b", "--accelerator=v4-8"], "missing --name"),
        (["create", "--name=ij-test", "--accelerator=v4-8"], "missing --zone"),
        (["create", *LOC], "missing --accelerator"),
        (["create", *LOC, "--accelerator=v9-16"], "--version"),
        (["create", *LOC, "--accelerator=tpu16"], "bad --accelerator"),
        (["create", "--name=My_TPU", "--zone=us-central2-b", "--accelerator=v4-8"], "bad --name"),
        (["frobnicate", *LOC], "unknown subcommand: frobnicate"),
        (["create", *LOC, "--accelerator=v4-8", "--colour=blue"], "unknown flag: --colour"),
        (["create", *LOC, "--accelerator=v4-8", "--spot", "--preemptible"], "--spot and --preemptible"),
        (["create", *LOC, "--accelerator=v4-8", "--queued", "--preemptible"], "--preemptible"),
        (["launch", *LOC], "launch needs the stage command after --"),
        (["delete", *LOC, "--", "python", "x.py"], "only launch and run"),
        (["run", *LOC], "run needs a shell command after --"),
        (["install", *LOC, "--worker=1"], "--worker applies to"),
        (["logs", *LOC, "--worker=two"], "bad --worker"),
        (["create", *LOC, "--zone"], "--zone needs a value"),
        ([], "missing subcommand"),
    ],
)
def test_bad_arguments_exit_nonzero_naming_the_problem(args, message):
    r = tpu_vm(*args)
    assert r.returncode != 0
    assert message in r.stderr
    assert r.stdout == "" or "Usage" in r.stdout


def test_without_dry_run_and_without_gcloud_it_says_so():
    r = tpu_vm("delete", *LOC, dry_run=False)
    assert r.returncode != 0 and "gcloud not found" in r.stderr


@pytest.mark.parametrize(
    "accelerator, version",
    [("v5litepod-16", "v2-alpha-tpuv5-lite"), ("v5p-128", "v2-alpha-tpuv5"), ("v4-64", "tpu-ubuntu2204-base")],
)
def test_create(accelerator, version):
    argv = one_gcloud(tpu_vm("create", *LOC, f"--accelerator={accelerator}", "--project=my-proj"))
    assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "ij-test"]
    assert flag(argv, "--accelerator-type") == accelerator
    assert flag(argv, "--version") == version
    assert flag(argv, "--zone") == "us-central2-b"
    assert flag(argv, "--project") == "my-proj"
    assert "--spot" not in argv and "--preemptible" not in argv


def test_create_options_and_env_vars():
    env = _env(TPU_VM_NAME="ij-env", TPU_VM_ZONE="europe-west4-a", TPU_VM_ACCELERATOR="v5litepod-8")
    argv = one_gcloud(tpu_vm("create", "--version=my-runtime", "--spot", env=env))
    assert argv[5] == "ij-env"
    assert flag(argv, "--zone") == "europe-west4-a"
    assert flag(argv, "--accelerator-type") == "v5litepod-8"
    assert flag(argv, "--version") == "my-runtime"
    assert "--spot" in argv
    assert not any(a.startswith("--project") for a in argv)
    argv = one_gcloud(tpu_vm("create", *LOC, "--accelerator", "v4-8", "--preemptible"))
    assert "--preemptible" in argv and flag(argv, "--accelerator-type") == "v4-8"
    # TPU_VM_DRY_RUN=1 is the same as --dry-run
    r = tpu_vm("create", *LOC, "--accelerator=v4-8", dry_run=False, env=_env(TPU_VM_DRY_RUN="1"))
    assert one_gcloud(r)[4] == "create"


def test_create_queued_resource():
    argv = one_gcloud(tpu_vm("create", *LOC, "--accelerator=v5p-128", "--queued", "--spot"))
    assert argv[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "ij-test"]
    assert flag(argv, "--node-id") == "ij-test"
    assert flag(argv, "--accelerator-type") == "v5p-128"
    assert flag(argv, "--runtime-version") == "v2-alpha-tpuv5"
    assert "--spot" in argv


def test_copy_excludes_venv_workdirs_git_and_reaches_all_workers():
    cmds = commands(tpu_vm("copy", *LOC))
    tar = next(c for c in cmds if c[0] == "tar")
    for excluded in (".venv", "workdirs", ".git"):
        assert f"--exclude={excluded}" in tar
    assert tar[tar.index("-C") + 1] == str(SCRIPT.parents[1])
    gcloud = [c for c in cmds if c[0] == "gcloud"]
    assert [c[4] for c in gcloud] == ["scp", "ssh"]
    for c in gcloud:
        assert flag(c, "--worker") == "all" and flag(c, "--zone") == "us-central2-b"
    assert "--recurse" not in gcloud[0]  # one tarball
    assert "tar -xzf" in flag(gcloud[1], "--command")


def test_install_makes_a_venv_with_the_tpu_extra_on_all_workers():
    argv = one_gcloud(tpu_vm("install", *LOC, "--remote-dir=code/ij"))
    assert argv[4:6] == ["ssh", "ij-test"] and flag(argv, "--worker") == "all"
    remote = flag(argv, "--command")
    assert remote.startswith("cd code/ij && ")
    assert "python3.11 -m venv .venv" in remote
    assert "pip install -q -e '.[tpu]'" in remote


def test_launch_runs_the_quoted_command_on_all_workers_with_distributed_set():
    argv = one_gcloud(tpu_vm("launch", *LOC, "--log=sft", "--env=XLA_FLAGS=--xla_a --xla_b", "--", *STAGE))
    assert argv[4:6] == ["ssh", "ij-test"] and flag(argv, "--worker") == "all"
    words = shlex.split(flag(argv, "--command"))
    assert "INSTRUCTJAX_DISTRIBUTED=1" in words and "XLA_FLAGS=--xla_a --xla_b" in words
    i = words.index("nohup")
    assert words[i + 1 : i + 1 + len(STAGE)] == STAGE
    assert words[i + 1 + len(STAGE) : i + 3 + len(STAGE)] == [">>", "logs/sft.log"]
    assert words.index("INSTRUCTJAX_DISTRIBUTED=1") < i
    assert words[-1] == "}" and "&" in words


def test_launch_remote_command_runs_in_a_shell(tmp_path):
    """Run the printed remote command with bash, a stand-in venv and a stand-in python that records argv."""
    remote_dir = tmp_path / "instructjax"
    (remote_dir / ".venv" / "bin").mkdir(parents=True)
    record = tmp_path / "argv.txt"
    fake_python = remote_dir / ".venv" / "bin" / "python"
    fake_python.write_text(
        f'#!{BASH}\n{{ echo "DIST=$INSTRUCTJAX_DISTRIBUTED"; echo "CWD=$PWD"; printf "%s\\n" "$@"; }} > {record}.tmp\n'
        f"mv {record}.tmp {record}\n"
    )
    fake_python.chmod(0o755)
    (remote_dir / ".venv" / "bin" / "activate").write_text(f'PATH="{remote_dir}/.venv/bin:$PATH"\n')

    argv = one_gcloud(tpu_vm("launch", *LOC, f"--remote-dir={remote_dir}", "--", *STAGE))
    env = _env(HOME=str(tmp_path), PATH=os.environ["PATH"])
    subprocess.run([BASH, "-c", flag(argv, "--command")], check=True, env=env, timeout=60)
    deadline = time.time() + 30
    while not record.exists() and time.time() < deadline:
        time.sleep(0.05)
    lines = record.read_text().splitlines()
    assert lines[0] == "DIST=1" and lines[1] == f"CWD={remote_dir}"
    assert lines[2:] == STAGE[1:]
    assert (remote_dir / "logs" / "train.pid").read_text().strip().isdigit()
    assert (remote_dir / "logs" / "train.log").exists()

    # a second launch while the pid file names a live process is refused
    (remote_dir / "logs" / "train.pid").write_text(f"{os.getpid()}\n")
    r = subprocess.run([BASH, "-c", flag(argv, "--command")], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode != 0 and "still running" in r.stderr


def test_logs_stop_and_ssh():
    argv = one_gcloud(tpu_vm("logs", *LOC))
    assert flag(argv, "--worker") == "0" and "instructjax/logs/train.log" in flag(argv, "--command")
    argv = one_gcloud(tpu_vm("logs", *LOC, "--worker=3", "--log=rm"))
    assert flag(argv, "--worker") == "3" and "instructjax/logs/rm.log" in flag(argv, "--command")
    argv = one_gcloud(tpu_vm("stop", *LOC))
    assert flag(argv, "--worker") == "all" and "kill -TERM" in flag(argv, "--command")
    argv = one_gcloud(tpu_vm("ssh", *LOC, "--worker=1"))
    assert argv[4:6] == ["ssh", "ij-test"] and flag(argv, "--worker") == "1"
    assert not any(a.startswith("--command") for a in argv)


def test_run_passes_a_shell_command_to_every_worker_or_one():
    argv = one_gcloud(tpu_vm("run", *LOC, "--", "mkdir -p /mnt/gcs && ls", "/mnt/gcs"))
    assert flag(argv, "--worker") == "all" and flag(argv, "--command") == "mkdir -p /mnt/gcs && ls /mnt/gcs"
    argv = one_gcloud(tpu_vm("run", *LOC, "--worker=2", "--", "hostname"))
    assert flag(argv, "--worker") == "2" and flag(argv, "--command") == "hostname"


def test_delete_targets_the_vm_or_the_queued_resource():
    argv = one_gcloud(tpu_vm("delete", *LOC, "--project=my-proj"))
    assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "ij-test"]
    assert "--quiet" in argv and flag(argv, "--zone") == "us-central2-b" and flag(argv, "--project") == "my-proj"
    argv = one_gcloud(tpu_vm("delete", *LOC, "--queued"))
    assert argv[:6] == ["gcloud", "compute", "tpus", "queued-resources", "delete", "ij-test"]
    assert "--quiet" in argv and "--force" in argv
