"""mergekit's three ways to list a merge's inputs (`models:`, `slices:`, `modules:`), brought
back to one list of models where they say the same thing as `models:`.

mergekit 0.1.5 turns `models:` into one slice whose sources cover every layer ([0, N]),
and a single-module architecture's `modules: {default: …}` into its slices. So a config
whose slices keep every layer in place — the slices run 0 … N in order, each slice's
sources share its `layer_range`, and every slice lists the same models — merges as
`models:` does, the slice's and the module's `parameters` ranking between a model's own
and the merge's. Several such slices are the same merge only when they carry the same
settings and no gradient (mergekit restarts a gradient in every slice). Slices that drop,
repeat, reorder or stack layers (frankenmerges) and multi-module models are refused,
naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

__all__ = ["Layout", "MergekitConfigError", "Source", "fail", "has_gradient", "layout"]


class MergekitConfigError(ValueError):
    """A mergekit config tiesfed cannot run as mergekit would; names the field."""


def fail(field_name: str, msg: str) -> MergekitConfigError:
    return MergekitConfigError(f"{field_name}: {msg}")


@dataclass(frozen=True)
class Source:
    """One input model as written: where it sits (for messages), its reference and parameters."""

    field: str
    model: Any
    parameters: Any = None


@dataclass(frozen=True)
class Layout:
    sources: list[Source]
    #: parameter levels between a model's own and the merge's (slice, then module), highest first
    levels: list[tuple[str, Any]] = field(default_factory=list)


FRANKEN = ("slices that drop, repeat, reorder or stack layers build a new architecture (a frankenmerge), which "
           "tiesfed does not merge; use mergekit (passthrough)")


def has_gradient(v: Any) -> bool:
    """A setting that varies over the layers: a list of numbers, or a filter whose value is one."""
    if isinstance(v, dict):
        return has_gradient(v.get("value"))
    if isinstance(v, list):
        return any(isinstance(e, (dict, list)) and has_gradient(e) for e in v) or (
            bool(v) and not any(isinstance(e, dict) for e in v))
    return False


def _mapping(field_name: str, v: Any, allowed: set[str]) -> dict:
    if not isinstance(v, dict):
        raise fail(field_name, "must be a mapping")
    for k in v:
        if k not in allowed:
            raise fail(f"{field_name}.{k}", f"is not a field here (mergekit knows {', '.join(sorted(allowed))})")
    return v


def _models(field_name: str, models: Any) -> list[Source]:
    if not isinstance(models, list) or not models:
        raise fail(field_name, "give at least one model")
    out = []
    for i, m in enumerate(models):
        f = f"{field_name}[{i}]"
        if isinstance(m, str):
            m = {"model": m}
        if not isinstance(m, dict) or "model" not in m:
            raise fail(f, "must be {model: PATH, parameters: {...}}")
        _mapping(f, m, {"model", "parameters"})
        if any(m["model"] == other.model for other in out):
            raise fail(f"{f}.model", f"{m['model']!r} is listed twice (mergekit refuses duplicate inputs)")
        out.append(Source(f, m["model"], m.get("parameters")))
    return out


def _slices(field_name: str, slices: Any, outer: list[tuple[str, Any]], base_ref: Any, shared: Any,
            layers_of: Callable[[Any], int]) -> Layout:
    if not isinstance(slices, list) or not slices:
        raise fail(field_name, "give at least one slice")
    ranges: list[tuple[int, int]] = []
    per_slice: list[list[Source]] = []
    for j, s in enumerate(slices):
        f = f"{field_name}[{j}]"
        _mapping(f, s, {"sources", "base_model", "residual_weight", "parameters"})
        if s.get("base_model") not in (None, base_ref):
            raise fail(f"{f}.base_model", "a slice's own base model is not supported: give one base_model for the merge")
        if s.get("residual_weight") is not None:
            raise fail(f"{f}.residual_weight", "is not supported (it is not a sum of task vectors)")
        srcs = s.get("sources")
        if not isinstance(srcs, list) or not srcs:
            raise fail(f"{f}.sources", "give at least one source")
        mine, rng = [], None
        for k, src in enumerate(srcs):
            g = f"{f}.sources[{k}]"
            _mapping(g, src, {"model", "layer_range", "parameters"})
            r = src.get("layer_range")
            if "model" not in src or not (isinstance(r, list) and len(r) == 2 and all(isinstance(x, int) for x in r)):
                raise fail(g, "must be {model: PATH, layer_range: [START, END]}")
            if rng is None:
                rng = (r[0], r[1])
            elif (r[0], r[1]) != rng:
                raise fail(f"{g}.layer_range", f"{r} differs from sources[0]'s {list(rng)}: this slice would merge "
                                               f"different layers into one; {FRANKEN}")
            if any(src["model"] == other.model for other in mine):
                raise fail(f"{g}.model", f"{src['model']!r} is listed twice in this slice")
            mine.append(Source(g, src["model"], src.get("parameters")))
        ranges.append(rng)
        per_slice.append(mine)
    end = 0
    for j, (a, b) in enumerate(ranges):
        if a != end or b <= a:
            raise fail(f"{field_name}[{j}].sources[0].layer_range",
                       f"[{a}, {b}] does not continue the slices before it (they end at layer {end}): {FRANKEN}")
        end = b
    expected = layers_of(base_ref if base_ref is not None else per_slice[0][0].model)
    if end != expected:
        raise fail(field_name, f"the slices cover layers 0 to {end}, the model has {expected}: {FRANKEN}")
    first = per_slice[0]
    if len(slices) > 1:
        for j, (s, mine) in enumerate(zip(slices[1:], per_slice[1:]), start=1):
            same_models = sorted(map(str, (x.model for x in mine))) == sorted(map(str, (x.model for x in first)))
            settings = {str(x.model): x.parameters for x in mine} == {str(x.model): x.parameters for x in first}
            if not (same_models and settings and s.get("parameters") == slices[0].get("parameters")):
                raise fail(f"{field_name}[{j}]", "several slices with other models or settings than slices[0] are not "
                                                 "supported: write one slice over every layer, with filters or "
                                                 "gradients for what varies")
        levels = [x.parameters for x in first] + [slices[0].get("parameters"), shared] + [v for _, v in outer]
        if any(has_gradient(v) for lvl in levels if isinstance(lvl, dict) for v in lvl.values()):
            raise fail(field_name, "gradients over several slices restart in every slice (mergekit's t runs 0 to 1 "
                                   "in each): write one slice over every layer")
    return Layout(first, [(f"{field_name}[0].parameters", slices[0].get("parameters")), *outer])


def layout(raw: dict, base_ref: Any, layers_of: Callable[[Any], int]) -> Layout:
    """The config's input models and the parameter levels above them; `layers_of(model)` (a reference
    as written) gives a model's layer count, asked only for slices."""
    forms = [k for k in ("models", "slices", "modules") if raw.get(k)]
    if len(forms) != 1:
        raise fail("models", "give exactly one of models, slices or modules")
    shared = raw.get("parameters")
    if forms[0] == "models":
        return Layout(_models("models", raw["models"]))
    if forms[0] == "slices":
        return _slices("slices", raw["slices"], [], base_ref, shared, layers_of)
    mods = raw["modules"]
    if not isinstance(mods, dict) or set(mods) != {"default"}:
        names = sorted(mods) if isinstance(mods, dict) else mods
        raise fail("modules", f"{names!r}: only a single `default` module (one-module models such as Llama) is "
                              "supported; a model of several modules (vision + language) needs mergekit")
    mod = _mapping("modules.default", mods["default"], {"slices", "models", "parameters"})
    outer = [("modules.default.parameters", mod.get("parameters"))]
    if bool(mod.get("slices")) == bool(mod.get("models")):
        raise fail("modules.default", "give exactly one of models or slices")
    if mod.get("models"):
        return Layout(_models("modules.default.models", mod["models"]), outer)
    return _slices("modules.default.slices", mod["slices"], outer, base_ref, shared, layers_of)


def config_layers(cfg: Optional[dict]) -> Optional[int]:
    """A model's layer count from its config.json, as mergekit reads it."""
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        v = (cfg or {}).get(key)
        if isinstance(v, int):
            return v
    return None
