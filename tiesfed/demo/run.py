"""`run_demo`: what ``tiesfed demo`` runs, the zoo then the scoreboard, printed."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence, Union

from tiesfed.demo.scoreboard import MergeFn, Table, format_table, scoreboard
from tiesfed.demo.zoo import Progress, ZooSpec, build_zoo


def run_demo(
    merge_fn: MergeFn,
    cache_dir: Optional[Path] = None,
    seed: int = 0,
    *,
    spec: Optional[ZooSpec] = None,
    lambdas: Union[None, Sequence[float], Mapping[str, Sequence[float]]] = None,
    progress: Progress = None,
    out: Callable[[str], None] = print,
) -> Table:
    """Build (or reuse) the zoo, run the scoreboard, print the table and the timings."""
    t0 = time.perf_counter()
    zoo = build_zoo(cache_dir, seed, spec=spec, progress=progress)
    t_zoo = time.perf_counter() - t0
    table = scoreboard(zoo, merge_fn, lambdas, progress)
    out(format_table(table))
    how = f"built in {zoo.build_seconds:.1f}s" if zoo.built else f"reused from cache ({t_zoo:.2f}s)"
    out(f"\nzoo: {len(zoo.tasks)} tasks, {how}; scoreboard: {table.merges} merges in "
        f"{table.merge_seconds:.1f}s, {table.seconds:.1f}s in all; total {time.perf_counter() - t0:.1f}s")
    return table
