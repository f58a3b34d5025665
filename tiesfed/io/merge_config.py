"""Read a merge YAML file into a validated `MergeConfig`.

Kept out of `tiesfed.core.options` so the core stays free of I/O.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from tiesfed.core.options import MergeConfig


def load_config(path: str | Path) -> MergeConfig:
    """Read a merge YAML; relative model paths are taken from the YAML's folder."""
    path = Path(path)
    raw = yaml.safe_load(path.read_text())
    cfg = MergeConfig.model_validate(raw)

    def resolve(p: str) -> str:
        q = Path(p).expanduser()
        return str(q if q.is_absolute() else (path.parent / q))

    return cfg.model_copy(
        update={
            "base_model": resolve(cfg.base_model),
            "models": [m.model_copy(update={"model": resolve(m.model)}) for m in cfg.models],
        }
    )
