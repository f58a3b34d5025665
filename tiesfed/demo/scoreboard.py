"""The merge scoreboard: the lines of the TIES paper's tables on the demo zoo.

`scoreboard` scores the base, the individual fine-tuned models, averaging,
task arithmetic and TIES on the test split, picking λ for task arithmetic and
TIES on the validation split. The merge itself is injected (`merge_fn`), so the
same scoreboard serves the real engine, the federated deployment and a dense
reference in the tests.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence, Union

import torch

from tiesfed.demo.model import accuracy, load_model
from tiesfed.demo.zoo import Progress, Zoo, emit

MergeFn = Callable[[Path, list, str, float, Path], Path]


def evaluate(
    model_dir: Path,
    zoo: Zoo,
    split: str = "test",
    *,
    tasks: Optional[Sequence[str]] = None,
) -> dict[str, float]:
    """Accuracy of the model in `model_dir` on every task of the zoo (or `tasks`)."""
    model = load_model(Path(model_dir), zoo.layer_sizes)
    out = {}
    with torch.no_grad():
        for task in tasks or zoo.task_names:
            out[task] = accuracy(model, *zoo.data(task, split))
    return out


DEFAULT_LAMBDAS: dict[str, tuple[float, ...]] = {
    "task_arithmetic": (0.1, 0.3, 0.5, 0.7, 1.0),
    "ties": (0.3, 0.6, 1.0, 1.5, 2.0),
}

LABELS = {
    "base": "pre-trained base",
    "individual": "fine-tuned (individual)",
    "average": "averaging",
    "task_arithmetic": "task arithmetic",
    "ties": "TIES",
}


@dataclass
class Row:
    method: str
    label: str
    test: dict[str, float]
    lam: Optional[float] = None
    val_average: Optional[float] = None
    sweep: dict[float, float] = field(default_factory=dict)  # λ -> average val accuracy

    @property
    def average(self) -> float:
        return float(sum(self.test.values()) / len(self.test))


@dataclass
class Table:
    tasks: list[str]
    rows: list[Row]
    merges: int = 0
    merge_seconds: float = 0.0
    seconds: float = 0.0

    def row(self, method: str) -> Row:
        for r in self.rows:
            if r.method == method:
                return r
        raise KeyError(method)

    def __getitem__(self, method: str) -> Row:
        return self.row(method)


def _grid(lambdas: Union[None, Sequence[float], Mapping[str, Sequence[float]]], method: str) -> tuple[float, ...]:
    if lambdas is None:
        grid = DEFAULT_LAMBDAS[method]
    elif isinstance(lambdas, Mapping):
        grid = lambdas.get(method, DEFAULT_LAMBDAS[method])
    else:
        grid = lambdas
    grid = tuple(float(v) for v in grid)
    if not grid:
        raise ValueError(f"empty λ grid for {method}")
    return grid


def _mean(d: Mapping[str, float]) -> float:
    return float(sum(d.values()) / len(d))


def scoreboard(
    zoo: Zoo,
    merge_fn: MergeFn,
    lambdas: Union[None, Sequence[float], Mapping[str, Sequence[float]]] = None,
    progress: Progress = None,
    *,
    methods: Sequence[str] = ("average", "task_arithmetic", "ties"),
    work_dir: Optional[Path] = None,
) -> Table:
    """Per-task test accuracy of the base, the fine-tuned models and each merge.

    `merge_fn(base_dir, model_dirs, method, lam, out_dir) -> merged_dir` does a
    merge ("average", "task_arithmetic" or "ties") into `out_dir` and returns
    the folder holding the merged weights. For task arithmetic and TIES every
    λ of the grid is merged and the one with the best average *validation*
    accuracy is reported on the test split (ties → the first in the grid).
    `lambdas`: None (DEFAULT_LAMBDAS), one grid for both, or {method: grid}.
    Merged folders go under `work_dir` (a temporary folder, removed, if None).
    """
    t0 = time.perf_counter()
    tasks = zoo.task_names
    rows: list[Row] = []
    merges = 0
    merge_seconds = 0.0

    base_test = evaluate(zoo.base, zoo, "test")
    rows.append(Row("base", LABELS["base"], base_test, val_average=_mean(evaluate(zoo.base, zoo, "val"))))
    own_test = {t: evaluate(zoo.tasks[t], zoo, "test", tasks=[t])[t] for t in tasks}
    own_val = {t: evaluate(zoo.tasks[t], zoo, "val", tasks=[t])[t] for t in tasks}
    rows.append(Row("individual", LABELS["individual"], own_test, val_average=_mean(own_val)))
    emit(progress, f"scoreboard: base {_mean(base_test):.3f}, fine-tuned {_mean(own_test):.3f} (test avg)")

    tmp = None
    if work_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="tiesfed-demo-")
        work = Path(tmp.name)
    else:
        work = Path(work_dir)
        work.mkdir(parents=True, exist_ok=True)
    try:
        for method in methods:
            grid = (1.0,) if method == "average" else _grid(lambdas, method)
            sweep: dict[float, float] = {}
            best: Optional[tuple[float, float, Path]] = None
            for lam in grid:
                out_dir = work / f"{method}-lam{lam:g}"
                if out_dir.exists():
                    shutil.rmtree(out_dir)
                m0 = time.perf_counter()
                merged = merge_fn(zoo.base, list(zoo.models), method, lam, out_dir)
                merge_seconds += time.perf_counter() - m0
                merges += 1
                merged = Path(merged) if merged is not None else out_dir
                val = _mean(evaluate(merged, zoo, "val"))
                sweep[lam] = val
                emit(progress, f"scoreboard: {method} λ={lam:g} val avg {val:.3f}")
                if best is None or val > best[0]:
                    best = (val, lam, merged)
            assert best is not None
            val, lam, merged = best
            test = evaluate(merged, zoo, "test")
            rows.append(Row(method, LABELS.get(method, method), test,
                            lam=None if method == "average" else lam, val_average=val,
                            sweep=sweep if method != "average" else {}))
            emit(progress, f"scoreboard: {method} test avg {_mean(test):.3f}"
                  + ("" if method == "average" else f" at λ={lam:g}"))
    finally:
        if tmp is not None:
            tmp.cleanup()
    return Table(tasks, rows, merges=merges, merge_seconds=merge_seconds, seconds=time.perf_counter() - t0)


def format_table(table: Table, digits: int = 1) -> str:
    """Aligned text: one row per method, a λ column, accuracy in % per task and average."""
    header = ["method", "λ", *table.tasks, "average"]
    body = []
    for r in table.rows:
        lam = "-" if r.lam is None else f"{r.lam:g}"
        cells = [f"{100 * r.test[t]:.{digits}f}" for t in table.tasks]
        body.append([r.label, lam, *cells, f"{100 * r.average:.{digits}f}"])
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]

    def line(row: list[str]) -> str:
        first = row[0].ljust(widths[0])
        rest = [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        return "  ".join([first, *rest]).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(r) for r in body)])


def table_to_dict(table: Table) -> dict:
    return {
        "tasks": list(table.tasks),
        "rows": [
            {
                "method": r.method,
                "label": r.label,
                "lambda": r.lam,
                "test": {t: r.test[t] for t in table.tasks},
                "average": r.average,
                "val_average": r.val_average,
                "sweep": {f"{k:g}": v for k, v in r.sweep.items()},
            }
            for r in table.rows
        ],
        "merges": table.merges,
        "merge_seconds": round(table.merge_seconds, 3),
        "seconds": round(table.seconds, 3),
    }


def table_to_json(table: Table, indent: Optional[int] = 2) -> str:
    """The table as JSON text (see `table_to_dict` for the shape)."""
    return json.dumps(table_to_dict(table), indent=indent, ensure_ascii=False)
