"""What mergekit 0.1.5 writes beside a merge's weights, for a mergekit config: the
tokenizer it would carry (`tokenizer_source`, `chat_template`: `tokenizer_source`) and the
config's dtype (`out_dtype`, else `dtype`, as mergekit's `_model_out_config` sets it), so a
`from_pretrained(dtype="auto")` loads the merge in the dtype it was written in."""

from __future__ import annotations

import json
from pathlib import Path

from tiesfed.core.options import MergeConfig
from tiesfed.io.tokenizer_source import apply_tokenizer

__all__ = ["finish_mergekit_output"]


def finish_mergekit_output(out_dir: str | Path, config: MergeConfig) -> list[str]:
    """Adjust the side files copied from the base in `out_dir`; returns what changed."""
    changed = []
    if config.tokenizer_source or config.chat_template:
        changed += apply_tokenizer(out_dir, config.tokenizer_source, config.chat_template)
    dtype = config.out_dtype or config.dtype
    path = Path(out_dir) / "config.json"
    if dtype and path.is_file():
        cfg = json.loads(path.read_text(encoding="utf-8"))
        keys = [k for k in ("torch_dtype", "dtype") if k in cfg] or ["torch_dtype"]
        if any(cfg.get(k) != dtype for k in keys):
            cfg.update({k: dtype for k in keys})
            path.write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
            changed.append("config.json")
    return changed
