"""Read a YAML in mergekit's format (it has `merge_method`) with mergekit 0.1.5's
defaults and semantics, into tiesfed's `MergeConfig`.

What this maps (see README "mergekit configs"): per-tensor top-k keeping
max(1, int(density·n)) (`trim: tensor`), a tied vote taking +1, election by
mass, weights multiplying τ before the vote (negative ones too) and the
disjoint mean dividing by the agreeing weights (`normalize`), else their sum;
density 1.0 unless given; density and weight gradients over the layers and
`{filter, value}` lists, resolved per tensor; `dtype` (inputs cast when read)
and `out_dtype`; model paths as mergekit takes them, from the working
directory. DARE (mergekit's L1 rescale, or none), breadcrumbs, della and a rescaled
magnitude trim run mergekit's sparsifier (`tiesfed.core.sparsify`) on each tensor
before the merge. What tiesfed cannot do is refused with an error naming the field.

`round_plan` turns such a config into what a federated round carries (the options, with the
sparsifier lifted into them so each client runs it, and one weight and density per model),
refusing by field what a round cannot carry (gradients, filters, differing gammas, casts).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from tiesfed.core.options import MergeConfig, MergeOptions, ModelEntry
from tiesfed.core.sparsify import OPTION_NAMES, check_della
from tiesfed.core.tensor_params import is_number
from tiesfed.io.model_io import ModelReader, mergeable


class MergekitConfigError(ValueError):
    """A mergekit config tiesfed cannot run as mergekit would; names the field."""


#: mergekit's generalized task arithmetic methods: (consensus, sparsification, normalize, rescale)
GTA = {
    "ties": ("sum", "magnitude", True, False),
    "dare_ties": ("sum", "random", False, True),
    "task_arithmetic": (None, None, False, False),
    "dare_linear": (None, "random", False, True),
    "breadcrumbs": (None, "magnitude_outliers", False, False),
    "breadcrumbs_ties": ("sum", "magnitude_outliers", False, False),
    "della": ("sum", "della_magprune", True, True),
    "della_linear": (None, "della_magprune", False, True),
}
#: the sparsifiers' own per-model parameters and their defaults in mergekit 0.1.5
SPARSIFIER_PARAMS = {"magnitude_outliers": ("gamma", 0.01), "della_magprune": ("epsilon", 0.15)}
#: mergekit methods that are not a sum of task vectors: no accumulator algebra for them
FOREIGN = {"slerp", "nuslerp", "multislerp", "model_stock", "passthrough", "karcher", "nearswap", "ram",
           "ramplus_tl", "sce", "arcee_fusion"}
DTYPES = {"float32", "float16", "bfloat16"}
TOP_KEYS = {"merge_method", "base_model", "models", "dtype", "out_dtype", "parameters", "tokenizer_source",
            "tokenizer", "chat_template", "slices", "modules"}
SHARED = {"normalize", "rescale", "int8_mask", "lambda"}
PER_MODEL = {"weight", "density"}


def is_mergekit(raw: object) -> bool:
    """A YAML in mergekit's format: it names `merge_method` (tiesfed's own names `method`)."""
    return isinstance(raw, dict) and "merge_method" in raw


def _fail(field: str, msg: str) -> MergekitConfigError:
    return MergekitConfigError(f"{field}: {msg}")


def _dtype(raw: dict, key: str) -> Optional[str]:
    v = raw.get(key)
    if v is None:
        return None
    name = str(v).removeprefix("torch.")
    if name not in DTYPES:
        raise _fail(key, f"{v!r} is not one of {', '.join(sorted(DTYPES))}")
    return name


def _model_path(field: str, ref: object, cwd: Path) -> str:
    if not isinstance(ref, str) or not ref:
        raise _fail(field, "must be a path to a model folder")
    if "+" in ref:
        raise _fail(field, f"{ref!r}: a LoRA reference (model+lora) is not supported; merge the adapter first")
    p = Path(ref).expanduser()
    return str(p if p.is_absolute() else cwd / p)


def _check_setting(field: str, v: Any, *, shared: bool) -> Any:
    """A number, a gradient (list of numbers) or a list of {filter, value}."""
    if is_number(v) or isinstance(v, bool):
        return v
    if shared:
        raise _fail(field, "gradients and filters are supported for weight and density only; give one value")
    items = [v] if isinstance(v, dict) else v
    if isinstance(items, list) and items:
        if all(is_number(e) for e in items):
            return v
        if all(isinstance(e, dict) and set(e) <= {"filter", "value"} and "value" in e for e in items):
            for i, e in enumerate(items):
                _check_setting(f"{field}[{i}].value", e["value"], shared=False)
            return [dict(e) for e in items]
    raise _fail(field, f"{v!r}: expected a number, a list of numbers (a gradient over the layers) or a list of "
                       "{filter, value}")


def _params(field: str, raw: object, allowed: set[str]) -> dict:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise _fail(field, "must be a mapping")
    for k in raw:
        if k not in allowed:
            what = ("is a parameter of breadcrumbs (gamma) or della (epsilon) only" if k in ("gamma", "epsilon")
                    else "is not a parameter of this merge method")
            raise _fail(f"{field}.{k}", what)
    return dict(raw)


def _constant(settings: tuple, default: Optional[float]) -> Optional[float]:
    """The value when every setting is a plain number (no gradient, no filter)."""
    for s in settings:
        if s is not None:
            return float(s) if is_number(s) else None
    return default


def from_mergekit(raw: dict, cwd: Optional[Path] = None) -> MergeConfig:
    """A mergekit config (already parsed YAML) as tiesfed's MergeConfig, or an error naming the field."""
    cwd = Path.cwd() if cwd is None else Path(cwd)
    method = raw.get("merge_method")
    for k in raw:
        if k not in TOP_KEYS:
            raise _fail(k, "is not a field of mergekit's config")
    if not isinstance(method, str):
        raise _fail("merge_method", "must be a method name")
    if method in FOREIGN:
        raise _fail("merge_method", f"{method!r} is not a sum of task vectors, which is all tiesfed merges; "
                                    "use mergekit for it")
    if method not in GTA and method != "linear":
        raise _fail("merge_method", f"unknown merge method {method!r}")
    for key, what in (("slices", "slices (layer ranges)"), ("modules", "modules")):
        if raw.get(key):
            raise _fail(key, f"{what} are not supported: tiesfed merges whole models of one shape; list them "
                             "under `models`")
    ts = raw.get("tokenizer_source")
    if ts not in (None, "base"):
        raise _fail("tokenizer_source", f"{ts!r} is not supported: tiesfed keeps the base's tokenizer "
                                        "(tokenizer_source: base); build the tokenizer with mergekit")
    tok = raw.get("tokenizer")
    if tok is not None:
        if not (isinstance(tok, dict) and tok.get("source", "base") == "base" and not tok.get("tokens")
                and tok.get("pad_to_multiple_of") is None):
            raise _fail("tokenizer", "only {source: base} is supported: tiesfed keeps the base's tokenizer")
    if raw.get("chat_template") is not None:
        raise _fail("chat_template", "is not supported: tiesfed copies the base's tokenizer files as they are")
    models_raw = raw.get("models")
    if not isinstance(models_raw, list) or not models_raw:
        raise _fail("models", "give at least one model")

    linear = method == "linear"
    consensus, sparsify, normalize_default, rescale_default = GTA.get(method, (None, None, True, False))
    own_param = SPARSIFIER_PARAMS.get(sparsify or "")
    per_model = PER_MODEL | ({own_param[0]} if own_param else set())
    shared_keys = {"normalize", "weight"} if linear else SHARED | per_model
    params = _params("parameters", raw.get("parameters"), shared_keys)
    for k, v in params.items():
        params[k] = _check_setting(f"parameters.{k}", v, shared=k not in per_model)
    normalize = bool(params.get("normalize", normalize_default))
    rescale = bool(params.get("rescale", rescale_default))
    lam = float(params.get("lambda", 1.0))

    base_ref = raw.get("base_model")
    if base_ref is None and not linear:
        raise _fail("base_model", f"{method} needs a base model")
    base = _model_path("base_model", base_ref, cwd) if base_ref is not None else None

    entries: list[ModelEntry] = []
    for i, m in enumerate(models_raw):
        field = f"models[{i}]"
        if isinstance(m, str):
            m = {"model": m}
        if not isinstance(m, dict) or "model" not in m:
            raise _fail(field, "must be {model: PATH, parameters: {...}}")
        for k in m:
            if k not in ("model", "parameters"):
                raise _fail(f"{field}.{k}", "is not a field of a model entry")
        path = _model_path(f"{field}.model", m["model"], cwd)
        own = _params(f"{field}.parameters", m.get("parameters"), {"weight"} if linear else per_model)
        for k, v in own.items():
            own[k] = _check_setting(f"{field}.parameters.{k}", v, shared=False)
        is_base = base is not None and (m["model"] == base_ref or Path(path) == Path(base))
        if is_base and not linear:
            continue  # mergekit leaves the base out of a task-vector merge
        ws = (own.get("weight"), params.get("weight"))
        if all(w is None for w in ws):
            raise _fail(f"{field}.parameters.weight", "mergekit requires a weight for every model")
        ds = (own.get("density"), params.get("density"))
        entry = _entry(path, ws, ds)
        if sparsify is not None and (sparsify != "magnitude" or rescale):
            entry = entry.model_copy(update={"sparsifier": _sparsifier(field, sparsify, rescale, own, params, ds)})
        entries.append(entry)
    if linear:
        if base is None:
            base = entries[0].model  # the reference point: its own τ is 0, its weight still counts
        elif all(Path(e.model) != Path(base) for e in entries):
            if params.get("weight") is None:
                raise _fail("base_model", "linear adds the base to the models, and it needs a weight: list it "
                                          "under `models` with one, or give parameters.weight")
            entries.append(_entry(base, (None, params["weight"]), (None, None)))
        if not normalize:
            total = [_constant(e.weight_settings, None) for e in entries]
            if any(w is None for w in total) or abs(sum(total) - 1.0) > 1e-6:
                raise _fail("parameters.normalize", "linear without normalize is Σ w·θ, which is a task-vector "
                                                    "merge only when the weights are plain numbers summing to 1")
    if not entries:
        raise _fail("models", "every model is the base: nothing to merge")

    # ties' magnitude trim is tiesfed's per-tensor top-k; every other sparsifier (DARE with or without
    # mergekit's L1 rescale, breadcrumbs, della, a rescaled magnitude trim) is mergekit's, run on each
    # tensor's τ before the merge (`ModelEntry.sparsifier`), and the trim then keeps all it left
    if linear or consensus is None:
        opt_method = "average" if normalize else "task_arithmetic"
    else:
        opt_method = "ties"
    if "int8_mask" in params and not isinstance(params["int8_mask"], bool):
        raise _fail("parameters.int8_mask", "must be true or false")

    options = MergeOptions(
        method=opt_method, k=100.0, lam=lam, trim="tensor", election="mass", zero_sign="positive",
        disjoint="mean" if normalize else "sum", weight_semantics="mergekit",
    )
    return MergeConfig(base_model=base, models=entries, options=options, dtype=_dtype(raw, "dtype"),
                       out_dtype=_dtype(raw, "out_dtype"), semantics="mergekit")


