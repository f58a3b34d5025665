"""Progress in named stages, each counting the model's parameters once.

A client's global trim reads the model twice (a histogram pass, then trim and
encode), and the local merge then folds and writes it: rather than one bar over
parameters × passes, each stage gets a bar of its own whose total is the
parameters it reads, named after what it does ("histogram", "trim+encode",
"fold+write", "write").

    with Stages(enabled=True) as progress:
        progress.stage("trim+encode", params)
        progress.update(numel)          # per tensor
"""

from __future__ import annotations

from typing import Optional, Protocol, Union

from tqdm.auto import tqdm


class StageProgress(Protocol):
    """What the trim, the merge and the fetch report to: a stage begins, a tensor is done."""

    def stage(self, desc: str, total: int) -> None: ...

    def update(self, n: int) -> None: ...


class Stages:
    """One tqdm bar per stage (the previous one is closed when the next begins)."""

    def __init__(self, enabled: bool = True, unit: str = "param") -> None:
        self.enabled = enabled
        self.unit = unit
        self._bar: Optional[tqdm] = None

    def stage(self, desc: str, total: int) -> None:
        self.close()
        if self.enabled:
            self._bar = tqdm(total=total, desc=desc, unit=self.unit, unit_scale=True)

    def update(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "Stages":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Prefixed:
    """The stages of one model among several: `prefix` goes before each stage's name."""

    def __init__(self, inner: StageProgress, prefix: str) -> None:
        self.inner = inner
        self.prefix = prefix

    def stage(self, desc: str, total: int) -> None:
        self.inner.stage(self.prefix + desc, total)

    def update(self, n: int) -> None:
        self.inner.update(n)


def stages(progress: Union[bool, StageProgress, None]) -> Union[Stages, StageProgress]:
    """`progress` as the callers take it: True/False (bars on stderr, or none) or a StageProgress."""
    if progress is None or isinstance(progress, bool):
        return Stages(enabled=bool(progress))
    return progress
