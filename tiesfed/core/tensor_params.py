"""Per-tensor parameter values, as mergekit resolves them (pure, no I/O).

A mergekit parameter is a scalar, a *gradient* (a list of numbers interpolated
over the layers) or a list of conditional settings (`{filter, value}`, the first
whose filter is a substring of the tensor name wins). The position of a tensor
is t = layer / (layers - 1) for the tensors of layer `layer` (t = 1 with one
layer), and t = 0 for every tensor outside the layers (embeddings, final norm,
head): mergekit plans those with t = 0. `evaluate_setting` mirrors
`mergekit.config.evaluate_setting` (0.1.5) for numeric parameters.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Optional, Sequence

#: a decoder layer's tensors: `model.layers.3.self_attn...`, `transformer.h.3...`, `...blocks.3...`
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


def layer_index(name: str) -> Optional[int]:
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def layer_count(names: Iterable[str]) -> int:
    """Layers of a model: one more than the largest layer index among its tensors."""
    idx = [i for i in (layer_index(n) for n in names) if i is not None]
    return max(idx) + 1 if idx else 0


def position(name: str, layers: int) -> float:
    """mergekit's t for this tensor: layer / (layers - 1), 1 with one layer, 0 outside the layers."""
    i = layer_index(name)
    if i is None:
        return 0.0
    return i / (layers - 1) if layers > 1 else 1.0


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def evaluate_setting(name: str, setting: Any, t: float) -> Optional[float]:
    """The value of one setting for tensor `name` at position t; None where no filter matches."""
    if isinstance(setting, dict):
        setting = [setting]
    if is_number(setting) or isinstance(setting, bool):
        return float(setting)
    if isinstance(setting, (list, tuple)):
        if not setting:
            return None
        if all(not isinstance(e, dict) for e in setting):
            values = [float(e) for e in setting]
            scaled = t * (len(values) - 1)
            i0 = int(scaled)
            i1 = min(len(values) - 1, i0 + 1)
            frac = scaled - i0
            return (1 - frac) * values[i0] + frac * values[i1]
        for cond in setting:
            f = cond.get("filter")
            if f is None or f == "*" or (name and f in name):
                return evaluate_setting(name, cond["value"], t)
        return None
    raise ValueError(f"unexpected parameter value {setting!r}")


def resolve(name: str, settings: Sequence[Any], t: float, default: Optional[float]) -> Optional[float]:
    """Settings from highest to lowest precedence (the model's own, then the merge's):
    the first that gives a value for this tensor, else `default`."""
    for s in settings:
        if s is None:
            continue
        v = evaluate_setting(name, s, t)
        if v is not None:
            return v
    return default
