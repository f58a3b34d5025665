"""mergekit's `tokenizer_source` / `tokenizer.source` and `chat_template`, where tiesfed
can give mergekit 0.1.5's result: every model's tokenizer has the base's vocabulary.

mergekit then builds its output tokenizer (`union`: the base's plus every model's
tokens; `base`; or a named model's) and re-indexes each model's embedding rows to it
(`PermutedVocabulary`). With one vocabulary whose ids are exactly 0 … vocab_size − 1
that re-indexing keeps each model's first vocab_size rows (rows past them, padding, are
dropped: `vocab_rows`), so the weights merge as without a tokenizer source; what differs
is only which tokenizer files the output carries (the named model's, for a model source)
and its chat template. `base` also takes fine-tunes that appended tokens after the base's
(their added rows are not read), and `union` one fine-tune that did (the output grows its
rows, `vocab_rows.grow_union`). Anything else (a model source with added tokens; tokens
added by several models; a model whose vocabulary differs; a vocabulary that does not fill
the embedding rows, which mergekit would resize) is refused naming the field. Vocabularies are read from the tokenizer files themselves
(`tokenizer.json`, or `vocab.json`; a sentencepiece `tokenizer.model` is compared byte
for byte), without loading transformers.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Any, Optional, Sequence

from tiesfed.io.compat import read_config
from tiesfed.io.mergekit_layout import fail

__all__ = ["TOKENIZER_FILES", "TokenizerSourceError", "appended_tokens", "apply_tokenizer", "chat_template_of", "check_tokenizer_source",
           "resolve_chat_template", "tokenizer_setting", "vocabulary"]

#: the files a tokenizer is saved as (transformers' save_pretrained, sentencepiece, GPT-2 style)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")


class TokenizerSourceError(ValueError):
    """A tokenizer setting tiesfed cannot honour as mergekit would; names the field."""


def vocabulary(folder: str | Path) -> Optional[dict[str, int]]:
    """token → id of the tokenizer saved in `folder` (added tokens included), or None without one.
    A sentencepiece-only tokenizer reads as {'sentencepiece:<sha256>': -1}: equal only to itself."""
    folder = Path(folder)
    vocab: dict[str, int] = {}
    tj, vj, sp = folder / "tokenizer.json", folder / "vocab.json", folder / "tokenizer.model"
    if tj.is_file():
        data = json.loads(tj.read_text(encoding="utf-8"))
        model = data.get("model") or {}
        v = model.get("vocab")
        if isinstance(v, dict):
            vocab.update({str(k): int(i) for k, i in v.items()})
        elif isinstance(v, list):  # Unigram: [[piece, score], ...], ids in order
            vocab.update({str(p[0]): i for i, p in enumerate(v)})
        for t in data.get("added_tokens") or []:
            vocab[str(t["content"])] = int(t["id"])
    elif vj.is_file():
        vocab.update({str(k): int(i) for k, i in json.loads(vj.read_text(encoding="utf-8")).items()})
    elif sp.is_file():
        return {"sentencepiece:" + hashlib.sha256(sp.read_bytes()).hexdigest(): -1}
    else:
        return None
    added = folder / "added_tokens.json"
    if added.is_file():
        vocab.update({str(k): int(i) for k, i in json.loads(added.read_text(encoding="utf-8")).items()})
    return vocab


def tokenizer_setting(raw: dict) -> tuple[str, Any]:
    """(field, value) of mergekit's tokenizer source: `tokenizer_source`, or `tokenizer.source`."""
    if raw.get("tokenizer") is not None and raw.get("tokenizer_source") is not None:
        raise fail("tokenizer", "give tokenizer_source or tokenizer, not both (mergekit refuses both)")
    tok = raw.get("tokenizer")
    if tok is None:
        return "tokenizer_source", raw.get("tokenizer_source")
    if not isinstance(tok, dict):
        raise fail("tokenizer", "must be a mapping {source: ...}")
    for k in tok:
        if k not in ("source", "tokens", "pad_to_multiple_of"):
            raise fail(f"tokenizer.{k}", "is not a field of mergekit's tokenizer config")
    if tok.get("tokens"):
        raise fail("tokenizer.tokens", "per-token embedding sources are not supported: tiesfed does not build "
                                        "embeddings for new tokens; use mergekit")
    if tok.get("pad_to_multiple_of") is not None:
        raise fail("tokenizer.pad_to_multiple_of", "is not supported: it resizes the embeddings; use mergekit")
    return "tokenizer.source", tok.get("source", "union")


def _first_difference(a: dict[str, int], b: dict[str, int]) -> str:
    """The first of the base's (`a`) tokens, by id, that `b` holds elsewhere or lacks; else the first extra one."""
    for tok in [*sorted(a, key=lambda t: a[t]), *sorted(set(b) - set(a))]:
        if a.get(tok) != b.get(tok):
            return f"token {tok!r}: id {b.get(tok)} here, {a.get(tok)} in the base"
    return "they differ"


def appended_tokens(base_vocab: dict[str, int], vocab: dict[str, int]) -> Optional[list[str]]:
    """The tokens `vocab` adds after the base's, by id, or None when it does not hold every base
    token at the base's id (a re-indexed vocabulary)."""
    if any(vocab.get(t) != i for t, i in base_vocab.items()):
        return None
    return [t for t, _ in sorted(((t, i) for t, i in vocab.items() if t not in base_vocab), key=lambda ti: ti[1])]


