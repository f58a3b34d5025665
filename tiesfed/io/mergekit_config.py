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
refusing by field what a round cannot carry (gradients, filters, differing gammas, casts, another
tokenizer, a vocabulary grown by union; fine-tunes read at the base's rows are each client's own cut). `slices:`/`modules:` that keep every layer in place read as `models:` (`mergekit_layout`);
`tokenizer_source` and `chat_template` are checked and resolved by `tokenizer_source`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from tiesfed.core.options import MergeConfig, MergeOptions, ModelEntry
from tiesfed.core.sparsify import OPTION_NAMES, check_della
from tiesfed.core.tensor_params import is_number, layer_count
from tiesfed.io.compat import read_config
from tiesfed.io.hub_cache import HUB_ID, cached_snapshot, hub_cache_dir
from tiesfed.io.mergekit_layout import MergekitConfigError, config_layers, fail, layout
from tiesfed.io.model_io import ModelReader, mergeable
from tiesfed.io.tokenizer_source import (
    TokenizerSourceError,
    check_tokenizer_source,
    resolve_chat_template,
    tokenizer_setting,
)
from tiesfed.io.vocab_rows import VocabularyError, any_resized, union_donor

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
#: `name` names a merge inside a mergekit-mega file; mergekit-yaml ignores it, and so does tiesfed
TOP_KEYS = {"merge_method", "base_model", "models", "dtype", "out_dtype", "parameters", "tokenizer_source",
            "tokenizer", "chat_template", "slices", "modules", "name"}
SHARED = {"normalize", "rescale", "int8_mask", "lambda"}
PER_MODEL = {"weight", "density"}


def is_mergekit(raw: object) -> bool:
    """A YAML in mergekit's format: it names `merge_method` (tiesfed's own names `method`)."""
    return isinstance(raw, dict) and "merge_method" in raw


_fail = fail


def _dtype(raw: dict, key: str) -> Optional[str]:
    v = raw.get(key)
    if v is None:
        return None
    name = str(v).removeprefix("torch.")
    if name not in DTYPES:
        raise _fail(key, f"{v!r} is not one of {', '.join(sorted(DTYPES))}")
    return name


