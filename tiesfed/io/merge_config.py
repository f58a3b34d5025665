"""Read a merge YAML file into a validated `MergeConfig`.

Kept out of `tiesfed.core.options` so the core stays free of I/O.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from tiesfed.core.options import MergeConfig
from tiesfed.io.mergekit_config import MergekitConfigError, from_mergekit, is_mergekit


def load_config(path: str | Path, cwd: Path | None = None) -> MergeConfig:
    """Read a merge YAML. mergekit's format (it names `merge_method`) gets mergekit's
    defaults and semantics, and its relative paths are taken from the working
    directory (`cwd`), as mergekit does; tiesfed's own format (`method:`) keeps the
    paper's defaults, and its relative paths are taken from the YAML's folder."""
    path = Path(path)
    docs = list(yaml.safe_load_all(path.read_text()))
    if len(docs) > 1:
        raise MergekitConfigError(f"{path}: the file holds {len(docs)} YAML documents (mergekit-mega's format, one "
                                  "merge per document): tiesfed runs one merge per file; split it into one file per "
                                  "document and merge them in order")
    raw = docs[0] if docs else None
    if is_mergekit(raw):
        return from_mergekit(raw, cwd)
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
