"""Safe files: atomic writes through exclusive, randomly named temporaries, and one writer per folder.

A reader, or a run killed mid-write, sees the old file or the new one, never half; a symlink planted where a
temporary would go is never followed (temporaries are created fresh with O_EXCL under a random name). A folder
that a command writes is held with :func:`folder_lock`: a second writer is refused at once with a message
naming the holder, and a lock left by a dead process (even one killed with ``kill -9``) is no obstacle; nor are
the temporaries such a process left half-written: they are removed when the folder is next held.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

LOCK_NAME = ".sasoftmax.lock"
"""The lock file :func:`folder_lock` keeps in the folder it holds (removed when released)."""


class FolderInUse(ValueError):
    """Another live process holds the folder's lock."""


_TEMPORARY = re.compile(r"\..+\.[A-Za-z0-9_]{8}\.tmp")
"""The names :func:`temporary` gives (``tempfile.mkstemp`` adds 8 random characters)."""


def temporary(folder: Path, name: str) -> Path:
    """A new empty file in ``folder`` with a random name starting ``.name.``, created exclusively (never through
    an existing file or symlink); the caller renames or deletes it."""
    fd, path = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    return Path(path)


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a fresh temporary beside ``path``, then rename it over ``path``; on error the
    temporary is removed and ``path`` is untouched."""
    path = Path(path)
    tmp = temporary(path.parent, path.name)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: Path, data: object) -> None:
    """Write ``data`` as indented JSON atomically (strict JSON: NaN or infinity raise ValueError)."""
    text = json.dumps(data, indent=2, allow_nan=False) + "\n"
    write_atomic(path, lambda tmp: tmp.write_text(text))


def read_json(path: Path, expected: type = dict) -> object:
    """The JSON value in ``path``, which must be of type ``expected``; ValueError naming the file otherwise."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is corrupt or unreadable: {err}") from err
    if not isinstance(data, expected):
        raise ValueError(f"{path} is corrupt: expected a JSON {expected.__name__}, found {type(data).__name__}")
    return data


def is_leftover(path: Path) -> bool:
    """Whether ``path`` is a lock file or a :func:`temporary`: what a writer killed with ``kill -9`` may leave."""
    return path.name == LOCK_NAME or (_TEMPORARY.fullmatch(path.name) is not None and path.is_file())


def has_entries(folder: Path) -> bool:
    """Whether ``folder`` holds anything besides a lock file and temporaries (see :func:`is_leftover`)."""
    return any(not is_leftover(p) for p in Path(folder).iterdir())


@contextlib.contextmanager
def folder_lock(folder: str | Path, create: bool = True) -> Iterator[Path]:
    """Hold ``folder`` for one writer; yields the folder.

    The lock is an advisory ``flock`` on ``folder/.sasoftmax.lock`` holding the writer's pid and host: the
    kernel releases it when the process ends however it ends, so a lock file left behind never blocks. A held
    lock raises :class:`FolderInUse` at once (no waiting). With ``create`` the folder (and missing parents) is
    created, and removed again on an error if it is still empty. Where ``flock`` is missing (Windows) the lock
    is the file itself, created exclusively, and one naming a dead process on this host is broken. Once held,
    the folder's temporaries are removed: only a writer holding the folder writes them, so any found then were
    left by a killed one.
    """
    folder = Path(folder)
    missing = [p for p in (folder, *folder.parents) if not p.exists()] if create else []
    if create:
        folder.mkdir(parents=True, exist_ok=True)
    elif not folder.is_dir():
        raise ValueError(f"{folder} is not a directory")
    path = folder / LOCK_NAME
    ok = False
    try:
        fd = _acquire(path)
        try:
            for leftover in folder.iterdir():
                if leftover.name != LOCK_NAME and is_leftover(leftover):
                    leftover.unlink(missing_ok=True)
            yield folder
            ok = True
        finally:
            path.unlink(missing_ok=True)  # while still held, so no other process can hold this inode
            os.close(fd)
    finally:
        if not ok:
            for directory in missing:  # deepest first; only the ones still empty
                with contextlib.suppress(OSError):
                    directory.rmdir()


def _acquire(path: Path) -> int:
    try:
        import fcntl
    except ImportError:
        return _acquire_exclusive(path)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(path)
            os.close(fd)
            raise FolderInUse(f"{path.parent} is in use by {holder} (lock {path}): wait for it to finish or stop "
                              "it, or use another folder") from None  # fmt: skip
        except BaseException:
            os.close(fd)
            raise
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path, follow_symlinks=False))
        except FileNotFoundError:
            same = False
        if same:  # else the holder removed the file as we opened it: lock the new one
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
    return fd


def _acquire_exclusive(path: Path) -> int:
    for _ in range(2):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            if not _stale(path):
                raise FolderInUse(f"{path.parent} is in use by {_holder(path)} (lock {path}); if that process is "
                                  "gone, delete the lock file") from None  # fmt: skip
            path.unlink(missing_ok=True)
            continue
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        return fd
    raise FolderInUse(f"{path.parent} is in use (lock {path})")


HOLDER_WAIT_S = 1.0
"""How long a refused process waits for the holder to write its pid into the lock file: the holder writes it
just after taking the lock, so a process refused in between finds the file still empty."""


def _holder(path: Path) -> str:
    deadline = time.monotonic() + HOLDER_WAIT_S
    while True:
        try:
            pid, host = path.read_text().split()[:2]
            return f"process {pid} on {host}"
        except (OSError, ValueError):
            if time.monotonic() >= deadline:
                return "another process"
            time.sleep(0.02)


def _stale(path: Path) -> bool:
    """Whether the lock file names a process of this host that is gone."""
    try:
        pid, host = path.read_text().split()[:2]
        pid = int(pid)
    except (OSError, ValueError):
        return False
    if host != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except OSError as err:
        return err.errno == errno.ESRCH
    return False
