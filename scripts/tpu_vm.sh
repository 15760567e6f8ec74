#!/usr/bin/env bash
# Drive a Cloud TPU VM (single host or pod slice) for instructjax with the gcloud CLI.
# See docs/tpu.md for the walk-through; `scripts/tpu_vm.sh --help` for every option.
set -euo pipefail

PROG="${0##*/}"
SCRIPT_DIR="${BASH_SOURCE[0]%/*}"
[[ "$SCRIPT_DIR" != "${BASH_SOURCE[0]}" ]] || SCRIPT_DIR=.
ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"

usage() {
  local text
  IFS= read -r -d '' text <<EOF || true
Usage: $PROG SUBCOMMAND [OPTIONS] [-- STAGE COMMAND]

Drive a Cloud TPU VM (one host or a multi-host pod slice) with the gcloud CLI.

Subcommands:
  create    create the TPU VM (or, with --queued, a queued resource whose node is NAME)
  status    describe the TPU VM (or the queued resource)
  copy      copy this checkout to every worker (tar without .venv, workdirs, .git, caches; then scp)
  install   on every worker: make a venv in the remote dir and pip install -e '.[tpu]'
  launch    run the stage command given after -- on every worker at once, in the background
            (nohup), with INSTRUCTJAX_DISTRIBUTED=1; each worker appends to REMOTE_DIR/logs/LOG.log;
            refused while the previous LOG run is still alive on a worker
  run       run the shell command given after -- in the foreground on every worker (or --worker=N),
            e.g. to mount the shared workdir; the words are joined with spaces for the remote shell
  logs      follow the log of one worker (worker 0 unless --worker=N)
  stop      send SIGTERM to the launched command on every worker (the stage saves a checkpoint, exits)
  ssh       open a shell on one worker (worker 0 unless --worker=N)
  delete    delete the TPU VM (or, with --queued, the queued resource and its node); asks nothing

Options (flag, or environment variable):
  --name=NAME            TPU_VM_NAME         TPU VM name (lowercase letters, digits, hyphens); required
  --zone=ZONE            TPU_VM_ZONE         zone, e.g. us-central2-b; required
  --project=PROJECT      TPU_VM_PROJECT      GCP project (default: gcloud's configured project)
  --accelerator=TYPE     TPU_VM_ACCELERATOR  accelerator type, e.g. v5litepod-16, v5p-128, v4-64 (create)
  --version=RUNTIME      TPU_VM_VERSION      TPU runtime version (create); default by accelerator family:
                                               v5litepod-*/v5e-* -> v2-alpha-tpuv5-lite
                                               v5p-*             -> v2-alpha-tpuv5
                                               v6e-*             -> v2-alpha-tpuv6e
                                               v2-*, v3-*, v4-*  -> tpu-ubuntu2204-base
                                             Check these against the current Cloud TPU docs
                                             ("gcloud compute tpus tpu-vm versions list --zone=ZONE").
  --queued               TPU_VM_QUEUED=1     create/status/delete a queued resource named NAME (node NAME)
  --spot                                     create Spot TPU VMs
  --preemptible                              create a preemptible TPU VM (not with --queued; use --spot)
  --remote-dir=DIR       TPU_VM_REMOTE_DIR   code directory on the workers, relative to the remote home
                                             unless absolute (default: instructjax)
  --python=PY            TPU_VM_PYTHON       interpreter for the venv (default: python3.11; instructjax
                                             needs >= 3.11; install apt-installs PY and PY-venv if missing)
  --log=LOG              TPU_VM_LOG          launch/logs/stop: REMOTE_DIR/logs/LOG.log and LOG.pid
                                             (default: train)
  --env=KEY=VALUE                            launch: extra environment for the command (repeatable)
  --worker=N                                 logs/ssh: worker index (default: 0); run: (default: all)
  --dry-run              TPU_VM_DRY_RUN=1    print every command (gcloud, and the local tar for copy) one
                                             per line, shell-quoted, instead of running it; needs no gcloud
  -h, --help                                 this help

Example: the TPU preset sft_1p3b of configs/tpu.py on the slice it names, its tpu_slice, which
  python scripts/config_info.py --config=configs/tpu.py:sft_1p3b
prints (every preset: --config=configs/tpu.py); a v5e slice AxB is the accelerator type v5litepod-CHIPS
with CHIPS = A*B.
  export TPU_VM_NAME=ij-v5e TPU_VM_ZONE=us-west4-a
  $PROG create --accelerator=v5litepod-CHIPS --spot
  $PROG copy && $PROG install
  $PROG launch --log=sft -- python scripts/train_sft.py --config=configs/tpu.py:sft_1p3b \\
      --workdir=/mnt/gcs/run/sft
  $PROG logs --log=sft
  $PROG delete

The workdir must be a path every worker sees (a gcsfuse-mounted bucket, Filestore/NFS): see docs/tpu.md.
EOF
  printf '%s' "$text"
}

die() {
  echo "$PROG: error: $*" >&2
  echo "Run '$PROG --help' for usage." >&2
  exit 2
}

# Quote one word for a POSIX shell, as Python's shlex.quote does.
q() {
  local s="$1"
  if [[ -z "$s" ]]; then
    printf "''"
  elif [[ "$s" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$s"
  else
    printf "'%s'" "${s//\'/\'\"\'\"\'}"
  fi
}

# Quote every word and join with spaces.
qjoin() {
  local out="" w
  for w in "$@"; do
    out+="${out:+ }$(q "$w")"
  done
  printf '%s' "$out"
}

is_true() {
  case "${1:-}" in "" | 0 | false | no) return 1 ;; *) return 0 ;; esac
}

# Run a command, or only print it under --dry-run.
run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    qjoin "$@"
    echo
  else
    echo "+ $(qjoin "$@")" >&2
    "$@"
  fi
}

