"""`--shard-size` in the forms people bring: Hugging Face's and mergekit's.

Hugging Face (`max_shard_size`): `5GB`, `500MB` (powers of 10), `5GiB`, `500MiB`
(powers of 2). mergekit (`--out-shard-size`, `parse_kmb`): a plain number of bytes,
or `K`, `M`, `B` for thousands, millions and billions (its `5B` is 5·10⁹ bytes, not
5 bytes). Also a number in scientific notation, `1e9`. Units are case-insensitive.
"""

from __future__ import annotations

import re

__all__ = ["parse_shard_size", "SHARD_SIZE_FORMS"]

_UNITS = {
    "": 1, "k": 10**3, "m": 10**6, "b": 10**9,  # mergekit's parse_kmb
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_FORM = re.compile(r"^\s*(\d+(?:\.\d*)?(?:e[+-]?\d+)?|\.\d+(?:e[+-]?\d+)?)\s*([a-z]*)\s*$", re.IGNORECASE)
SHARD_SIZE_FORMS = "5GB, 500MB, 5GiB, 1e9 (bytes), or mergekit's 5B, 500M, 10K"


def parse_shard_size(text: str | int) -> int:
    """Bytes per output shard; ValueError naming the accepted forms for anything else."""
    if isinstance(text, int) and not isinstance(text, bool):
        value: float = text
    else:
        m = _FORM.match(str(text))
        unit = m.group(2).lower() if m else None
        if m is None or unit not in _UNITS:
            raise ValueError(f"{text!r} is not a size: use {SHARD_SIZE_FORMS}")
        value = float(m.group(1)) * _UNITS[unit]
    if value == float("inf"):
        raise ValueError(f"{text!r}: too large")
    if not value >= 1:
        raise ValueError(f"{text!r}: a shard must hold at least 1 byte")
    return int(value)