def _sparsifier(field: str, method: str, rescale: bool, own: dict, params: dict, densities: tuple) -> dict:
    """A model's mergekit sparsifier: method, rescale, and its own parameter's settings (gamma, epsilon)."""
    out: dict[str, Any] = {"method": method, "rescale": rescale}
    if method in SPARSIFIER_PARAMS:
        key, default = SPARSIFIER_PARAMS[method]
        out[key] = (own.get(key), params.get(key))
        out[f"{key}_default"] = default
        value, density = _constant(out[key], default), _constant(densities, 1.0)
        if method == "della_magprune" and value is not None and density is not None:
            try:
                check_della(density, value)
            except ValueError as e:
                raise _fail(f"{field}.parameters.epsilon", str(e)) from None
    return out


def _entry(path: str, weights: tuple, densities: tuple) -> ModelEntry:
    """A model with per-tensor settings; plain numbers also fill `weight`/`density` where they fit
    (they are what the report shows)."""
    w = _constant(weights, None)
    d = _constant(densities, 1.0)
    return ModelEntry(
        model=path,
        weight=w if w is not None and w > 0 else 1.0,
        density=d if d is not None and 0 < d <= 1 else None,
        weight_settings=weights, density_settings=densities, density_default=1.0,
    )


# ------------------------------------------------------------------ a config as a federated round


