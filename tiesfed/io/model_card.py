"""The merged model's README.md: a model card that says it is a merge, and of what.

The output folder gets the base's side files (config, tokenizer, ...), but the
base's README.md would make the merge claim to be the base. This module writes a
card of its own instead: YAML front matter (`base_model`, `tags`, `library_name`
when the base has a config.json, the base's `license` when its card names one),
then the method, its options, each model with its weight and density (for a
federated round: each participant's client id and contribution digest), the
tiesfed version, and the name of the config file written beside it, from which the
merge can be run again. The local engine and the coordinator both call it.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from tiesfed.core.options import MergeConfig, ModelEntry
from tiesfed.core.tensor_params import is_number
from tiesfed.io.files import write_atomic

__all__ = ["CardModel", "CARD_FILE", "TIESFED_CONFIG", "MERGEKIT_CONFIG", "ROUND_CONFIG", "base_front_matter",
           "render_card", "write_local_card", "write_round_card"]

CARD_FILE = "README.md"
#: the config written beside a local merge: tiesfed's own format, or the user's mergekit YAML verbatim
TIESFED_CONFIG = "tiesfed_config.yaml"
MERGEKIT_CONFIG = "mergekit_config.yml"
#: the round's config (options, participants) beside a federated round's model
ROUND_CONFIG = "tiesfed_round.yaml"
TAGS = ["merge", "tiesfed"]


@dataclass(frozen=True)
class CardModel:
    """One merged model as the card lists it: a path (local) or a client id (federated)."""

    name: str
    weight: str
    density: str
    digest: Optional[str] = None  # a federated contribution's sha256


def tiesfed_version() -> str:
    try:
        return metadata.version("tiesfed")
    except metadata.PackageNotFoundError:
        return "unknown"


def base_front_matter(base_folder: Path) -> dict:
    """The YAML front matter of the base's README.md, or {} when it has none (or it does not parse)."""
    card = Path(base_folder) / CARD_FILE
    try:
        text = card.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return {}
    lines = text.splitlines()
    if not lines or lines[0].strip() != "---":
        return {}
    for i, line in enumerate(lines[1:], start=1):
        if line.strip() == "---":
            try:
                meta = yaml.safe_load("\n".join(lines[1:i]))
            except yaml.YAMLError:
                return {}
            return meta if isinstance(meta, dict) else {}
    return {}


def _front_matter(base_model: str, base_folder: Path) -> dict:
    meta: dict[str, Any] = {"base_model": base_model, "tags": list(TAGS)}
    if (Path(base_folder) / "config.json").is_file():
        meta["library_name"] = "transformers"
    lic = base_front_matter(base_folder).get("license")
    if isinstance(lic, (str, list)) and lic:
        meta["license"] = lic
    return meta


def _cell(v: object) -> str:
    """A markdown table cell: no pipes or newlines from user-given values."""
    return str(v).replace("|", "\\|").replace("\n", " ")


def render_card(
    *,
    base_model: str,
    base_folder: Path,
    method: str,
    options: dict,
    models: Sequence[CardModel],
    config_file: Optional[str],
    rerun: Optional[str] = None,
    round_id: Optional[str] = None,
    merged_sha256: Optional[str] = None,
    side_files: str = "The config, tokenizer and other side files are the base's.",
) -> str:
    """The card's text. `options`: name → value as the merge ran; `rerun`: a command that reruns it;
    `side_files`: where the config and tokenizer came from."""
    meta = yaml.safe_dump(_front_matter(base_model, base_folder), sort_keys=False, allow_unicode=True).strip()
    kind = f"federated TIES-Merging round `{round_id}`" if round_id else "local merge"
    out = [
        "---", meta, "---", "",
        "# Merged model", "",
        f"This model is a **merge**, not the base model: the {kind} of {len(models)} fine-tuned "
        f"model{'s' if len(models) != 1 else ''} of `{base_model}`, made with "
        f"tiesfed {tiesfed_version()} using the `{method}` method. {side_files}", "",
        "## Method and options", "",
        "| option | value |", "|---|---|",
    ]
    out += [f"| {_cell(k)} | {_cell(v)} |" for k, v in options.items()]
    out += ["", "## Participants" if round_id else "## Models", ""]
    if round_id:
        out += ["| client id | weight | density | contribution sha256 |", "|---|---|---|---|"]
        out += [f"| {_cell(m.name)} | {_cell(m.weight)} | {_cell(m.density)} | "
                f"{f'`{m.digest}`' if m.digest else 'n/a'} |" for m in models]
        if merged_sha256:
            out += ["", f"Merged task vector: sha256 `{merged_sha256}` (signed by the coordinator)."]
    else:
        out += ["| model | weight | density |", "|---|---|---|"]
        out += [f"| {_cell(m.name)} | {_cell(m.weight)} | {_cell(m.density)} |" for m in models]
    out += ["", "## Reproducing", ""]
    if config_file:
        out.append(f"The merge's config is `{config_file}`, written beside this card.")
    if rerun:
        out += ["", "```bash", rerun, "```"]
    return "\n".join(out) + "\n"