def _model_path(field: str, ref: object, cwd: Path) -> str:
    """A model reference as mergekit takes it: a folder (relative ones from the working directory), else a
    Hub id, which tiesfed finds only in the local hub cache (it does not download)."""
    if not isinstance(ref, str) or not ref:
        raise _fail(field, "must be a path to a model folder")
    if "+" in ref:
        raise _fail(field, f"{ref!r}: a LoRA reference (model+lora) is not supported; merge the adapter first")
    p = Path(ref).expanduser()
    p = p if p.is_absolute() else cwd / p
    if not p.exists() and HUB_ID.match(ref):
        snap = cached_snapshot(ref)
        if snap is None:
            raise _fail(field, f"{ref!r} is not a folder under {cwd} (mergekit's rule: relative to the working "
                               f"directory), nor a Hub model in the local cache ({hub_cache_dir()}): tiesfed does not "
                               f"download; fetch it first (huggingface-cli download {ref.split('@')[0]}) or give "
                               "its folder")
        return str(snap)
    return str(p)


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
                    else "is not a parameter of this merge method") + " (mergekit would ignore it): remove it"
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
            raise _fail(k, "is not a field of mergekit's config (mergekit 0.1.5 would ignore it): remove it")
    if not isinstance(method, str):
        raise _fail("merge_method", "must be a method name")
    if method in FOREIGN:
        raise _fail("merge_method", f"{method!r} is not a sum of task vectors, which is all tiesfed merges; "
                                    "use mergekit for it")
    if method not in GTA and method != "linear":
        raise _fail("merge_method", f"unknown merge method {method!r}")
    tok_field, tok_source = tokenizer_setting(raw)

    linear = method == "linear"
    consensus, sparsify, normalize_default, rescale_default = GTA.get(method, (None, None, True, False))
    own_param = SPARSIFIER_PARAMS.get(sparsify or "")
    per_model = PER_MODEL | ({own_param[0]} if own_param else set())
    shared_keys = {"normalize", "weight"} if linear else SHARED | per_model
    params = _params("parameters", raw.get("parameters"), shared_keys)
    for k, v in params.items():
        params[k] = _check_setting(f"parameters.{k}", v, shared=k not in per_model)

    base_ref = raw.get("base_model")
    if base_ref is None and not linear:
        raise _fail("base_model", f"{method} needs a base model")
    base = _model_path("base_model", base_ref, cwd) if base_ref is not None else None
    lay = layout(raw, base_ref, lambda ref: _layers(ref, cwd))
    levels = []  # the slice's and the module's parameters, between a model's own and the merge's
    for field, lvl in lay.levels:
        lvl = _params(field, lvl, shared_keys)
        levels.append({k: _check_setting(f"{field}.{k}", v, shared=k not in per_model) for k, v in lvl.items()})
    chain = [*levels, params]

    def shared(key: str, default: Any) -> Any:
        return next((lvl[key] for lvl in chain if key in lvl), default)

    normalize = bool(shared("normalize", normalize_default))
    rescale = bool(shared("rescale", rescale_default))
    lam = float(shared("lambda", 1.0))
    if not isinstance(shared("int8_mask", False), bool):
        raise _fail("parameters.int8_mask", "must be true or false")
    in_slices = ".sources[" in lay.sources[0].field
    if not linear and in_slices and all(src.model != base_ref for src in lay.sources):
        raise _fail(lay.sources[0].field.rsplit("[", 1)[0], f"list the base model {base_ref!r} among the sources, "
                                                             "as mergekit requires")

    entries: list[ModelEntry] = []
    for src in lay.sources:
        field = src.field
        path = _model_path(f"{field}.model", src.model, cwd)
        is_base = base is not None and (src.model == base_ref or Path(path) == Path(base))
        if is_base and not linear:
            continue  # mergekit leaves the base out of a task-vector merge, and reads none of its parameters
        # mergekit reads a model's own parameters of its scope only: merge-wide ones (lambda, normalize, ...)
        # given per model are ignored
        mine = {"weight"} if linear else per_model
        own = _params(f"{field}.parameters", src.parameters, shared_keys | mine)
        own = {k: _check_setting(f"{field}.parameters.{k}", v, shared=False) for k, v in own.items() if k in mine}
        ws = (own.get("weight"), *(lvl.get("weight") for lvl in chain))
        if all(w is None for w in ws):
            raise _fail(f"{field}.parameters.weight", "mergekit requires a weight for every model")
        ds = (own.get("density"), *(lvl.get("density") for lvl in chain))
        entry = _entry(path, ws, ds)
        if sparsify is not None and (sparsify != "magnitude" or rescale):
            entry = entry.model_copy(update={"sparsifier": _sparsifier(field, sparsify, rescale, own, chain, ds)})
        entries.append(entry)
    if linear:
        if base is None:
            base = entries[0].model  # the reference point: its own τ is 0, its weight still counts
        elif all(Path(e.model) != Path(base) for e in entries):
            if shared("weight", None) is None:
                raise _fail("base_model", "linear adds the base to the models, and it needs a weight: list it "
                                          "under `models` with one, or give parameters.weight")
            entries.append(_entry(base, tuple(lvl.get("weight") for lvl in chain), (None,)))
        if not normalize:
            total = [_constant(e.weight_settings, None) for e in entries]
            if any(w is None for w in total) or abs(sum(total) - 1.0) > 1e-6:
                raise _fail("parameters.normalize", "linear without normalize is Σ w·θ, which is a task-vector "
                                                    "merge only when the weights are plain numbers summing to 1")
    if not entries:
        raise _fail("models", "the only model listed is the base, so mergekit would write the base unchanged: "
                              "list the fine-tuned models to merge")

    # ties' magnitude trim is tiesfed's per-tensor top-k; every other sparsifier (DARE with or without
    # mergekit's L1 rescale, breadcrumbs, della, a rescaled magnitude trim) is mergekit's, run on each
    # tensor's τ before the merge (`ModelEntry.sparsifier`), and the trim then keeps all it left
    if linear or consensus is None:
        opt_method = "average" if normalize else "task_arithmetic"
    else:
        opt_method = "ties"
    donor, template, vocab = _tokenizer(raw, tok_field, tok_source, base, [e.model for e in entries], cwd)
    options = MergeOptions(
        method=opt_method, k=100.0, lam=lam, trim="tensor", election="mass", zero_sign="positive",
        disjoint="mean" if normalize else "sum", weight_semantics="mergekit",
    )
    return MergeConfig(base_model=base, models=entries, options=options, dtype=_dtype(raw, "dtype"),
                       out_dtype=_dtype(raw, "out_dtype"), semantics="mergekit", tokenizer_source=donor,
                       chat_template=template, vocab=vocab)


