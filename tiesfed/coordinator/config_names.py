"""The coordinator YAML speaks the CLI's names too.

`tiesfed coordinator serve --spool S --base B --round r1 --clients a,b` and a YAML of

    spool: S
    base: B
    round: r1
    clients: [a, b]         # or "a,b"; with weights: [1, 2], quorum, deadline, options: {k: 20}

are the same coordinator: `spool`, `base`, `tls` and `abandon_after` are
`spool_dir`, `base_model`, `tls_dir` and `abandon_after_s`; dashes may stand for
underscores (`ray-address`); `round` + `clients` (with `weights`, `quorum`,
`deadline`, `late_policy`, `replace_policy`, `options` or `option: [k=20]`) is
one entry of `rounds`. Listen, crl, insecure, aggregator, ... keep their names.
"""

from __future__ import annotations

from typing import Any

import yaml

#: CLI name -> CoordinatorConfig field, where they differ.
ALIASES = {"spool": "spool_dir", "base": "base_model", "tls": "tls_dir", "abandon_after": "abandon_after_s"}
#: Shorthand round keys (with `round` and `clients`) -> RoundConfig fields.
ROUND_KEYS = {"weights": None, "quorum": "quorum", "deadline": "deadline_s", "late_policy": "late_policy",
              "replace_policy": "replace_policy", "options": "options", "option": None,
              "secure_aggregation": "secure_aggregation", "secagg": "secagg"}


def _list(value: Any, what: str) -> list:
    if isinstance(value, str):
        return [v for v in value.replace(",", " ").split() if v]
    if isinstance(value, (list, tuple)):
        return list(value)
    raise ValueError(f"{what} must be a list or a comma-separated string, got {value!r}")


def _shorthand_round(out: dict) -> dict:
    """Pop `round`, `clients` and the round keys of `out`: one RoundConfig as a dict."""
    round_id, clients = out.pop("round", None), out.pop("clients", None)
    if round_id is None or clients is None:
        raise ValueError("round and clients go together (one round; `rounds: [...]` for several)")
    ids = _list(clients, "clients")
    if not ids:
        raise ValueError("clients: give at least one client id")
    weights = out.pop("weights", None)
    if weights is not None:
        weights = _list(weights, "weights")
        if len(weights) != len(ids):
            raise ValueError(f"weights: {len(weights)} weights for {len(ids)} clients")
        ids = [{"client_id": c, "weight": w} for c, w in zip(ids, weights)]
    rnd: dict = {"round_id": str(round_id), "participants": ids}
    for key, field in ROUND_KEYS.items():
        if field is not None and key in out:
            rnd[field] = out.pop(key)
    if "option" in out:  # the CLI's --option KEY=VALUE, repeatable
        options = dict(rnd.get("options") or {})
        for item in _list(out.pop("option"), "option"):
            key, sep, value = str(item).partition("=")
            if not sep:
                raise ValueError(f"option: expected KEY=VALUE, got {item!r}")
            options[key.strip().replace("-", "_")] = yaml.safe_load(value)
        rnd["options"] = options
    return rnd


def cli_names(data: Any) -> Any:
    """A coordinator YAML mapping with the CLI's names turned into CoordinatorConfig's."""
    if not isinstance(data, dict):
        return data
    out: dict = {}
    given: dict[str, str] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        name = ALIASES.get(name, name)
        if name in out:
            raise ValueError(f"{given[name]!r} and {key!r} are the same setting ({name}): give one of them")
        out[name], given[name] = value, str(key)
    if "round" in out or "clients" in out:
        out["rounds"] = list(out.get("rounds") or []) + [_shorthand_round(out)]
    return out