def check_tokenizer_source(field: str, source: str, base: str, models: Sequence[str],
                           donor: Optional[str]) -> Optional[str]:
    """Check that mergekit's `source` ('union', 'base' or a model, `donor` its folder) gives the
    weights as tiesfed reads them: every vocabulary the base's, or, for 'base', fine-tunes whose
    tokens come after the base's (read at the base's rows, `vocab_rows`). Returns the folder whose
    tokenizer files the output takes (None: the base's). Raises TokenizerSourceError naming `field`."""
    what = f"{field}: {source!r}"
    base_vocab = vocabulary(base)
    if base_vocab is None:
        raise TokenizerSourceError(f"{what}: the base {base} has no tokenizer files (tokenizer.json, vocab.json or "
                                   "tokenizer.model) for mergekit to build one from; drop the field")
    for folder in [*models, *([donor] if donor else [])]:
        v = vocabulary(folder)
        if v is None:
            if folder == donor:
                raise TokenizerSourceError(f"{what}: {folder} has no tokenizer files")
            continue  # mergekit: "Unable to load tokenizer … Assuming same as" the base
        if v == base_vocab:
            continue
        added = appended_tokens(base_vocab, v)
        if added is not None and source in ("base", "union") and folder != donor:
            continue  # read at the base's rows, or grown as union grows them (`vocab_rows`)
        if added is not None:
            shown = ", ".join(repr(t) for t in added[:3]) + (", …" if len(added) > 3 else "")
            raise TokenizerSourceError(
                f"{what}: {folder} appends {len(added)} token(s) to the base's vocabulary ({shown}): mergekit "
                "would re-index every model's embeddings to that model's tokenizer, which tiesfed does not do; "
                "give tokenizer_source: base to merge at the base's vocabulary (the added tokens dropped, their "
                "rows not read) or union (their rows added), or merge with mergekit")
        raise TokenizerSourceError(
            f"{what}: {folder}'s vocabulary is not the base's ({len(v)} tokens, base {len(base_vocab)}; "
            f"{_first_difference(base_vocab, v)}): mergekit would build a new tokenizer and re-index the "
            "embeddings, which tiesfed does not do (tokenizer_source: base reads only fine-tunes whose tokens "
            "come after the base's); merge with mergekit, or give models that share the base's tokenizer")
    cfg = read_config(Path(base)) or {}
    rows = cfg.get("vocab_size")
    ids = sorted(i for i in base_vocab.values() if i >= 0)
    if isinstance(rows, int) and ids and ids != list(range(rows)):
        raise TokenizerSourceError(
            f"{what}: the base's tokenizer has {len(ids)} token ids (largest {ids[-1]}) for its {rows} embedding rows "
            f"(config.json vocab_size): mergekit would resize the embeddings to the tokenizer, changing their shape; "
            "drop the field to keep the base's embeddings and tokenizer as they are, or merge with mergekit")
    return donor if source not in ("union", "base") else None


def chat_template_of(folder: str | Path) -> Optional[str]:
    """The chat template a tokenizer folder carries (chat_template.jinja, else tokenizer_config.json's)."""
    folder = Path(folder)
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    try:
        cfg = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    t = cfg.get("chat_template") if isinstance(cfg, dict) else None
    if isinstance(t, list):  # [{name, template}, ...]: mergekit takes the default one
        t = next((e.get("template") for e in t if isinstance(e, dict) and e.get("name") == "default"), None)
    return t if isinstance(t, str) and t else None


def resolve_chat_template(value: object, models: Sequence[str]) -> Optional[str]:
    """mergekit's `chat_template` as the Jinja text to write, or None to leave the tokenizer's:
    'auto' takes the template most of `models` carry (none: None); Jinja text is taken as given.
    mergekit's named templates (chatml, llama3, …) ship inside mergekit: refused, naming them."""
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise TokenizerSourceError("chat_template: must be 'auto' or a Jinja template")
    if value == "auto":
        found = [t.strip() for t in (chat_template_of(m) for m in models) if t]
        return Counter(found).most_common(1)[0][0] if found else None
    if len(value) < 256 and "\n" not in value and "{" not in value:
        raise TokenizerSourceError(
            f"chat_template: {value!r} names one of mergekit's bundled templates, which tiesfed does not ship: give "
            "the template's Jinja text instead (or 'auto' to take the models' own)")
    if len(value) < 20:
        raise TokenizerSourceError(f"chat_template: {value!r} is not a Jinja template")
    return value


def apply_tokenizer(out_dir: str | Path, donor: Optional[str | Path], chat_template: Optional[str]) -> list[str]:
    """Give the merged folder `out_dir` (which holds the base's side files) `donor`'s tokenizer
    files and `chat_template`, as mergekit's output tokenizer would carry them. Returns what changed."""
    out = Path(out_dir)
    changed = []
    if donor is not None:
        src = Path(donor)
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                (out / name).write_bytes((src / name).read_bytes())
                changed.append(name)
            elif (out / name).is_file():
                (out / name).unlink()  # the base's, not part of the donor's tokenizer
                changed.append(name)
    if chat_template is not None:
        if (out / "chat_template.jinja").is_file():
            (out / "chat_template.jinja").write_text(chat_template, encoding="utf-8")
        else:
            path = out / "tokenizer_config.json"
            cfg = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
            cfg["chat_template"] = chat_template
            path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        changed.append("chat_template")
    return sorted(set(changed))
