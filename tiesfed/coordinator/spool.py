"""The coordinator's durable spool: everything a round needs to survive a restart.

Layout under ``<spool_dir>/rounds/<round_id>/``::

    round.json                      the round's configuration (written once, at open)
    state.json                      open | finalizing | finalized | failed (+ merged digest)
    partial/<client>.part           an upload being received (discarded on restart)
    contributions/<client>.json     pointer: {"sha256", "file", "bytes", "nnz"}
    contributions/<client>-<sha>.tfs  a committed contribution (codec stream)
    merged.tfs                      the merged task vector (codec stream, kind "merged")
    model/                          the merged model, when the coordinator has the base

A contribution is committed by: fsync of its data file, atomic rename to its
content-addressed name, then an atomic replace of the client's pointer, then
an fsync of the folder. The pointer is the commit point: a crash before it
leaves an orphan file (removed on recovery), a crash after it a committed
contribution whose checksum is verified before it is folded again.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

from tiesfed.io.files import fsync_dir, write_json_atomic

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
_ID_RE = re.compile(ID_PATTERN)
_IO_CHUNK = 4 << 20


def check_id(kind: str, value: str) -> str:
    """Round and client ids become file names: a conservative alphabet only."""
    if not isinstance(value, str) or not _ID_RE.match(value):
        raise ValueError(
            f"{kind} {value!r} is not valid: use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return value


@dataclass(frozen=True)
class Committed:
    """A committed contribution on disk."""

    client_id: str
    sha256: str
    path: Path
    bytes: int
    nnz: int

    def pointer(self) -> dict:
        d = asdict(self)
        d["file"] = self.path.name
        del d["path"], d["client_id"]
        return d


class RoundSpool:
    """One round's folder in the spool."""

    def __init__(self, spool_dir: str | Path, round_id: str) -> None:
        self.round_id = check_id("round id", round_id)
        self.dir = Path(spool_dir) / "rounds" / round_id
        self.partial_dir = self.dir / "partial"
        self.contrib_dir = self.dir / "contributions"

    # -- round files
    @property
    def round_file(self) -> Path:
        return self.dir / "round.json"

    @property
    def state_file(self) -> Path:
        return self.dir / "state.json"

    @property
    def merged_path(self) -> Path:
        return self.dir / "merged.tfs"

    @property
    def model_dir(self) -> Path:
        return self.dir / "model"

    def exists(self) -> bool:
        return self.round_file.is_file()

    def create(self, config: dict) -> None:
        """Make the round's folders and write its configuration (refuses to overwrite)."""
        if self.exists():
            raise FileExistsError(f"round {self.round_id!r} already exists in the spool at {self.dir}")
        for d in (self.dir, self.partial_dir, self.contrib_dir):
            d.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.round_file, config)
        fsync_dir(self.dir.parent)

    def load_config(self) -> dict:
        return json.loads(self.round_file.read_text())

    def save_state(self, state: dict) -> None:
        write_json_atomic(self.state_file, state)

    def load_state(self) -> dict:
        if not self.state_file.is_file():
            return {"state": "open"}
        return json.loads(self.state_file.read_text())

    # -- uploads
    def partial_path(self, client_id: str) -> Path:
        return self.partial_dir / f"{check_id('client id', client_id)}.part"

    def clear_partials(self) -> int:
        """Drop every half-received upload (after a restart nobody holds their state)."""
        n = 0
        for p in self.partial_dir.glob("*"):
            p.unlink(missing_ok=True)
            n += 1
        return n

    def commit(self, client_id: str, partial: Path, sha256: str, size: int, nnz: int) -> Committed:
        """Make a fully received upload the client's committed contribution.

        The data file is fsync'd and renamed to its content-addressed name; the
        client's pointer is replaced atomically; the file it pointed to before
        (a replaced contribution) is removed after that.
        """
        with open(partial, "rb+") as f:
            os.fsync(f.fileno())
        final = self.contrib_dir / f"{client_id}-{sha256[:16]}.tfs"
        os.replace(partial, final)
        c = Committed(client_id, sha256, final, size, nnz)
        old = self.committed().get(client_id)
        write_json_atomic(self._pointer(client_id), c.pointer())
        if old is not None and old.path != final:
            old.path.unlink(missing_ok=True)
            fsync_dir(self.contrib_dir)
        return c

    def _pointer(self, client_id: str) -> Path:
        return self.contrib_dir / f"{client_id}.json"

    def committed(self) -> dict[str, Committed]:
        """Every client's committed contribution, by tiesfed.client id (sorted)."""
        out: dict[str, Committed] = {}
        for p in sorted(self.contrib_dir.glob("*.json")):
            d = json.loads(p.read_text())
            cid = p.stem
            out[cid] = Committed(cid, d["sha256"], self.contrib_dir / d["file"], int(d["bytes"]), int(d["nnz"]))
        return out

    def remove_orphans(self) -> list[Path]:
        """Contribution files no pointer names (a crash between rename and pointer)."""
        named = {c.path.name for c in self.committed().values()}
        gone = []
        for p in self.contrib_dir.glob("*.tfs"):
            if p.name not in named:
                p.unlink(missing_ok=True)
                gone.append(p)
        for p in self.contrib_dir.glob(".*.tmp-*"):
            p.unlink(missing_ok=True)
        return gone

    def drop(self, client_id: str) -> None:
        """Forget a committed contribution (used when its checksum no longer matches)."""
        c = self.committed().get(client_id)
        self._pointer(client_id).unlink(missing_ok=True)
        if c is not None:
            c.path.unlink(missing_ok=True)
        fsync_dir(self.contrib_dir)

    def clear_outputs(self, keep_merged: bool = False) -> None:
        """Remove a half-written merge (before finalizing again after a crash), or
        with `keep_merged` only a half-written model folder."""
        if not keep_merged:
            for p in self.dir.glob(".merged.tfs.tmp*"):
                p.unlink(missing_ok=True)
        if self.model_dir.exists():
            shutil.rmtree(self.model_dir)


def iter_round_dirs(spool_dir: str | Path) -> Iterator[RoundSpool]:
    root = Path(spool_dir) / "rounds"
    if not root.is_dir():
        return
    for d in sorted(root.iterdir()):
        if d.is_dir() and (d / "round.json").is_file():
            yield RoundSpool(spool_dir, d.name)
