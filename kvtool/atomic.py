"""Atomic outputs: write to a temporary sibling, then rename into place; never clobber without force."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kvtool.errors import KvtoolError, first_line


def check_writable_file(path: str | Path, force: bool) -> Path:
    """Refuse to overwrite an existing file unless ``force``, and a path the OS would refuse (see ``check_parent``)."""
    path = Path(path)
    with _os_errors(path):
        _check_file(path, force)
    return path


def check_writable_dir(path: str | Path, force: bool) -> Path:
    """Refuse a non-empty existing directory (or a file) unless ``force``, and a path the OS would refuse."""
    path = Path(path)
    with _os_errors(path):
        _check_dir(path, force)
    return path


@contextlib.contextmanager
def _os_errors(path: Path) -> Iterator[None]:
    try:
        yield
    except OSError as e:  # e.g. a folder above that this process may not enter
        raise write_failure(path, e) from e


def _check_file(path: Path, force: bool) -> None:
    if path.is_dir():
        raise KvtoolError(f"{path} is a directory; give a file path")
    if path.exists() and not force:
        raise KvtoolError(f"{path} already exists; pass --force to overwrite it")
    check_parent(path)


def _check_dir(path: Path, force: bool) -> None:
    if path.exists() and not path.is_dir():
        raise KvtoolError(f"{path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not force:
        raise KvtoolError(f"{path} is not empty; pass --force to replace it")
    check_parent(path)


def check_parent(path: Path) -> None:
    """Before any work: the nearest existing folder above ``path`` must be a directory this process may write in,
    on a writable file system (the atomic writers create a sibling there and rename it into place)."""
    above = Path(os.path.abspath(path)).parent
    while not above.exists() and above != above.parent:
        above = above.parent
    if not above.is_dir():
        raise KvtoolError(f"cannot write {path}: {above} is not a directory; nothing was written")
    if not os.access(above, os.W_OK | os.X_OK):
        try:
            read_only = bool(os.statvfs(above).f_flag & os.ST_RDONLY)
        except OSError:
            read_only = False
        reason = "read-only file system" if read_only else "permission denied"
        raise KvtoolError(f"cannot write {path}: {reason} ({above}); nothing was written")


def write_failure(path: Path, e: BaseException) -> BaseException:
    """A write that the OS or a writer refused (disk full, permission, read-only, a file in the way) as one line
    naming ``path``; anything else (a bug, Ctrl-C) as it is."""
    if isinstance(e, OSError) or type(e).__name__ == "SafetensorError":
        code = re.search(r"\(os error (\d+)\)|code: (\d+)", str(e))  # how safetensors' Rust writer words it
        reason = (e.strerror if isinstance(e, OSError) and e.strerror else
                  os.strerror(int(code[1] or code[2])) if code else first_line(e)).rstrip(".")
        return KvtoolError(f"cannot write {path}: {reason}; nothing was written")
    return e


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise write_failure(path, e) from e
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        err = write_failure(path, e)
        if err is e:
            raise
        raise err from e


def write_json_atomic(path: str | Path, obj: Any) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


@contextlib.contextmanager
def atomic_dir(path: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; on success it replaces ``path``, on any error it is removed.

    An interrupted write (Ctrl-C, disk full) therefore never leaves a ``path`` that looks complete.
    """
    path = check_writable_dir(path, force)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as e:
        raise write_failure(path, e) from e
    try:
        yield tmp
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        err = write_failure(path, e)
        if err is e:
            raise
        raise err from e
    old = path.parent / f".{path.name}.old-{os.getpid()}" if path.exists() else None
    try:
        if old is not None:
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            if old is not None:
                os.replace(old, path)
            raise
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        err = write_failure(path, e)
        if err is e:
            raise
        raise err from e
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
