"""The coordinator's durable spool: everything a round needs to survive a restart.

Layout under ``<spool_dir>/rounds/<round_id>/``::

    round.json                      the round's configuration (written once, at open)
    state.json                      open | finalizing | finalized | failed (+ merged digest,
                                    lost contributions, whether a restart finalizes again)
    partial/<client>.part           an upload being received (discarded on restart)
    contributions/<client>.json     pointer: {"sha256", "file", "bytes", "nnz"[, "signed": true]}
    contributions/<client>-<sha>.tfs  a committed contribution (codec stream)
    contributions/<client>-<sha>.sig.json  its signature, under mutual TLS: {"manifest",
                                    "signature_hex", "cert_pem", "cert_serial", "cert_fingerprint"}
    merged.tfs                      the merged task vector (codec stream, kind "merged")
    merged.sig.json                 the coordinator's signature of the merge, under mutual TLS:
                                    {"manifest", "signature_hex", "cert_pem"}
    model/                          the merged model, when the coordinator has the base
    damaged/<time>-<name>           a contribution (and its pointer) found damaged on recovery,
                                    kept for inspection; its client is asked to upload again
    secagg/                         a secure round's journal (`coordinator/secure/journal.py`):
                                    the protocol messages and masked vectors, removed once published

and ``<spool_dir>/coordinator.lock``: the coordinator that holds the spool
(`SpoolLock`: pid, host, start time), so a second one cannot start on it.

A contribution is committed by: fsync of its data file, atomic rename to its
content-addressed name, its signature file (if signed) written atomically, then
an atomic replace of the client's pointer, then an fsync of the folder. The pointer is the commit point: a crash before it
leaves an orphan file (removed on recovery), a crash after it a committed
contribution whose checksum is verified before it is folded again.

Every JSON file here is written atomically (`write_json_atomic`) and read with
`read_json`, so a damaged one raises `DamagedFileError` naming it instead of
stopping the coordinator with a bare parse error.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Optional

from tiesfed.io.files import DamagedFileError, fsync_dir, read_json, write_json_atomic
from tiesfed.trust.certs import valid_id

_IO_CHUNK = 4 << 20
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
LOCK_FILE = "coordinator.lock"
SIG_SUFFIX = ".sig.json"


def check_id(kind: str, value: str) -> str:
    """Round and client ids become file names (and a client id is a certificate's CN): one
    conservative alphabet, `tiesfed.trust.certs.valid_id` (a fullmatch: "org-a\\n" fails)."""
    if not valid_id(value):
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
    signed: bool = False  # a signature file lies beside it (uploaded under mutual TLS)

    @property
    def sig_path(self) -> Path:
        """Where its signature file is (or would be): ``<client>-<sha>.sig.json``."""
        return sig_path_of(self.path)

    def pointer(self) -> dict:
        d = asdict(self)
        d["file"] = self.path.name
        del d["path"], d["client_id"]
        if not self.signed:  # pointers of unsigned rounds stay as they always were
            del d["signed"]
        return d


def sig_path_of(data_file: Path) -> Path:
    return data_file.with_name(data_file.name.removesuffix(".tfs") + SIG_SUFFIX)


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
    def merged_sig_path(self) -> Path:
        return self.dir / "merged.sig.json"

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

    @property
    def damaged_dir(self) -> Path:
        return self.dir / "damaged"

    def load_config(self) -> dict:
        """The round's configuration as written at open (DamagedFileError if unreadable)."""
        return read_json(self.round_file, "round file")

    def save_state(self, state: dict) -> None:
        write_json_atomic(self.state_file, state)

    def load_state(self) -> dict:
        """The state file; none yet (a crash right after open) means open.
        DamagedFileError if it is there but unreadable or not a state."""
        if not self.state_file.exists():
            return {"state": "open"}
        st = read_json(self.state_file, "state file")
        if st.get("state") not in ("open", "finalizing", "finalized", "failed"):
            raise DamagedFileError(self.state_file, "state file", f"names no known state ({st.get('state')!r})")
        if st["state"] == "finalized":
            try:
                int(st["merged_bytes"]), int(st["majority_sign"])
                if not _SHA_RE.fullmatch(st["merged_sha256"]):
                    raise ValueError("merged_sha256 is not a sha256")
            except (KeyError, TypeError, ValueError) as e:
                raise DamagedFileError(self.state_file, "state file",
                                       f"says finalized without a valid merged digest ({e!r})") from None
        return st

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

    def commit(self, client_id: str, partial: Path, sha256: str, size: int, nnz: int,
               signature: Optional[dict] = None) -> Committed:
        """Make a fully received upload the client's committed contribution.

        The data file is fsync'd and renamed to its content-addressed name; its
        `signature` record (if any) is written beside it; the client's pointer is
        replaced atomically; the files it pointed to before (a replaced
        contribution) are removed after that.
        """
        with open(partial, "rb+") as f:
            os.fsync(f.fileno())
        final = self.contrib_dir / f"{client_id}-{sha256[:16]}.tfs"
        os.replace(partial, final)
        c = Committed(client_id, sha256, final, size, nnz, signed=signature is not None)
        if signature is not None:  # before the pointer: a committed signed contribution always has it
            write_json_atomic(c.sig_path, signature)
        else:
            c.sig_path.unlink(missing_ok=True)  # never one describing another upload
        old = self.committed().get(client_id)
        write_json_atomic(self._pointer(client_id), c.pointer())
        if old is not None and old.path != final:
            old.path.unlink(missing_ok=True)
            old.sig_path.unlink(missing_ok=True)
            fsync_dir(self.contrib_dir)
        return c

    def _pointer(self, client_id: str) -> Path:
        return self.contrib_dir / f"{client_id}.json"

    def read_pointer(self, path: Path) -> Committed:
        """One client's pointer file (DamagedFileError naming it if it is not a valid pointer)."""
        cid = path.stem
        d = read_json(path, f"contribution pointer of {cid!r}")
        try:
            sha, name, size, nnz = d["sha256"], d["file"], int(d["bytes"]), int(d["nnz"])
            if not (isinstance(sha, str) and _SHA_RE.fullmatch(sha)):
                raise ValueError(f"sha256 {sha!r} is not a hex sha256")
            if not (isinstance(name, str) and name == Path(name).name and name.endswith(".tfs")):
                raise ValueError(f"file {name!r} is not a contribution file name")
            if size < 0 or nnz < 0:
                raise ValueError("negative bytes or nnz")
            signed = d.get("signed", False)
            if not isinstance(signed, bool):
                raise ValueError(f"signed {signed!r} is not true or false")
        except (KeyError, TypeError, ValueError) as e:
            raise DamagedFileError(path, f"contribution pointer of {cid!r}", f"is not a valid pointer ({e})") from None
        return Committed(cid, sha, self.contrib_dir / name, size, nnz, signed)

    def scan_committed(self) -> tuple[dict[str, Committed], dict[str, DamagedFileError]]:
        """(valid pointers by client id, damaged pointers by client id), both sorted."""
        good: dict[str, Committed] = {}
        bad: dict[str, DamagedFileError] = {}
        for p in sorted(self.contrib_dir.glob("*.json")):
            if p.name.endswith(SIG_SUFFIX):
                continue
            try:
                good[p.stem] = self.read_pointer(p)
            except DamagedFileError as e:
                bad[p.stem] = e
        return good, bad

    def committed(self) -> dict[str, Committed]:
        """Every client's committed contribution with a valid pointer, by client id (sorted)."""
        return self.scan_committed()[0]

    def remove_orphans(self) -> list[Path]:
        """Contribution files no pointer names (a crash between rename and pointer).
        A client whose pointer is damaged keeps its files (quarantined by recovery)."""
        good, bad = self.scan_committed()
        named = {c.path.name for c in good.values()}
        gone = []
        for p in self.contrib_dir.glob("*.tfs"):
            if p.name not in named and not any(self._file_of(cid, p, ".tfs") for cid in bad):
                p.unlink(missing_ok=True)
                gone.append(p)
        signed = {c.sig_path.name for c in good.values()}
        for p in self.contrib_dir.glob(f"*{SIG_SUFFIX}"):
            if p.name not in signed and not any(self._file_of(cid, p, SIG_SUFFIX) for cid in bad):
                p.unlink(missing_ok=True)
                gone.append(p)
        for p in (*self.contrib_dir.glob(".*.tmp-*"), *self.contrib_dir.glob(".*.tmp")):  # crashed writes
            p.unlink(missing_ok=True)
        return gone

    def quarantine(self, client_id: str, c: Optional[Committed]) -> list[Path]:
        """Take a damaged contribution out of the round: its pointer and data file
        (`c`'s, or every ``<client>-*.tfs`` when the pointer itself is damaged)
        move to ``damaged/``, kept for inspection; the client no longer counts
        as committed. Returns the new paths."""
        self.damaged_dir.mkdir(exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%S")
        files = [self._pointer(client_id)]
        if c is not None:
            files += [c.path, c.sig_path]
        else:
            files += sorted(p for p in self.contrib_dir.glob("*.tfs") if self._file_of(client_id, p, ".tfs"))
            files += sorted(p for p in self.contrib_dir.glob(f"*{SIG_SUFFIX}")
                            if self._file_of(client_id, p, SIG_SUFFIX))
        moved = []
        for p in files:
            if p.exists():
                dest = self.damaged_dir / f"{stamp}-{p.name}"
                os.replace(p, dest)
                moved.append(dest)
        fsync_dir(self.damaged_dir)
        fsync_dir(self.contrib_dir)
        return moved

    @staticmethod
    def _file_of(client_id: str, p: Path, suffix: str) -> bool:
        """Is `p` exactly ``<client>-<16 hex><suffix>``? (A prefix glob would also take
        the files of a client whose id extends this one, e.g. "org" and "org-a".)"""
        return re.fullmatch(re.escape(client_id) + r"-[0-9a-f]{16}" + re.escape(suffix), p.name) is not None

    def clear_outputs(self, keep_merged: bool = False) -> None:
        """Remove what a finalization wrote (before finalizing again after a crash,
        a failed attempt, or a damaged merged stream): the merged stream, its
        signature, their temporaries, the model folder; with `keep_merged` only
        the model folder."""
        if not keep_merged:
            for p in (*self.dir.glob(".merged.tfs.*"), *self.dir.glob(".merged.sig.json.*")):
                p.unlink(missing_ok=True)
            self.merged_path.unlink(missing_ok=True)
            self.merged_sig_path.unlink(missing_ok=True)
        if self.model_dir.exists():
            shutil.rmtree(self.model_dir)


def iter_round_dirs(spool_dir: str | Path) -> Iterator[RoundSpool]:
    root = Path(spool_dir) / "rounds"
    if not root.is_dir():
        return
    for d in sorted(root.iterdir()):
        if d.is_dir() and (d / "round.json").is_file():
            yield RoundSpool(spool_dir, d.name)


class SpoolLockedError(OSError):
    """Another coordinator holds the spool; the message names it and the spool."""


class SpoolLock:
    """One spool, one coordinator: an exclusive `flock` on ``<spool>/coordinator.lock``,
    taken before recovery (which deletes half-received uploads) and held until stop.
    The file holds the holder's pid, host and start time, for the error a second
    coordinator gets. The kernel drops the lock when the process dies, so a crash
    leaves nothing to clean up. (flock does not lock across hosts on every network
    filesystem: one spool per coordinator host there.)"""

    def __init__(self, spool_dir: str | Path) -> None:
        self.spool_dir = Path(spool_dir)
        self.path = self.spool_dir / LOCK_FILE
        self._fd: Optional[int] = None

    def acquire(self) -> "SpoolLock":
        """Take the lock or raise SpoolLockedError at once (never waits, deletes nothing)."""
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise SpoolLockedError(
                f"spool {self.spool_dir} is in use by another coordinator ({self.holder()}); "
                f"stop it, or give this one another spool (lock file {self.path})"
            ) from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started_unix": time.time(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info, sort_keys=True) + "\n").encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def holder(self) -> str:
        """Who holds the lock, as the lock file says."""
        try:
            d = read_json(self.path, "spool lock file")
        except DamagedFileError as e:
            return f"holder unknown: {e}"
        return f"pid {d.get('pid')} on host {d.get('host')}, started {d.get('started')}"

    def release(self) -> None:
        """Let the spool go (idempotent)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    @property
    def held(self) -> bool:
        return self._fd is not None