class RoundPlanError(ValueError):
    """A merge config a federated round cannot carry; names the field."""


def round_plan(config: MergeConfig) -> tuple[MergeOptions, list[tuple[float, Optional[float]]]]:
    """What a round carries of `config`: its options (every model's mergekit sparsifier lifted into
    them, so each client runs it) and one (weight, density) per model, for the round's participants.
    Refuses, naming the field, what a round cannot carry: per-tensor gradients or filters, weights
    that are not positive, sparsifier settings that differ between models, a dtype cast."""
    opts = config.options
    plan: list[tuple[float, Optional[float]]] = []
    for i, m in enumerate(config.models):
        field = f"models[{i}] ({m.model})"
        w = m.weight if m.weight_settings is None else _plain(f"{field}.weight", m.weight_settings, m.weight_default)
        d = m.density if m.density_settings is None else _plain(f"{field}.density", m.density_settings,
                                                                m.density_default)
        if w is None or w <= 0:
            raise RoundPlanError(f"{field}.weight: {w}: a round's participants have positive weights; merge "
                                 "locally (tiesfed merge --config)")
        if d is not None and d <= 0:
            raise RoundPlanError(f"{field}.density: {d:g}: a round keeps a positive density")
        plan.append((w, None if d is None else min(d, 1.0)))
    update = _round_sparsifier(config)
    if update:
        opts = MergeOptions.model_validate({**opts.model_dump(), **update})
        if opts.sparsifier == "della":
            for i, (_, d) in enumerate(plan):
                try:
                    check_della(opts.k / 100 if d is None else d, opts.epsilon_value)
                except ValueError as e:
                    raise RoundPlanError(f"models[{i}].epsilon: {e}") from None
    _check_dtypes(config)
    return opts, plan


