"""Whether a fine-tuned model fits its base, judged before any merging.

Three checks, each with an error that names what differs and what to do:
- the architecture, from the two `config.json` files (`architectures`, `model_type`
  and the fields that define the tensors' shapes): a Mistral fine-tune on a Llama base
  has the same tensor names and shapes, so only its config tells them apart;
  `allow_architecture_mismatch` lets a merge go on anyway;
- tied embeddings: a checkpoint that stores the output head once, tied to the
  input embeddings (GPT-2, `save_pretrained`), and one that stores both copies
  (a `torch.save` of the state dict) hold the same model. The duplicate is
  recognised by its content (bit-identical to its partner) and left out, or the
  missing copy read as its partner, so both merge;
- the tensors: every base tensor present, same shape, same kind (float or not).
  A tensor whose rows differ is a resized vocabulary: the error names the
  tensor, both shapes, `--vocab base` (`vocab_rows`) and `--keep-base`.
"""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path
from typing import Optional, Sequence

import torch

from tiesfed.io.lora import LoraReader
from tiesfed.io.reader import ModelReader
from tiesfed.io.safetensors_format import DTYPE_TO_ST, ModelError, TensorInfo

__all__ = ["ARCHITECTURE_FIELDS", "architecture_differences", "check_compatible", "mergeable", "reconcile_tied"]

#: config.json fields that name the architecture or define tensor shapes (Llama/Mistral/Qwen
#: names, GPT-2's, T5's). `vocab_size` is left to the tensor check, which names the tensor;
#: `tie_word_embeddings` to `reconcile_tied`.
ARCHITECTURE_FIELDS = (
    "architectures", "model_type", "hidden_size", "num_hidden_layers", "intermediate_size",
    "num_attention_heads", "num_key_value_heads", "head_dim", "n_embd", "n_layer", "n_head", "n_inner",
    "d_model", "num_layers", "d_ff", "num_heads", "d_kv", "hidden_act",
)
_MAX_PROBLEMS = 20
#: output heads that a checkpoint may tie to the input embeddings
_HEADS = ("lm_head.weight", "embed_out.weight", "output.weight")
_EMBEDDINGS = ("embed", "wte", "word_embeddings")
_COMPARE_ELEMENTS = 1 << 24


def read_config(folder: Path) -> Optional[dict]:
    """A model's config.json, or None when it has none (or it does not parse as an object)."""
    try:
        cfg = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return cfg if isinstance(cfg, dict) else None


def architecture_differences(base: dict, other: dict) -> list[str]:
    """'field: other's vs base's' for every architecture field both configs set, differently
    (a field only one sets is no evidence: `config.save_pretrained` alone writes no `architectures`)."""
    out = []
    for f in ARCHITECTURE_FIELDS:
        b, o = base.get(f), other.get(f)
        if b == o or b is None or o is None:
            continue
        out.append(f"{f}: {o!r}, base has {b!r}")
    return out


def _check_architecture(base: ModelReader, other: ModelReader, allow: bool) -> None:
    b, o = read_config(base.folder), read_config(other.folder)
    if b is None or o is None:
        return
    diffs = architecture_differences(b, o)
    if diffs and not allow:
        raise ModelError(
            f"model {other.path} is not the base's architecture ({base.path}), by their config.json:\n  "
            + "\n  ".join(diffs)
            + "\ngive --allow-architecture-mismatch to merge them anyway (only if the tensors mean the same)")


def _same_content(a: ModelReader, an: str, b: ModelReader, bn: str) -> bool:
    ia, ib = a.info(an), b.info(bn)
    if ia.shape != ib.shape or ia.dtype != ib.dtype:
        return False
    for lo in range(0, ia.numel, _COMPARE_ELEMENTS):
        hi = min(lo + _COMPARE_ELEMENTS, ia.numel)
        if not torch.equal(a.get_range(an, lo, hi), b.get_range(bn, lo, hi)):
            return False
    return True


def _head(name: str) -> bool:
    return name.endswith(_HEADS)


def _embeddings(reader: ModelReader, shape: tuple[int, ...], among: Sequence[str]) -> list[str]:
    return [n for n in among if any(e in n for e in _EMBEDDINGS) and reader.info(n).shape == shape]