default_version() {
  case "$1" in
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    v2-* | v3-* | v4-*) echo tpu-ubuntu2204-base ;;
    *) return 1 ;;
  esac
}

# --- arguments -----------------------------------------------------------------------------------
NAME="${TPU_VM_NAME:-}"
ZONE="${TPU_VM_ZONE:-}"
PROJECT="${TPU_VM_PROJECT:-}"
ACCELERATOR="${TPU_VM_ACCELERATOR:-}"
VERSION="${TPU_VM_VERSION:-}"
REMOTE_DIR="${TPU_VM_REMOTE_DIR:-instructjax}"
PYTHON="${TPU_VM_PYTHON:-python3.11}"
LOG="${TPU_VM_LOG:-train}"
QUEUED=0
is_true "${TPU_VM_QUEUED:-}" && QUEUED=1
DRY_RUN=0
is_true "${TPU_VM_DRY_RUN:-}" && DRY_RUN=1
SPOT=0
PREEMPTIBLE=0
WORKER=0
WORKER_SET=0
EXTRA_ENV=()
SUBCOMMAND=""
STAGE_CMD=()
HAVE_STAGE_CMD=0

# value_of FLAG "$@": the value of --flag=VALUE or --flag VALUE; sets SHIFT to the words consumed.
value_of() {
  local flag="$1" arg="$2"
  if [[ "$arg" == *=* ]]; then
    VALUE="${arg#*=}"
    SHIFT=1
  elif [[ $# -ge 3 ]]; then
    VALUE="$3"
    SHIFT=2
  else
    die "$flag needs a value"
  fi
  [[ -n "$VALUE" ]] || die "$flag needs a non-empty value"
}

while [[ $# -gt 0 ]]; do
  arg="$1"
  case "$arg" in
    -h | --help)
      usage
      exit 0
      ;;
    --)
      shift
      STAGE_CMD=("$@")
      HAVE_STAGE_CMD=1
      break
      ;;
    --name | --name=*) value_of --name "$@" && NAME="$VALUE" && shift "$SHIFT" ;;
    --zone | --zone=*) value_of --zone "$@" && ZONE="$VALUE" && shift "$SHIFT" ;;
    --project | --project=*) value_of --project "$@" && PROJECT="$VALUE" && shift "$SHIFT" ;;
    --accelerator | --accelerator=*) value_of --accelerator "$@" && ACCELERATOR="$VALUE" && shift "$SHIFT" ;;
    --version | --version=*) value_of --version "$@" && VERSION="$VALUE" && shift "$SHIFT" ;;
    --remote-dir | --remote-dir=*) value_of --remote-dir "$@" && REMOTE_DIR="$VALUE" && shift "$SHIFT" ;;
    --python | --python=*) value_of --python "$@" && PYTHON="$VALUE" && shift "$SHIFT" ;;
    --log | --log=*) value_of --log "$@" && LOG="$VALUE" && shift "$SHIFT" ;;
    --env | --env=*) value_of --env "$@" && EXTRA_ENV+=("$VALUE") && shift "$SHIFT" ;;
    --worker | --worker=*) value_of --worker "$@" && WORKER="$VALUE" && WORKER_SET=1 && shift "$SHIFT" ;;
    --queued) QUEUED=1 && shift ;;
    --spot) SPOT=1 && shift ;;
    --preemptible) PREEMPTIBLE=1 && shift ;;
    --dry-run) DRY_RUN=1 && shift ;;
    -*) die "unknown flag: $arg" ;;
    *)
      [[ -z "$SUBCOMMAND" ]] || die "unexpected argument: $arg (the stage command goes after --)"
      SUBCOMMAND="$arg"
      shift
      ;;
  esac
