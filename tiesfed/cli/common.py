"""Parsing shared by the `tiesfed` command groups (click raises the usage errors)."""

from __future__ import annotations

from typing import Optional

import click


def parse_weights(weights: Optional[str], n: int) -> list[float]:
    if not weights:
        return [1.0] * n
    try:
        values = [float(w) for w in weights.replace(",", " ").split()]
    except ValueError:
        raise click.BadParameter(f"weights must be numbers, got {weights!r}", param_hint="--weights") from None
    if len(values) != n:
        raise click.BadParameter(f"{len(values)} weights for {n} models", param_hint="--weights")
    return values


def parse_size(text: str) -> int:
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    t = text.strip().upper()
    num = t.rstrip("KMGIB")
    unit = t[len(num):]
    try:
        value = float(num) * units[unit]
    except (ValueError, KeyError):
        raise click.BadParameter(f"not a size: {text!r} (e.g. 2GB, 500MB)") from None
    if value <= 0:
        raise click.BadParameter("size must be positive")
    return int(value)
