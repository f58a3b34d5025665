"""The admin token of an insecure (loopback) coordinator: there is no unauthenticated admin.

With mutual TLS, OpenRound and CloseRound need an admin certificate and no token
exists. With --insecure they need the token in their metadata (checked in one
place, `CoordinatorService._caller`). An empty token is refused. Without
one the coordinator makes one at start (`secrets.token_urlsafe`) and writes
it, readable by its owner only, to `<spool>/admin-token`, where local admin
commands find it (`tiesfed coordinator open|close --insecure --admin-token-file`).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Optional

#: The file in the spool that holds a generated token.
TOKEN_FILE = "admin-token"


def check_token(token: Optional[str], what: str = "--admin-token") -> Optional[str]:
    """None (generate one) or a real token; an empty or blank one is an error naming `what`."""
    if token is not None and not token.strip():
        raise ValueError(
            f"{what} is empty, which would let anyone open and close rounds: give a secret, "
            "or leave it out and the coordinator generates one"
        )
    return token


def generate_token() -> str:
    return secrets.token_urlsafe(32)


def write_token_file(spool_dir: Path, token: str) -> Path:
    """Write `token` to `<spool>/admin-token` with mode 0600 (atomically: a reader sees
    the old token or the new one, and never a file others may read)."""
    path = Path(spool_dir) / TOKEN_FILE
    tmp = path.with_name(f".{TOKEN_FILE}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)  # whatever the umask
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def read_token_file(path: str | Path, what: str = "--admin-token-file") -> str:
    """The token in `path` (its first line); errors name `what` and the file."""
    try:
        token = Path(path).read_text().strip()
    except OSError as e:
        raise ValueError(f"{what}: cannot read {path}: {e.strerror or e}") from None
    if not token:
        raise ValueError(f"{what}: {path} holds no token")
    return token