def _plain(field: str, settings: tuple, default: Optional[float]) -> Optional[float]:
    """One value for every tensor: the settings' first plain number, else the default."""
    for s in settings:
        if s is None:
            continue
        if not is_number(s):
            raise RoundPlanError(f"{field}: {s!r} is a gradient or a filter list, resolved per tensor; a round "
                                 "carries one value per participant: merge locally (tiesfed merge --config)")
        return float(s)
    return default


def _round_sparsifier(config: MergeConfig) -> dict:
    """The options' sparsifier settings that give every model its own mergekit sparsifier: the same
    method, rescale and gamma/epsilon for all. mergekit's plain ties trim becomes the magnitude
    sparsifier in a round: it keeps max(1, int(density·n)) per tensor, as mergekit (and the local merge)."""
    sps = [m.sparsifier for m in config.models]
    if not any(sps):
        if config.semantics == "mergekit" and config.options.method == "ties" and config.options.sparsifier is None:
            return {"sparsifier": "magnitude", "rescale": False}
        return {}
    if config.options.sparsifier is not None:
        raise RoundPlanError("options.sparsifier: the models name their own sparsifier")
    names = {core: name for name, core in OPTION_NAMES.items()}
    out: dict[str, Any] = {}
    for i, (m, sp) in enumerate(zip(config.models, sps)):
        field = f"models[{i}] ({m.model})"
        if not sp:
            raise RoundPlanError(f"{field}.sparsifier: a round runs one sparsifier for every model")
        mine: dict[str, Any] = {"sparsifier": names[sp["method"]], "rescale": bool(sp.get("rescale"))}
        for key in ("gamma", "epsilon"):
            if key in sp:
                mine[key] = _plain(f"{field}.{key}", tuple(sp[key] or ()), sp.get(f"{key}_default"))
        for key, v in mine.items():
            if i and out.get(key) != v:
                raise RoundPlanError(f"{field}.{key}: {v!r}, where models[0] has {out.get(key)!r}: a round carries "
                                     "one for every model")
        out = out or mine
    return out


def _check_dtypes(config: MergeConfig) -> None:
    """`dtype`/`out_dtype` cast nothing a round would carry: every float tensor already has it."""
    for key in ("dtype", "out_dtype"):
        want = getattr(config, key)
        if want is None:
            continue
        folders = [config.base_model] + ([m.model for m in config.models] if key == "dtype" else [])
        for folder in folders:
            with ModelReader(folder) as r:
                tensors = mergeable(r.manifest(), config.options.keep_base) if key == "dtype" else r.manifest()
                other = next((t for t in tensors if t.dtype.is_floating_point and t.dtype != getattr(torch, want)),
                             None)
            if other is not None:
                raise RoundPlanError(f"{key}: {want} casts {folder}'s {other.name!r} ({other.dtype}), and a round "
                                     "cannot carry a cast (clients upload in their models' dtypes): merge locally "
                                     "(tiesfed merge --config), or convert the models first")
