"""One run per stage workdir: a lock taken when a stage opens and released however it ends.

``hold(workdir)`` is the ``with`` block around every stage's ``train()`` body; a second launch on a workdir a
live run holds raises ``WorkdirBusy`` naming the holder (host, pid, since when, its command) before it writes
anything. The lock is the kernel's (``fcntl.flock`` on ``workdir/.lock``), so a process that dies, however it
dies, releases it: a stale file never blocks a rerun.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import pathlib
import shlex
import socket
import sys
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

LOCK_FILE = ".lock"  # inside a workdir while a run holds it


class WorkdirBusy(RuntimeError):
    """A stage was started on a workdir that another live run holds (``hold``)."""


@contextlib.contextmanager
def hold(workdir: str | pathlib.Path) -> Iterator[WorkdirLock]:
    """Hold ``workdir`` for one run: a second launch on it while this one lives raises ``WorkdirBusy`` naming
    this run's process (host, pid, since when, its command) before it writes anything. Released however the
    block ends (return, exception, SIGTERM's save-and-exit); a process killed outright (SIGKILL, OOM, a lost
    host) leaves ``workdir/.lock`` behind, which never blocks a rerun, since the lock itself is the kernel's.

    How: ``workdir/.lock`` holds the holder's JSON (``host``, ``pid``, ``started``, ``command``) and the run
    keeps it open with an exclusive ``fcntl.flock``. The kernel drops an flock when the last descriptor of the
    open file goes (the process exits, however it dies), so a stale file is just rewritten by the next run.
    The descriptor is not inherited across exec; a child made by a bare ``os.fork`` (multiprocessing's ``fork``
    start) would share it and keep the lock until it exits too, which the error message then says.

    Multi-host: one lock per run, taken by process 0 alone (the others would otherwise refuse their own run on
    a shared filesystem); process 0's outcome is broadcast, so when it refuses, every process of the launch
    raises (none hangs in a collective). Hence what a second launch sees depends on where its process 0 runs:

    - on the same host as the running job's process 0 (relaunching the same job, a TPU slice's worker 0):
      always refused, on any filesystem;
    - on another host sharing the workdir: refused only where the filesystem makes flock visible across
      clients. Linux maps flock on NFS to NFS byte-range locks, which NFSv4 and NFSv3 with a lock manager
      honour; a mount with ``nolock``/``local_lock``, gcsfuse and other FUSE stores keep locks local to each
      host, so that second launch is NOT refused there: keep one launcher per workdir. The message names the
      other host, whose pid cannot be checked from here; a lock held by a host that died goes when the file
      server's lease expires (NFSv4: about 90 s).

    A filesystem without flock support at all (the call fails with ENOLCK/EOPNOTSUPP) runs unlocked, with a
    printed warning, rather than refusing to train.
    """
    lock = WorkdirLock(workdir)
    outcome, error = 0, None  # 0 held (or not process 0), 1 busy, 2 another error
    if jax.process_index() == 0:
        try:
            lock.acquire()
        except WorkdirBusy as e:
            outcome, error = 1, e
        except Exception as e:  # the other processes must still hear of it below
            outcome, error = 2, e
    if jax.process_count() > 1:
        outcome = int(multihost_utils.broadcast_one_to_all(np.asarray(outcome, np.int32)))
    if error is not None:
        raise error
    if outcome == 1:
        raise WorkdirBusy(
            f"{lock.workdir} is in use by another run: process 0 of this launch found its lock ({lock.path}) held "
            "and refused; its error names the holder. Wait for that run to finish, or stop it"
        )
    if outcome == 2:
        raise RuntimeError(f"process 0 of this launch could not lock {lock.path}; its error says why")
    try:
        yield lock
    finally:
        lock.release()


class WorkdirLock:
    """The flock on ``workdir/.lock`` behind ``hold`` (one process's side of it): ``acquire`` creates the
    workdir, locks the file without waiting and writes this process's details into it; ``release`` removes
    the file and drops the lock. Two ``WorkdirLock``s exclude each other even within one process."""

    def __init__(self, workdir: str | pathlib.Path):
        self.workdir = pathlib.Path(workdir)
        self.path = self.workdir / LOCK_FILE
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock, or raise ``WorkdirBusy`` naming the live process that holds it."""
        if self._fd is not None:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise WorkdirBusy(busy_message(self.workdir, holder)) from None
            except OSError as e:  # no flock on this filesystem: run, but say so
                os.close(fd)
                print(f"warning: cannot lock {self.path} ({e}): a second run here is not refused", flush=True)
                return
            if _same_file(fd, self.path):
                break
            os.close(fd)  # the run before removed this file as it released it: lock the new one
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(_this_process(), indent=1) + "\n").encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Remove the lock file (while still holding it, so no other run's file is removed) and drop the lock."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            if _same_file(fd, self.path):
                self.path.unlink()
        except OSError:
            pass  # the lock goes with the descriptor anyway
        finally:
            os.close(fd)


def busy_message(workdir: pathlib.Path, holder: dict) -> str:
    """The ``WorkdirBusy`` message: the workdir, the process holding it and what to do."""
    pid, host = holder.get("pid"), holder.get("host")
    if pid is None:
        who = "a process that has not written its details yet (it is starting)"
    else:
        who = f"pid {pid} on host {host}, since {holder.get('started', '?')}, running: {holder.get('command', '?')}"
    note = ""
    if host == socket.gethostname() and isinstance(pid, int):
        if pid == os.getpid():
            note = " (this very process: a stage started again on the workdir it is already running in)"
        elif not _alive(pid):
            note = (
                f" (pid {pid} is gone, but a process it forked still has {workdir / LOCK_FILE} open: "
                f"`fuser -v {workdir / LOCK_FILE}` names it)"
            )
    return (
        f"{workdir} is in use by another run: {who}{note}. One run per workdir: wait for it to finish, or stop it "
        f"(`kill {pid if pid is not None else '<pid>'}` on {host or 'its host'} sends SIGTERM: it saves a checkpoint "
        "and exits, and rerunning resumes from it), or give this run another --workdir. A lock left by a process "
        "that died is ignored automatically: there is no lock file to delete."
    )


def _this_process() -> dict[str, Any]:
    argv = getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv]
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": shlex.join(argv),
    }


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        holder = json.loads(os.pread(fd, 1 << 16, 0).decode())
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _same_file(fd: int, path: pathlib.Path) -> bool:
    """Whether ``path`` still names the file open as ``fd`` (a releasing run may have unlinked it)."""
    try:
        st, fst = os.stat(path), os.fstat(fd)
    except FileNotFoundError:
        return False
    return (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
