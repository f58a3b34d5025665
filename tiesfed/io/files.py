"""Durable files: atomic JSON writes, checked JSON reads, directory fsync, chunked hashing.

Shared by the coordinator's spool and the client's resumable upload and
download, so both sides hash and commit files the same way. Every state file
is written with `write_json_atomic` and read back with `read_json`, whose
error names the file and what is wrong with it: a damaged file is reported,
never half-trusted.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Callable, Optional

_IO_CHUNK = 4 << 20


class DamagedFileError(ValueError):
    """A state file that is missing, unreadable or not what it should be; the
    message names the file and the problem."""

    def __init__(self, path: Path, what: str, problem: str) -> None:
        super().__init__(f"{what} {path} {problem}")
        self.path = Path(path)
        self.problem = problem


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` into a fresh temporary sibling, fsync it, rename it over
    `path`, fsync the folder: a reader sees the old file or the whole new one,
    also after a crash, and a failed write leaves no temporary behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_json_atomic(path: Path, obj: object) -> None:
    """`write_atomic` of `obj` as indented, key-sorted JSON."""
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    write_atomic(path, lambda tmp: tmp.write_text(text))


def read_json(path: Path, what: str) -> dict:
    """A JSON object from `path` (`what` it is, for the error): raises
    `DamagedFileError` naming the file if it is missing, unreadable, truncated
    or not a JSON object."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise DamagedFileError(path, what, "is missing") from None
    except UnicodeDecodeError as e:
        raise DamagedFileError(path, what, f"is not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise DamagedFileError(path, what, f"cannot be read: {e.strerror or e}") from None
    if not text.strip():
        raise DamagedFileError(path, what, "is empty")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DamagedFileError(path, what, f"is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}): "
                               "truncated or corrupted") from None
    if not isinstance(obj, dict):
        raise DamagedFileError(path, what, f"holds a JSON {type(obj).__name__}, expected an object")
    return obj


def sha256_file(path: Path, start: int = 0, end: Optional[int] = None) -> str:
    """Hex sha256 of bytes [start, end) of a file, read in bounded chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        left = (end - start) if end is not None else None
        while left is None or left > 0:
            b = f.read(_IO_CHUNK if left is None else min(_IO_CHUNK, left))
            if not b:
                break
            h.update(b)
            if left is not None:
                left -= len(b)
    return h.hexdigest()