done

# --- validation ----------------------------------------------------------------------------------
if [[ -z "$SUBCOMMAND" ]]; then
  usage >&2
  die "missing subcommand (create, status, copy, install, launch, run, logs, stop, ssh, delete)"
fi
case "$SUBCOMMAND" in
  create | status | copy | install | launch | run | logs | stop | ssh | delete) ;;
  *)
    die "unknown subcommand: $SUBCOMMAND" \
      "(expected create, status, copy, install, launch, run, logs, stop, ssh, delete)"
    ;;
esac

[[ -n "$NAME" ]] || die "missing --name (or TPU_VM_NAME): the TPU VM name"
[[ "$NAME" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ && ${#NAME} -le 63 ]] ||
  die "bad --name '$NAME': use lowercase letters, digits and hyphens, starting with a letter (at most 63)"
[[ -n "$ZONE" ]] || die "missing --zone (or TPU_VM_ZONE): the zone of the TPU VM, e.g. us-central2-b"
[[ "$ZONE" =~ ^[a-z]+-[a-z]+[0-9]+-[a-z]$ ]] || die "bad --zone '$ZONE': expected a zone such as us-central2-b"
[[ "$WORKER" =~ ^[0-9]+$ ]] || die "bad --worker '$WORKER': expected a worker index (0, 1, ...)"
[[ "$LOG" =~ ^[A-Za-z0-9_.-]+$ ]] || die "bad --log '$LOG': use letters, digits, '_', '.' and '-'"
for kv in ${EXTRA_ENV[@]+"${EXTRA_ENV[@]}"}; do
  [[ "$kv" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "bad --env '$kv': expected KEY=VALUE"
done
if [[ "$HAVE_STAGE_CMD" == 1 && "$SUBCOMMAND" != launch && "$SUBCOMMAND" != run ]]; then
  die "only launch and run take a command after --"
fi
if [[ "$WORKER_SET" == 1 && "$SUBCOMMAND" != logs && "$SUBCOMMAND" != ssh && "$SUBCOMMAND" != run ]]; then
  die "--worker applies to logs, ssh and run only ($SUBCOMMAND runs on all workers)"
fi
if [[ "$SUBCOMMAND" != create ]]; then
  [[ "$SPOT" == 0 ]] || die "--spot applies to create only"
  [[ "$PREEMPTIBLE" == 0 ]] || die "--preemptible applies to create only"
fi

if [[ "$DRY_RUN" != 1 ]] && ! command -v gcloud >/dev/null 2>&1; then
  die "gcloud not found: install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install) or use --dry-run"
fi

# Flags every gcloud command takes.
LOC=("--zone=$ZONE")
[[ -z "$PROJECT" ]] || LOC+=("--project=$PROJECT")
TPU=(gcloud compute tpus tpu-vm)
QR=(gcloud compute tpus queued-resources)
QDIR="$(q "$REMOTE_DIR")"

# Run a shell command on workers: on_workers WORKER COMMAND
on_workers() {
  run "${TPU[@]}" ssh "$NAME" "${LOC[@]}" "--worker=$1" "--command=$2"
}

# --- subcommands ---------------------------------------------------------------------------------
case "$SUBCOMMAND" in
  create)
    [[ -n "$ACCELERATOR" ]] || die "missing --accelerator (or TPU_VM_ACCELERATOR), e.g. v5litepod-16, v5p-128, v4-64"
    [[ "$ACCELERATOR" =~ ^v[0-9][a-z0-9]*-[0-9]+$ ]] ||
      die "bad --accelerator '$ACCELERATOR': expected TYPE-SIZE such as v5litepod-16, v5p-128 or v4-64"
    if [[ -z "$VERSION" ]]; then
      VERSION="$(default_version "$ACCELERATOR")" ||
        die "no default runtime --version for accelerator '$ACCELERATOR': pass --version (see the Cloud TPU docs)"
    fi
    [[ "$SPOT" == 0 || "$PREEMPTIBLE" == 0 ]] || die "--spot and --preemptible exclude each other"
    if [[ "$QUEUED" == 1 ]]; then
      [[ "$PREEMPTIBLE" == 0 ]] || die "--preemptible does not apply to --queued; use --spot"
      cmd=("${QR[@]}" create "$NAME" "${LOC[@]}" "--node-id=$NAME" "--accelerator-type=$ACCELERATOR"
        "--runtime-version=$VERSION")
    else
      cmd=("${TPU[@]}" create "$NAME" "${LOC[@]}" "--accelerator-type=$ACCELERATOR" "--version=$VERSION")
    fi
    [[ "$SPOT" == 0 ]] || cmd+=(--spot)
    [[ "$PREEMPTIBLE" == 0 ]] || cmd+=(--preemptible)
    run "${cmd[@]}"
    ;;

  status)
    if [[ "$QUEUED" == 1 ]]; then
      run "${QR[@]}" describe "$NAME" "${LOC[@]}"
    else
      run "${TPU[@]}" describe "$NAME" "${LOC[@]}"
    fi
    ;;

  copy)
    tarball="${TMPDIR:-/tmp}/instructjax-$NAME.tar.gz"
    run tar -czf "$tarball" --exclude=.venv --exclude=workdirs --exclude=.git --exclude=__pycache__ \
      --exclude=.pytest_cache --exclude=.ruff_cache --exclude=.ipynb_checkpoints -C "$ROOT" .
    run "${TPU[@]}" scp "$tarball" "$NAME:instructjax.tar.gz" "${LOC[@]}" --worker=all
    on_workers all "mkdir -p $QDIR && tar -xzf instructjax.tar.gz -C $QDIR && rm instructjax.tar.gz"
    run rm -f "$tarball"
    ;;

  install)
    py="$(q "$PYTHON")"
    # Debian/Ubuntu ship venv's ensurepip in PY-venv: install PY and PY-venv when either is missing.
    need_py="if ! $py -c 'import ensurepip, venv' >/dev/null 2>&1; then"
    need_py+=" sudo apt-get update -q && sudo apt-get install -y -q $py $(q "$PYTHON-venv"); fi"
    pip=".venv/bin/pip install -q"
    on_workers all "cd $QDIR && $need_py && $py -m venv .venv && $pip -U pip && $pip -e '.[tpu]'"
    ;;

  launch)
    [[ "$HAVE_STAGE_CMD" == 1 && ${#STAGE_CMD[@]} -gt 0 ]] ||
      die "launch needs the stage command after --, e.g." \
        "-- python scripts/train_sft.py --config=configs/tpu.py:sft_1p3b --workdir=/mnt/gcs/run/sft"
    envs="INSTRUCTJAX_DISTRIBUTED=1"
    for kv in ${EXTRA_ENV[@]+"${EXTRA_ENV[@]}"}; do
      envs+=" ${kv%%=*}=$(q "${kv#*=}")"
    done
    # Refuses to start while logs/LOG.pid names a live process; appends to the log (a rerun resumes).
    pid="logs/$LOG.pid"
    running="if [ -f $pid ] && kill -0 \$(cat $pid) 2>/dev/null; then"
    running+=" echo \"\$(hostname): $LOG is still running (pid \$(cat $pid)); stop it first\" >&2; exit 1; fi"
    start="{ $envs nohup $(qjoin "${STAGE_CMD[@]}") >> logs/$LOG.log 2>&1 < /dev/null & echo \$! > $pid ; }"
    on_workers all "cd $QDIR && . .venv/bin/activate && mkdir -p logs && $running && $start"
    ;;

  run)
    [[ "$HAVE_STAGE_CMD" == 1 && ${#STAGE_CMD[@]} -gt 0 ]] ||
      die "run needs a shell command after --, e.g. -- 'ls /mnt/gcs'"
    [[ "$WORKER_SET" == 1 ]] || WORKER=all
    on_workers "$WORKER" "${STAGE_CMD[*]}"
    ;;

  logs)
    on_workers "$WORKER" "tail -n 100 -F $QDIR/logs/$LOG.log"
    ;;

  stop)
    on_workers all "cd $QDIR && if [ -f logs/$LOG.pid ]; then kill -TERM \$(cat logs/$LOG.pid) || true; fi"
    ;;

  ssh)
    run "${TPU[@]}" ssh "$NAME" "${LOC[@]}" "--worker=$WORKER"
    ;;

  delete)
    if [[ "$QUEUED" == 1 ]]; then
      run "${QR[@]}" delete "$NAME" "${LOC[@]}" --force --quiet
    else
      run "${TPU[@]}" delete "$NAME" "${LOC[@]}" --quiet
    fi
    ;;
esac
