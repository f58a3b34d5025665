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
"""

from __future__ import annotations

from typing import Optional, Sequence

from tiesfed.io.compat import reconcile_tied
from tiesfed.io.lora import LoraReader
from tiesfed.io.reader import ModelReader
from tiesfed.io.safetensors_format import ModelError, TensorInfo
from tiesfed.io.tokenizer_source import vocabulary

__all__ = ["VOCAB_OPTION", "any_resized", "is_vocabulary_tensor", "prefix_problem", "read_at_base_rows", "resized_tensors"]

#: how each entry point names the option (the error of a resized fine-tune lists them)
VOCAB_OPTION = "--vocab base (tiesfed merge), vocab: base (tiesfed's YAML) or tokenizer_source: base (a mergekit config)"
_EMBEDDINGS = ("embed", "wte", "word_embeddings")
_HEADS = ("lm_head.weight", "lm_head.bias", "embed_out.weight", "output.weight")


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
