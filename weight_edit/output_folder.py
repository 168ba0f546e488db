"""The output folder of `apply` (checkpoint or adapter): checks before anything is computed, the lock that keeps
two runs from writing the same folder, the staging folder beside it and the atomic replace at the end.

A result is built in `.OUT.partial-PID` beside OUT and appears at OUT only once complete (an older result is
removed only after the swap); while a run writes OUT it holds `OUT.weight-edit.lock`, so a second run for the same
OUT stops instead of replacing the first. Staging folders of killed runs are cleared by the next run.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from weight_edit.errors import WeightEditError

LOCK_SUFFIX = ".weight-edit.lock"  # OUT.weight-edit.lock, beside OUT, while a run writes OUT
UNREADABLE_LOCK_STALE_S = 60  # a lock with no readable owner (killed between create and write) is stale after this


class OutputError(WeightEditError):
    """The requested output location is unsafe or occupied."""


def check_writable_dir(folder: Path, what: str) -> None:
    """Fail now, in one line, not after minutes of computing, when `folder` could not be created or written:
    its nearest existing ancestor must be a folder that takes a probe file. Nothing is left behind."""
    folder = Path(folder).absolute()
    ancestor = next(a for a in (folder, *folder.parents) if a.exists() or a.is_symlink())
    if not ancestor.is_dir():
        raise OutputError(f"{what} {folder}: {ancestor} is a file, not a folder")
    try:
        with tempfile.NamedTemporaryFile(dir=ancestor, prefix=".weight-edit-write-probe-"):
            pass
    except OSError as exc:
        raise OutputError(f"{what} {folder} cannot be written ({ancestor}: {exc.strerror or exc})") from exc


def output_lock_path(out: Path) -> Path:
    return out.with_name(out.name + LOCK_SUFFIX)


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _process_start(pid: int) -> str | None:
    """The process's start time (clock ticks since boot, /proc/PID/stat field 22): tells a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 else None


def _owner_alive(record: dict[str, Any]) -> bool | None:
    """Whether the run that wrote a lock record is still running; None when it ran on another host (unknowable)."""
    if record.get("host") != socket.gethostname():
        return None
    boot = _boot_id()
    if boot and record.get("boot_id") and record["boot_id"] != boot:
        return False  # taken before this machine last booted
    pid = record.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, owned by another user
    started = record.get("started")
    current = _process_start(pid)
    return not (started is not None and current is not None and current != started)


def _remove_stale_lock(lock: Path, seen: os.stat_result) -> None:
    """Remove the stale lock judged from `seen`, never a fresh one another run created in the meantime.

    The lock is first renamed to a name of our own (atomic); if that file is not the one judged stale (another
    run replaced it between our read and the rename), it is linked back under the lock's name.
    """
    grave = lock.with_name(f"{lock.name}.stale-{os.getpid()}-{threading.get_ident()}")
    try:
        os.replace(lock, grave)
    except FileNotFoundError:
        return  # another run removed it first
    moved = grave.stat()
    if (moved.st_dev, moved.st_ino) != (seen.st_dev, seen.st_ino):
        try:
            os.link(grave, lock)
        except FileExistsError:
            pass
    grave.unlink()


def _lock_holder(lock: Path) -> tuple[str, os.stat_result] | None:
    """Who holds `lock` (a description for the error), or None when the lock is stale (or already gone)."""
    try:
        seen = lock.stat()
        text = lock.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        record = json.loads(text)
        if not isinstance(record, dict):
            raise ValueError
    except ValueError:
        age = time.time() - seen.st_mtime
        if age > UNREADABLE_LOCK_STALE_S:
            _remove_stale_lock(lock, seen)
            return None
        return f"a run whose lock is still being written ({age:.0f} s ago)", seen
    alive = _owner_alive(record)
    if alive is False:
        _remove_stale_lock(lock, seen)
        return None
    since = record.get("created_unix")
    when = f", since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(since))}" if isinstance(since, int) else ""
    who = f"pid {record.get('pid')} on {record.get('host')}{when}"
    if alive is None:
        who += " (another host: whether it still runs cannot be checked from here)"
    return who, seen


@contextmanager
def output_lock(out: Path) -> Iterator[Path]:
    """Hold OUT.weight-edit.lock (created with O_CREAT|O_EXCL, holding pid and host) while OUT is written.

    A second run for the same OUT gets an OutputError naming the lock file and the holder's pid. A lock
    whose process is gone (dead pid on this host, a reused pid, or a boot since) is removed and taken over.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = output_lock_path(out)
    record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "boot_id": _boot_id(),
        "started": _process_start(os.getpid()),
        "created_unix": int(time.time()),
        "out": str(out),
    }
    for _ in range(5):  # each retry follows the removal of a stale lock
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _lock_holder(lock)
            if holder is None:
                continue
            raise OutputError(
                f"--out {out} is being written by another `weight-edit apply` ({holder[0]}); lock file {lock}. "
                "Wait for that run to finish; if it no longer runs, delete the lock file."
            ) from None
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
            mine = lock.stat()
        except BaseException:
            lock.unlink(missing_ok=True)  # disk full or interrupted: leave no lock without an owner
            raise
        break
    else:
        raise OutputError(f"could not take the lock {lock} for --out {out}: other runs keep replacing it")
    try:
        yield lock
    finally:
        try:
            now = lock.stat()
            if (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino):
                lock.unlink()
        except FileNotFoundError:
            pass


def check_output_location(source: Path, out: Path, force: bool) -> None:
    """Refuse outputs that could damage the source or silently replace a result."""
    source, out = source.resolve(), out.resolve()
    if out == source or source in out.parents or out in source.parents:
        raise OutputError(f"--out {out} must not be, contain, or lie inside the source {source}")
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise OutputError(f"--out {out} is not empty; pass --force to replace it")


def new_staging(out: Path) -> Path:
    """An empty folder beside `out` to build a result in, after clearing what killed runs left behind."""
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_staging(out)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    return staging


def _remove_abandoned_staging(out: Path) -> None:
    """Delete staging folders of earlier runs for the same --out whose process no longer exists (killed)."""
    for staging in out.parent.glob(f".{out.name}.partial-*"):
        pid = staging.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(staging, ignore_errors=True)


def replace_atomically(staging: Path, out: Path) -> None:
    """Move the finished staging folder to `out`; an old result is removed only after the swap."""
    if out.exists():
        retired = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, retired)
        os.replace(staging, out)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        os.replace(staging, out)