def _layers(ref: Any, cwd: Path) -> int:
    """A model's layer count, as mergekit takes it: config.json's, else counted from its tensors."""
    folder = Path(_model_path("base_model", ref, cwd))
    n = config_layers(read_config(folder))
    if n is not None:
        return n
    try:
        with ModelReader(folder) as r:
            return layer_count(r.names)
    except Exception as e:  # noqa: BLE001 - named in the error
        raise _fail("slices", f"cannot count the layers of {ref!r} to check the layer ranges: {e}") from None


def _tokenizer(raw: dict, field: str, source: Any, base: str, models: list[str],
               cwd: Path) -> tuple[Optional[str], Optional[str], Optional[str]]:
    """The folder whose tokenizer the output takes (None: the base's), the chat template to write and
    how grown vocabularies are read (`MergeConfig.vocab`)."""
    donor, vocab = None, None
    try:
        if source is not None:
            if source in ("union", "base"):
                donor_path = None
            else:
                donor_path = _model_path(field, source, cwd)
            donor = check_tokenizer_source(field, str(source), base, models, donor_path)
            vocab = "base"
            if source == "union" and union_donor(base, models) is not None:
                vocab = "union"
        refs = [base, *models] + ([donor] if donor else [])
        return donor, resolve_chat_template(raw.get("chat_template"), list(dict.fromkeys(refs))), vocab
    except TokenizerSourceError as e:
        raise MergekitConfigError(str(e)) from None
    except VocabularyError as e:
        raise MergekitConfigError(f"{field}: {source!r}: {e}") from None


def _sparsifier(field: str, method: str, rescale: bool, own: dict, chain: list[dict], densities: tuple) -> dict:
    """A model's mergekit sparsifier: method, rescale, and its own parameter's settings (gamma, epsilon)."""
    out: dict[str, Any] = {"method": method, "rescale": rescale}
    if method in SPARSIFIER_PARAMS:
        key, default = SPARSIFIER_PARAMS[method]
        out[key] = (own.get(key), *(lvl.get(key) for lvl in chain))
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
    if config.tokenizer_source or config.chat_template:
        key = "tokenizer_source" if config.tokenizer_source else "chat_template"
        raise RoundPlanError(f"{key}: a round's model carries the base's tokenizer files: merge locally "
                             "(tiesfed merge --config)")
    if config.vocab == "union" and (grown := any_resized(config.base_model, [m.model for m in config.models])):
        key = "tokenizer_source" if config.semantics == "mergekit" else "vocab"
        raise RoundPlanError(f"{key}: union: {grown} appended tokens, whose rows the merge would grow, and a round's "
                             "model has the base's shapes (each client reads its own model only): merge locally "
                             "(tiesfed merge --config), or give base (each client reads its model at the base's "
                             "rows: client submit --vocab base)")
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