def reconcile_tied(base: ModelReader, other: ModelReader) -> list[str]:
    """Make `other` store its tied output head as `base` does; returns what was done.

    `other` stores a head the base lacks, bit-identical to its embeddings: a tied
    duplicate, left out. The base stores a head `other` lacks, bit-identical to the
    base's embeddings: `other` ties it, so its head reads as its embeddings."""
    notes = []
    for n in [n for n in other.names if n not in base and _head(n)]:
        shared = [q for q in other.names if q in base]
        for q in _embeddings(other, other.info(n).shape, shared):
            if _same_content(other, n, other, q):
                other.hide(n)
                notes.append(f"{n!r}: a tied copy of {q!r}, left out (the base stores it once)")
                break
    for n in [n for n in base.names if n not in other and _head(n)]:
        shared = [q for q in base.names if q in other and q != n]
        for q in _embeddings(base, base.info(n).shape, shared):
            if other.info(q).shape == base.info(n).shape and _same_content(base, n, base, q):
                other.alias(n, q)
                notes.append(f"{n!r}: tied to {q!r} in this model (the base stores both copies)")
                break
    return notes


def _shape_problem(n: str, o: TensorInfo, b: TensorInfo) -> str:
    if len(o.shape) == len(b.shape) and o.shape[1:] == b.shape[1:] and len(o.shape) >= 1:
        return (f"{n!r}: shape {list(o.shape)}, base has {list(b.shape)}: a resized vocabulary ({o.shape[0]} rows, "
                f"base {b.shape[0]}); to merge it at the base's vocabulary (tokens appended after the base's "
                "dropped, as mergekit's tokenizer_source: base), give --vocab base to tiesfed merge or tiesfed "
                "client submit (vocab: base in tiesfed's YAML, tokenizer_source: base in a mergekit config; --vocab "
                f"union keeps them), or --keep-base '{n}' (and the other resized tensors) to keep them at the base's "
                "value")
    return f"{n!r}: shape {list(o.shape)}, base has {list(b.shape)}"


def check_compatible(base: ModelReader, other: ModelReader, keep_base: Sequence[str] = (),
                     allow_architecture_mismatch: bool = False) -> None:
    """Raise ModelError listing every way `other` does not fit `base`.

    First the architecture (config.json; `allow_architecture_mismatch` skips it) and
    tied output heads (`reconcile_tied`, which adjusts `other`). Then the tensors: a
    base tensor missing in `other`, a different shape (rows only: a resized
    vocabulary), a tensor `other` has that base lacks, a float tensor that became
    non-float (or the reverse). fp32 vs bf16 is fine (task vectors are computed in
    fp32). A tensor whose name matches a glob in `keep_base` is exempt: the merge
    keeps it at the base value.
    """
    if isinstance(base, LoraReader):
        raise ModelError(f"base {base.path} is a LoRA adapter: give the base model it was trained on")
    if isinstance(other, LoraReader):
        other.bind(base)  # a LoRA adapter reads as the base with its deltas
    _check_architecture(base, other, allow_architecture_mismatch)
    reconcile_tied(base, other)

    def kept(n: str) -> bool:
        return any(fnmatch.fnmatch(n, g) for g in keep_base)

    problems: list[str] = []
    for n in base.names:
        if kept(n):
            continue
        b = base.info(n)
        if n not in other:
            problems.append(f"{n!r}: missing")
            continue
        o = other.info(n)
        if o.shape != b.shape:
            problems.append(_shape_problem(n, o, b))
        if o.is_float != b.is_float:
            problems.append(f"{n!r}: dtype {DTYPE_TO_ST[o.dtype]}, base has {DTYPE_TO_ST[b.dtype]}")
    for n in other.names:
        if n not in base and not kept(n):
            problems.append(f"{n!r}: not in the base model")
    if problems:
        more = len(problems) - _MAX_PROBLEMS
        lines = problems[:_MAX_PROBLEMS] + ([f"... and {more} more"] if more > 0 else [])
        raise ModelError(
            f"model {other.path} does not match base {base.path} ({len(problems)} problem(s)):\n  "
            + "\n  ".join(lines)
        )


def mergeable(infos: Sequence[TensorInfo], keep_base: Sequence[str] = ()) -> list[TensorInfo]:
    """The tensors a merge touches: float tensors not pinned to the base by a glob."""
    return [t for t in infos if t.is_float and not any(fnmatch.fnmatch(t.name, g) for g in keep_base)]
