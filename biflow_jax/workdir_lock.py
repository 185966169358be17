"""One writer per workdir: WORKDIR/writer.lock names the owner (host, pid, start time).

A second run on a live workdir stops with WorkdirBusyError before it writes anything.
The file is held with an advisory `flock` for the life of the run, so a run killed with
SIGKILL frees it: a lock left by a dead process on this host is taken over with a
warning. A lock from another host is stale only when its owner stopped refreshing it
(HEARTBEAT_S) for STALE_AFTER_S, since that host's processes cannot be checked from here.
Only process 0 holds it, without a collective (process 0 alone may be inside Orbax's
barriers at that moment, e.g. sampling after a stage): when it stops on a busy workdir, the
other processes stop with it, as with any failure of process 0 (its coordination service
goes away). Re-entrant within a process (the job takes it, then each stage's loop).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator

import jax
from absl import logging

from biflow_jax.errors import UnwritableError, WorkdirBusyError

LOCK_FILE = "writer.lock"
HEARTBEAT_S = 60.0
STALE_AFTER_S = 600.0

_held: dict[str, list] = {}  # realpath -> [fd, depth, stop event]


def _owner_text(owner: dict) -> str:
    command = f": {owner['command']}" if owner.get("command") else ""
    return f"host {owner.get('host', '?')} pid {owner.get('pid', '?')} since {owner.get('started', '?')}{command}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_owner(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 1 << 16)
    try:
        owner = json.loads(raw) if raw.strip() else {}
    except ValueError:
        owner = {}
    return owner if isinstance(owner, dict) else {}


def _take(workdir: str, command: str) -> int:
    """The open, flocked lock file of `workdir` with this process written in it; WorkdirBusyError if live."""
    path = os.path.join(workdir, LOCK_FILE)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _read_owner(fd)
            os.close(fd)
            raise WorkdirBusyError(f"workdir {workdir!r} is in use by another run: {_owner_text(owner)}; wait for "
                                   "it to finish or use another --workdir") from None
        try:  # the file may have been released (unlinked) between our open and flock: retry on the new one
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    owner = _read_owner(fd)
    if owner:
        here = owner.get("host") == socket.gethostname()
        age = time.time() - os.fstat(fd).st_mtime
        if not here and age < STALE_AFTER_S:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            raise WorkdirBusyError(f"workdir {workdir!r} is in use by a run on another host: {_owner_text(owner)}, "
                                   f"alive {age:.0f} s ago; if it is dead, delete {path!r} (or wait "
                                   f"{STALE_AFTER_S - age:.0f} s)")
        if not here:
            reason = f"its owner has not refreshed it for {age:.0f} s"
        elif _pid_alive(int(owner.get("pid", 0))):
            reason = f"pid {owner.get('pid')} no longer holds it (a reused pid)"
        else:
            reason = f"pid {owner.get('pid')} is no longer running"
        logging.warning("taking over the stale lock of workdir %r (%s): %s", workdir, _owner_text(owner), reason)
    record = {"host": socket.gethostname(), "pid": os.getpid(),
              "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "command": command}
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, json.dumps(record).encode())
    os.fsync(fd)
    return fd


def check_writable(path: str, what: str) -> None:
    """UnwritableError unless `path` can be created or written: every name fits the file system and the
    nearest existing folder is a writable directory (os.access also says EROFS for root). Checked before
    work whose results would go there."""
    path = os.path.abspath(path)
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UnwritableError(f"{what} {path!r} cannot be created: {existing!r} is a file, not a folder")
    limit = os.pathconf(existing, "PC_NAME_MAX")
    long = next((part for part in path.split(os.sep) if len(os.fsencode(part)) > limit), None)
    if long is not None:
        raise UnwritableError(f"{what} {path!r} has a name longer than the file system's {limit} bytes: "
                              f"{long[:40]!r}...")
    if not os.access(existing, os.W_OK | os.X_OK):
        why = "a read-only file system" if os.statvfs(existing).f_flag & os.ST_RDONLY else "no write permission"
        raise UnwritableError(f"{what} {path!r} cannot be written: {existing!r} is on {why}")


def _heartbeat(path: str, stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_S):
        with contextlib.suppress(OSError):
            os.utime(path)


@contextlib.contextmanager
def hold(workdir: str, command: str = "") -> Iterator[None]:
    """Own `workdir` (created if needed) for the block; WorkdirBusyError if another live run owns it."""
    key = os.path.realpath(workdir)
    if key in _held:
        _held[key][1] += 1
        try:
            yield
        finally:
            _held[key][1] -= 1
        return
    fd, created = None, not os.path.exists(workdir)
    if jax.process_index() == 0:
        check_writable(workdir, "workdir")
        try:
            os.makedirs(workdir, exist_ok=True)
            fd = _take(workdir, command or " ".join(sys.argv)[:300])
        except OSError as err:  # e.g. a full disk or a permission the check above could not see
            raise UnwritableError(f"workdir {workdir!r} cannot be written ({err.strerror or err}: "
                                  f"{err.filename or workdir})") from None
    stop = threading.Event()
    if fd is not None:
        threading.Thread(target=_heartbeat, args=(os.path.join(workdir, LOCK_FILE), stop), daemon=True).start()
    _held[key] = [fd, 1, stop]
    try:
        yield
    finally:
        del _held[key]
        stop.set()
        if fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(workdir, LOCK_FILE))  # while still flocked: no one takes a dead file
            os.close(fd)
            if created:  # a run that stopped before writing anything leaves no empty workdir behind
                with contextlib.suppress(OSError):
                    os.rmdir(workdir)
