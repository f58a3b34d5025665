"""A Hugging Face Hub id (`org/name`, optionally `@revision`) found in the local hub cache.

mergekit takes a model reference that is not a folder for a Hub id and downloads it (into
the hub cache). tiesfed does not download, but a model mergekit, transformers or
`huggingface-cli download` already fetched sits in the cache as
`models--org--name/snapshots/<commit>`, and is found there without network or
huggingface_hub: `HF_HUB_CACHE`, else `HF_HOME`/hub, else ~/.cache/huggingface/hub.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

__all__ = ["HUB_ID", "hub_cache_dir", "cached_snapshot"]

#: `org/name` or `org/name@revision`, as mergekit's ModelReference writes a Hub model
HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[\w./-]+))?$")


def hub_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return Path(home) / "hub"


def cached_snapshot(ref: str, cache: Optional[Path] = None) -> Optional[Path]:
    """The cached snapshot folder of Hub id `ref` (its `main`, or the given revision), or None."""
    m = HUB_ID.match(ref)
    if not m:
        return None
    repo = (cache or hub_cache_dir()) / ("models--" + m.group("repo").replace("/", "--"))
    rev = m.group("rev") or "main"
    ref_file = repo / "refs" / rev
    commit = ref_file.read_text().strip() if ref_file.is_file() else rev
    snap = repo / "snapshots" / commit
    return snap if snap.is_dir() else None
