"""Durable files: atomic JSON writes, directory fsync, chunked hashing.

Shared by the coordinator's spool and the client's resumable upload and
download, so both sides hash and commit files the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional

_IO_CHUNK = 4 << 20


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, obj: object) -> None:
    """Write JSON to a temporary sibling, fsync it, rename it over `path`, fsync the folder."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


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
