"""Fine-tunes with a resized vocabulary, read at the base's rows (`--vocab base`, the
`vocab: base` config key, mergekit's `tokenizer_source: base`).

The common case: a fine-tune appended tokens after the base's vocabulary (a pad token, chat
markers) and its embeddings and output head grew by those rows, maybe padded to a multiple.
mergekit 0.1.5 with `tokenizer_source: base` keeps the base's tokenizer and gives every model
the rows of the base's tokens (`PermutedVocabulary`): when a fine-tune's vocabulary starts with
the base's, those are its first rows. So such a tensor is read as a flat prefix of its bytes
(`ModelReader.keep_rows`), which the blockwise and span readers take as any tensor, and the
merge goes on as usual; the added tokens' rows are never read. A fine-tune whose tokens sit at
other ids is refused naming the first that differs (mergekit would gather its rows by token;
tiesfed does not), and so is one without the base's tokens.

`union` (`--vocab union`, mergekit's `tokenizer_source: union`) with one fine-tune that appended
tokens: mergekit gives each model its rows of the base's tokens, then, for the added tokens, the
fine-tune's own rows (the base and the other models lack them: the one model that has them is
their source). `GrownReader` reads exactly that, as flat ranges of the two files; every τ is 0
on the new rows, so the output's are the fine-tune's, and the trim counts the grown tensor as
mergekit's does. Tokens appended by several models are refused: mergekit 0.1.5 numbers them in
the order of a Python set of the models, which changes from run to run (`union_donor`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional, Sequence

import torch

from tiesfed.io.compat import reconcile_tied
from tiesfed.io.lora import LoraReader
from tiesfed.io.reader import ModelReader
from tiesfed.io.safetensors_format import ModelError, TensorInfo
from tiesfed.io.tokenizer_source import appended_tokens, vocabulary

__all__ = ["VOCAB_OPTION", "GrownReader", "VocabularyError", "any_resized", "grow_union", "is_vocabulary_tensor",
           "finish_union", "prefix_problem", "read_at_base_rows", "resized_tensors", "union_donor",
           "write_union_tokenizer"]

#: how each entry point names the option (the error of a resized fine-tune lists them)
VOCAB_OPTION = "--vocab base (tiesfed merge), vocab: base (tiesfed's YAML) or tokenizer_source: base (a mergekit config)"
_EMBEDDINGS = ("embed", "wte", "word_embeddings")
_HEADS = ("lm_head.weight", "lm_head.bias", "embed_out.weight", "output.weight")


def _numel(shape: Sequence[int]) -> int:
    return math.prod(shape)


def is_vocabulary_tensor(name: str) -> bool:
    """A tensor with one row per token: input embeddings or the output head (mergekit's vocabulary axis)."""
    return any(e in name for e in _EMBEDDINGS) or name.endswith(_HEADS)


def _grown(o: TensorInfo, b: TensorInfo) -> bool:
    return len(o.shape) == len(b.shape) >= 1 and o.shape[1:] == b.shape[1:] and o.shape[0] > b.shape[0]


def resized_tensors(base: ModelReader, other: ModelReader) -> list[tuple[str, int, int]]:
    """(name, rows, base rows) of every vocabulary tensor `other` holds with more rows than the base."""
    return [(n, other.info(n).shape[0], base.info(n).shape[0]) for n in base.names
            if n in other and is_vocabulary_tensor(n) and _grown(other.info(n), base.info(n))]


def prefix_problem(base_folder: str, folder: str, rows: Optional[int] = None) -> Optional[str]:
    """Why `folder`'s vocabulary does not start with the base's (every base token at its id; ids
    below `rows` only), or None when it does or either has no tokenizer files (mergekit takes a
    model without one as having the base's)."""
    b, o = vocabulary(base_folder), vocabulary(folder)
    if b is None or o is None:
        return None
    for tok, i in sorted(b.items(), key=lambda kv: kv[1]):
        if rows is not None and i >= rows:
            continue
        if o.get(tok) != i:
            where = "absent" if tok not in o else f"id {o[tok]}"
            return f"the base's token {tok!r} (id {i}) is {where} in its tokenizer"
    return None


def read_at_base_rows(base: ModelReader, other: ModelReader) -> list[str]:
    """Make `other`'s grown vocabulary tensors read as their first rows, as many as the base's.
    Returns what was cut; raises ModelError (changing nothing) if its vocabulary does not start
    with the base's. A LoRA adapter is left as it is (it reads as its base)."""
    if isinstance(other, LoraReader):
        return []
    reconcile_tied(base, other)  # a tied head the base stores once: left out before the cut, not cut
    grown = resized_tensors(base, other)
    if not grown:
        return []
    problem = prefix_problem(str(base.folder), str(other.folder), min(r for _, _, r in grown))
    if problem is not None:
        raise ModelError(
            f"model {other.path} has a resized vocabulary ({grown[0][0]!r}: {grown[0][1]} rows, base {grown[0][2]}) "
            f"that does not start with the base's: {problem}. Only tokens appended after the base's can be read "
            "at the base's rows; merge it with mergekit, or give --keep-base for its vocabulary tensors")
    for n, _, rows in grown:
        other.keep_rows(n, rows)
    return [f"{n!r}: read at the base's {b} of its {r} rows (its added tokens dropped)" for n, r, b in grown]


def any_resized(base: str, models: Sequence[str]) -> Optional[str]:
    """The first model (with its tensor and rows) that holds a grown vocabulary tensor, from headers only."""
    with ModelReader(base) as b:
        for m in models:
            with ModelReader(m) as o:
                if isinstance(o, LoraReader):
                    continue
                grown = resized_tensors(b, o)
                if grown:
                    n, r, br = grown[0]
                    return f"{m} ({n!r}: {r} rows, base {br})"
    return None


# ------------------------------------------------------------------ mergekit's union, one fine-tune adding tokens


def _added_entries(folder: str | Path) -> dict[str, dict]:
    """tokenizer.json's added tokens of `folder`, by content ({} without that file)."""
    try:
        data = json.loads((Path(folder) / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {str(t["content"]): t for t in data.get("added_tokens") or []}


def union_donor(base: str, models: Sequence[str]) -> Optional[tuple[int, list[str]]]:
    """Under mergekit's `union`: (index of the one model that appends tokens, those tokens by id), or
    None when every vocabulary is the base's. Raises VocabularyError (why, and that `tokenizer_source:
    base` works) where mergekit's result is not one tiesfed builds: tokens appended by more than one
    model (mergekit 0.1.5 orders them by a Python set of the models: ids change from run to run), or
    not all as added tokens (their order comes from a hash map), or a tokenizer without tokenizer.json."""
    b = vocabulary(base)
    donors = []
    for i, m in enumerate(models):
        v = vocabulary(m)
        if v is None or b is None or v == b:
            continue
        added = appended_tokens(b, v)
        if added is None:
            raise VocabularyError(f"{m}'s vocabulary is not the base's and does not start with it")
        donors.append((i, added))
    if not donors:
        return None
    if len(donors) > 1:
        names = ", ".join(str(models[i]) for i, _ in donors)
        raise VocabularyError(f"more than one model appends tokens ({names}): mergekit 0.1.5 numbers them in the "
                              "order of a Python set of the models, which changes from run to run, so tiesfed does "
                              "not reproduce it; give tokenizer_source: base (the added tokens dropped)")
    i, added = donors[0]
    entries = _added_entries(models[i])
    loose = [t for t in added if t not in entries]
    if loose or not (Path(base) / "tokenizer.json").is_file():
        what = (f"{models[i]} appends {loose[:3]} to its vocabulary itself, not as added tokens (mergekit "
                "numbers those in a hash map's order)" if loose else f"the base {base} has no tokenizer.json")
        raise VocabularyError(f"{what}; give tokenizer_source: base (the added tokens dropped)")
    return i, added


class VocabularyError(ValueError):
    """A vocabulary tiesfed does not merge as mergekit would; says what to give instead."""


class GrownReader:
    """`inner` with some vocabulary tensors read as its first rows followed by rows of another model:
    mergekit's union gives every model the donor's rows for the tokens it lacks. Everything else is
    `inner`'s. Reads stay flat ranges of each part, so the blockwise readers work unchanged."""

    def __init__(self, inner: ModelReader, parts: dict[str, list[tuple[ModelReader, str, int, int]]]):
        self._inner = inner
        self._parts = parts  # name -> [(reader, tensor, flat lo, flat hi)], concatenated
        self._infos = {}
        for n, segs in parts.items():
            i = inner.info(n)
            rest = _numel(i.shape[1:])
            total = sum(hi - lo for _, _, lo, hi in segs)
            self._infos[n] = TensorInfo(n, (total // rest, *i.shape[1:]), i.dtype, i.file)

    def __getattr__(self, attr: str):
        return getattr(self._inner, attr)

    def __contains__(self, name: str) -> bool:
        return name in self._inner

    def __len__(self) -> int:
        return len(self._inner)

    def __enter__(self) -> "GrownReader":
        return self

    def __exit__(self, *exc) -> None:
        self._inner.close()

    def info(self, name: str) -> TensorInfo:
        return self._infos.get(name) or self._inner.info(name)

    def manifest(self) -> list[TensorInfo]:
        return [self.info(n) for n in self._inner.names]

    def get(self, name: str, mmap: bool = False) -> torch.Tensor:
        if name not in self._parts:
            return self._inner.get(name, mmap)
        return self.get_range(name, 0, self._infos[name].numel).reshape(self._infos[name].shape)

    def get_range(self, name: str, lo: int, hi: int) -> torch.Tensor:
        if name not in self._parts:
            return self._inner.get_range(name, lo, hi)
        if not 0 <= lo <= hi <= self._infos[name].numel:
            raise ModelError(f"tensor {name!r} in model {self._inner.path}: range [{lo}, {hi}) outside "
                             f"[0, {self._infos[name].numel})")
        out, at = [], 0
        dtype = self._infos[name].dtype
        for reader, n, a, b in self._parts[name]:
            s, e = max(lo, at), min(hi, at + b - a)
            if s < e:
                out.append(reader.get_range(n, a + s - at, a + e - at).to(dtype))
            at += b - a
        return torch.cat(out) if out else torch.empty(0, dtype=dtype)

    def iter_raw(self, name: str, chunk_bytes: int = 1 << 24):
        """Raw bytes; a grown tensor's in one chunk (a vocabulary tensor, read whole)."""
        if name not in self._parts:
            yield from self._inner.iter_raw(name, chunk_bytes)
            return
        yield memoryview(self.get_range(name, 0, self._infos[name].numel).view(torch.uint8).numpy()).cast("B")

    def byte_range(self, name: str):
        if name in self._parts:
            raise ModelError(f"tensor {name!r} in model {self._inner.path}: grown from two models, no byte range")
        return self._inner.byte_range(name)


def grow_union(base: ModelReader, fts: list[ModelReader]) -> tuple[GrownReader, list, list[str]]:
    """The readers as mergekit's `union` gives them to the merge (one model appends tokens, `union_donor`):
    every vocabulary tensor at the base's rows plus the donor's rows of its added tokens (the donor read as
    its first rows, the base and the others with the donor's rows appended). Returns (base, models, notes)."""
    found = union_donor(str(base.folder), [str(f.folder) for f in fts])
    if found is None:
        for ft in fts:
            read_at_base_rows(base, ft)
        return GrownReader(base, {}), fts, []
    d, added = found
    donor = fts[d]
    reconcile_tied(base, donor)
    names = [n for n in base.names if is_vocabulary_tensor(n) and n in donor
             and _grown(donor.info(n), base.info(n))]
    if not names:
        raise ModelError(f"model {donor.path} appends {len(added)} tokens but holds no grown embeddings")
    rows = {n: base.info(n).shape[0] for n in names}
    for n in names:
        if donor.info(n).shape[0] < rows[n] + len(added):
            raise ModelError(f"{n!r} of {donor.path}: {donor.info(n).shape[0]} rows, fewer than its "
                             f"{rows[n] + len(added)} tokens")
        donor.keep_rows(n, rows[n] + len(added))

    def tail(n: str) -> tuple[ModelReader, str, int, int]:
        per = _numel(base.info(n).shape[1:])
        return donor, n, rows[n] * per, (rows[n] + len(added)) * per

    grown_base = GrownReader(base, {n: [(base, n, 0, base.info(n).numel), tail(n)] for n in names})
    out = []
    for i, ft in enumerate(fts):
        if i == d:
            out.append(ft)
            continue
        read_at_base_rows(base, ft)
        present = [n for n in names if n in ft and ft.info(n).shape == base.info(n).shape]
        out.append(GrownReader(ft, {n: [(ft, n, 0, ft.info(n).numel), tail(n)] for n in present}))
    notes = [f"{n!r}: {rows[n]} + {len(added)} rows (the tokens {donor.path} appends, its rows)" for n in names]
    return grown_base, out, notes


def write_union_tokenizer(out_dir: str | Path, base: str | Path, donor: str | Path) -> int:
    """The output's tokenizer as mergekit's union writes it: the base's, with the donor's appended added
    tokens at the ids they have there; config.json's vocab_size to match. Returns the vocabulary size."""
    out, added = Path(out_dir), [e for e in _added_entries(donor).values()]
    b = vocabulary(base) or {}
    new = sorted((e for e in added if str(e["content"]) not in b), key=lambda e: int(e["id"]))
    path = out / "tokenizer.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    data["added_tokens"] = [*(data.get("added_tokens") or []), *new]
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    tc = out / "tokenizer_config.json"
    if tc.is_file():
        cfg = json.loads(tc.read_text(encoding="utf-8"))
        if isinstance(cfg.get("added_tokens_decoder"), dict):
            for e in new:
                cfg["added_tokens_decoder"][str(e["id"])] = {k: v for k, v in e.items() if k != "id"}
            tc.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    size = len(b) + len(new)
    cp = out / "config.json"
    if cp.is_file():
        cfg = json.loads(cp.read_text(encoding="utf-8"))
        cfg["vocab_size"] = size
        cp.write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    return size


def finish_union(out_dir: str | Path, base: str, models: Sequence[str]) -> list[str]:
    """After a `union` merge: the output's tokenizer and vocab_size, if a model appended tokens."""
    found = union_donor(base, models)
    if found is None:
        return []
    write_union_tokenizer(out_dir, base, models[found[0]])
    return ["tokenizer.json", "config.json"]