def _write_text(path: Path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _setting(settings: Optional[tuple], plain: Optional[float], fallback: str) -> str:
    """A model's weight or density as the card shows it: a number, or the per-tensor settings."""
    if settings is not None:
        given = [s for s in settings if s is not None]
        if not given:
            return fallback
        return str(given[0]) if is_number(given[0]) else f"per tensor: {given[0]}"
    return fallback if plain is None else f"{plain:g}"


def _local_model(m: ModelEntry, k: float, keeps_all: bool) -> CardModel:
    if m.sparsifier:  # mergekit's sparsifier runs before a keep-all trim
        density = f"{_setting(m.density_settings, m.density, '1')} ({m.sparsifier['method']})"
    else:
        density = "1 (no trim)" if keeps_all else _setting(m.density_settings, m.density, f"{k / 100:g}")
    return CardModel(name=m.model, weight=_setting(m.weight_settings, m.weight, "1"), density=density)


def write_local_card(out_dir: Path, base_folder: Path, config: MergeConfig,
                     source_config: Optional[Path] = None, random_seed: Optional[int] = None) -> list[str]:
    """README.md and the config beside it, for a local merge; returns the files written.

    A mergekit-format merge given as `source_config` keeps the user's YAML verbatim as
    `mergekit_config.yml` (what mergekit writes); otherwise the config is written in
    tiesfed's own format, absolute paths, as `tiesfed_config.yaml`."""
    out_dir = Path(out_dir)
    opts = config.options
    if source_config is not None and config.semantics == "mergekit":
        shutil.copyfile(source_config, out_dir / MERGEKIT_CONFIG)
        config_file = MERGEKIT_CONFIG
    else:
        dumped = config.model_dump(mode="json", by_alias=True, exclude_none=True)
        _write_text(out_dir / TIESFED_CONFIG, yaml.safe_dump(dumped, sort_keys=False, allow_unicode=True))
        config_file = TIESFED_CONFIG
    options: dict[str, Any] = {"semantics": config.semantics}
    options.update(opts.model_dump(mode="json", by_alias=True))
    options["keep_base"] = ", ".join(opts.keep_base) or "none"
    for key in ("value_dtype",):
        options[key] = options[key] or "as stored"
    options["dtype"] = config.dtype or "as stored"
    options["out_dtype"] = config.out_dtype or options["dtype"]
    if random_seed is not None:
        options["random_seed"] = f"{random_seed} (mergekit's masks replayed)"
    keeps_all = opts.method in ("task_arithmetic", "average")
    models = [_local_model(m, opts.k, keeps_all) for m in config.models]
    side = ("The config and other side files are the base's; the tokenizer is "
            f"`{config.tokenizer_source}`'s (`tokenizer_source`)." if config.tokenizer_source
            else "The config, tokenizer and other side files are the base's.")
    if config.chat_template:
        side += " The chat template is the config's (`chat_template`)."
    if config.vocab == "union":
        side += (" Its vocabulary also holds the tokens a fine-tune appended, with that fine-tune's embedding "
                 "rows (`vocab: union`): the tokenizer and config.json's vocab_size include them.")
    elif config.vocab == "base":
        side += " A fine-tune with appended tokens is read at the base's embedding rows (`vocab: base`)."
    text = render_card(base_model=config.base_model, base_folder=base_folder, method=opts.method, options=options,
                       models=models, config_file=config_file,
                       rerun=f"tiesfed merge --config {config_file} -o OUT/"
                       + (f" --random-seed {random_seed}" if random_seed is not None else ""), side_files=side)
    _write_text(out_dir / CARD_FILE, text)
    return [CARD_FILE, config_file]


def write_round_card(out_dir: Path, base_folder: Path, round_config: dict, digests: dict[str, str],
                     merged_sha256: Optional[str] = None) -> list[str]:
    """README.md and the round's config (`tiesfed_round.yaml`) beside a federated round's model.

    `round_config`: the round's config as JSON-able data (`round_id`, `options`, `participants`
    with `client_id`, `weight`, `density`); `digests`: the sha256 of each folded contribution,
    by client id: the participants the card lists."""
    out_dir = Path(out_dir)
    _write_text(out_dir / ROUND_CONFIG, yaml.safe_dump(round_config, sort_keys=False, allow_unicode=True))
    options = dict(round_config.get("options") or {})
    if isinstance(options.get("keep_base"), (list, tuple)):
        options["keep_base"] = ", ".join(options["keep_base"]) or "none"
    k = float(options.get("k", 20.0))
    keeps_all = options.get("method") in ("task_arithmetic", "average")
    given = {p["client_id"]: p for p in round_config.get("participants") or [] if isinstance(p, dict)}
    models = []
    for cid in sorted(digests):
        if cid not in given:  # a merged stream names its contributors only
            models.append(CardModel(name=cid, weight="n/a", density="n/a", digest=digests[cid]))
            continue
        p = given[cid]
        d = p.get("density")
        density = "1 (no trim)" if keeps_all else f"{d if d is not None else k / 100:g}"
        models.append(CardModel(name=cid, weight=f"{p.get('weight', 1.0):g}", density=density, digest=digests[cid]))
    text = render_card(base_model=str(base_folder), base_folder=base_folder,
                       method=str(options.get("method", "ties")), options=options, models=models,
                       config_file=ROUND_CONFIG, round_id=str(round_config.get("round_id", "")),
                       merged_sha256=merged_sha256)
    _write_text(out_dir / CARD_FILE, text)
    return [CARD_FILE, ROUND_CONFIG]
