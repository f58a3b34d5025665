"""A peft LoRA adapter folder read as the fine-tuned model it stands for.

An adapter (``adapter_config.json`` + ``adapter_model.safetensors`` or ``.bin``) holds,
per target module, two small matrices: θ = W0 + s·B·A with s = alpha/r (alpha/√r with
``use_rslora``; ``rank_pattern``/``alpha_pattern`` per module). `LoraReader` is a
`ModelReader` whose tensors are the base's, except each target's weight, which is
materialised one tensor (or, for `get_range`, the rows it needs: B[rows]·A) at a time,
so a merge or a federated client trims it as any task vector, with no full copy held.

The arithmetic is peft's `merge_and_unload()` (peft 0.21, `autocast_adapter_dtype`
default, `safe_merge=False`), so a merge of the adapter equals, bit for bit, the merge
of the merged model: Δ = transpose(B @ A) * s in float32, then ``W += Δ`` in W's dtype
(one rounding for a bf16 Linear; an Embedding's Δ is rounded to W's dtype before). A window of one row is widened to two (a one-row product takes
another matmul kernel whose sums round differently). What peft merges differently, or
what tiesfed cannot model as a weight delta (DoRA, LoRA biases, trained biases, trainable
tokens, target parameters, layer replication, other peft types), is refused by name.

The reader needs its base: `ModelReader(adapter)` gives an unbound `LoraReader`, and
`bind(base)` (done by `compat.check_compatible`) makes it read as a model.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch

from tiesfed.io.reader import ModelReader
from tiesfed.io.safetensors_format import _IO_CHUNK, INDEX_FILE, SINGLE_FILE, ModelError, TensorInfo
from tiesfed.io.torch_bin import BIN_FILE, BIN_INDEX_FILE

__all__ = ["ADAPTER_CONFIG", "LoraModule", "LoraReader", "is_adapter"]

ADAPTER_CONFIG = "adapter_config.json"
_ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
_PREFIX = "base_model.model."
#: config settings tiesfed refuses when set, each with why
_REFUSED = {
    "use_dora": "DoRA rescales W0 + ΔW by a learned magnitude: not a weight delta tiesfed models",
    "lora_bias": "lora_bias=True trains a bias delta, which tiesfed does not read",
    "target_parameters": "LoRA on bare parameters (target_parameters) is not supported",
    "trainable_token_indices": "trainable tokens (trainable_token_indices) are not supported",
    "layer_replication": "layer_replication builds layers the base lacks",
    "use_qalora": "QALoRA merges through quantisation",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) has no merged form",
}


def is_adapter(path: str | Path) -> bool:
    """A folder with ``adapter_config.json`` and no model weights of its own."""
    p = Path(path)
    if not p.is_dir() or not (p / ADAPTER_CONFIG).is_file():
        return False
    return not any((p / n).is_file() for n in (SINGLE_FILE, INDEX_FILE, BIN_FILE, BIN_INDEX_FILE))


@dataclass(frozen=True)
class LoraModule:
    """One target module: its base weight's name and how peft builds its delta."""

    name: str        # the base tensor, e.g. model.layers.0.self_attn.q_proj.weight
    a_key: str       # the adapter's tensors
    b_key: str
    rank: int
    scaling: float
    transpose: bool  # the weight is stored (in, out): fan_in_fan_out (GPT-2 Conv1D) or an embedding
    embedding: bool


def _pattern(patterns: dict, module: str, default):
    """peft's `get_pattern_key`: the first key matching the end of the module's name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _add(w: torch.Tensor, mod: LoraModule, delta: torch.Tensor) -> None:
    """W += Δ in W's dtype, as peft's merge does: a Linear adds the float32 Δ (one rounding),
    an Embedding rounds Δ to W's dtype first."""
    w += delta.to(w.dtype) if mod.embedding else delta


class LoraReader(ModelReader):
    """A peft LoRA adapter read as a model over its base (see the module's docstring)."""

    def __init__(self, path: str | Path, base: Optional[ModelReader] = None):
        self.path = Path(path)
        self.folder = self.path
        self.metadata: dict[str, str] = {}
        self._handles: dict = {}
        self._fds: dict = {}
        self._infos: dict[str, TensorInfo] = {}
        self._ranges: dict = {}
        self._bin = None
        self.names: list[str] = []
        self.files: list[Path] = []
        self.total_float_params = 0
        self.total_bytes = 0
        self.base: Optional[ModelReader] = None
        self.config = self._read_config()
        files = [self.path / n for n in _ADAPTER_FILES if (self.path / n).is_file()]
        if not files:
            raise ModelError(f"{self.path}: a LoRA adapter folder without {' or '.join(_ADAPTER_FILES)}")
        self.tensors = ModelReader(files[0])
        self.files = [files[0]]
        self.modules, self.replaced = self._parse()
        if base is not None:
            self.bind(base)

    # -- the adapter's own files
    def _read_config(self) -> dict:
        where = self.path / ADAPTER_CONFIG
        try:
            cfg = json.loads(where.read_text())
        except (OSError, ValueError) as e:
            raise ModelError(f"{where}: cannot read: {e}") from None
        if not isinstance(cfg, dict):
            raise ModelError(f"{where}: not a JSON object")
        if cfg.get("peft_type", "LORA") != "LORA":
            raise ModelError(f"{where}: peft_type {cfg.get('peft_type')!r}: only LoRA adapters are supported")
        for key, why in _REFUSED.items():
            if cfg.get(key):
                raise ModelError(f"{where}: {key}={cfg[key]!r}: {why}; merge_and_unload() the adapter and give the "
                                 "merged model instead")
        if cfg.get("bias", "none") != "none":
            raise ModelError(f"{where}: bias={cfg['bias']!r}: trained biases are not supported (bias='none' only); "
                             "merge_and_unload() the adapter and give the merged model instead")
        if cfg.get("use_rslora") and (cfg.get("rank_pattern") or cfg.get("alpha_pattern")):
            raise ModelError(f"{where}: use_rslora with rank_pattern/alpha_pattern: peft refuses this too")
        return cfg

    def _parse(self) -> tuple[dict[str, LoraModule], dict[str, str]]:
        """The target modules by base tensor name, and the modules_to_save tensors (base name → key)."""
        cfg, where = self.config, self.path
        pairs: dict[str, dict[str, str]] = {}
        replaced: dict[str, str] = {}
        for key in self.tensors.names:
            short = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
            m = re.fullmatch(r"(.+)\.(lora_A|lora_B)\.weight|(.+)\.(lora_embedding_A|lora_embedding_B)", short)
            if m:
                module, part = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
                pairs.setdefault(module, {})[part] = key
            elif ".modules_to_save." in short or ".base_layer." in short:  # a full copy peft loads as is
                replaced[re.sub(r"\.(modules_to_save|base_layer)\.", ".", short, count=1)] = key
            else:
                raise ModelError(f"{where}: tensor {key!r} is neither a LoRA factor nor a modules_to_save or base layer "
                             "copy; "
                                 "tiesfed does not know how peft merges it")
        modules: dict[str, LoraModule] = {}
        for module, parts in pairs.items():
            emb = "lora_embedding_A" in parts or "lora_embedding_B" in parts
            a, b = ("lora_embedding_A", "lora_embedding_B") if emb else ("lora_A", "lora_B")
            if a not in parts or b not in parts:
                raise ModelError(f"{where}: module {module!r} has only one of {a}, {b}")
            sa, sb = self.tensors.info(parts[a]).shape, self.tensors.info(parts[b]).shape
            if len(sa) != 2 or len(sb) != 2 or sa[0] != sb[1]:
                raise ModelError(f"{where}: module {module!r}: factors of shapes {list(sa)} and {list(sb)} are not a "
                                 "linear or embedding LoRA (convolutions are not supported)")
            r = int(_pattern(cfg.get("rank_pattern") or {}, module, cfg.get("r", 8)))
            alpha = float(_pattern(cfg.get("alpha_pattern") or {}, module, cfg.get("lora_alpha", 8)))
            if r != sa[0]:
                raise ModelError(f"{where}: module {module!r}: its factors have rank {sa[0]}, the config says {r}")
            scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
            modules[module + ".weight"] = LoraModule(module + ".weight", parts[a], parts[b], r, scaling,
                                                     emb or bool(cfg.get("fan_in_fan_out")), emb)
        if not modules and not replaced:
            raise ModelError(f"{where}: the adapter holds no LoRA factors")
        return modules, replaced

    # -- binding to the base
    def bind(self, base: ModelReader) -> None:
        """Read as `base` with the adapter's deltas; every target must fit its base tensor."""
        if isinstance(base, LoraReader):
            raise ModelError(f"base {base.path} is a LoRA adapter: give the base model it was trained on")
        problems = []
        for name, mod in self.modules.items():
            if name not in base:
                problems.append(f"{name!r}: a LoRA target the base lacks")
                continue
            shape = base.info(name).shape
            out_in = (self.tensors.info(mod.b_key).shape[0], self.tensors.info(mod.a_key).shape[1])
            if len(shape) != 2 or (shape[::-1] if mod.transpose else shape) != out_in:
                problems.append(f"{name!r}: the LoRA delta is {list(out_in)} (out, in"
                                f"{', stored transposed' if mod.transpose else ''}), base has {list(shape)}")
        for name, key in self.replaced.items():
            if name not in base:
                problems.append(f"{name!r}: a modules_to_save tensor the base lacks")
            elif base.info(name).shape != self.tensors.info(key).shape:
                problems.append(f"{name!r}: modules_to_save shape {list(self.tensors.info(key).shape)}, base has "
                                f"{list(base.info(name).shape)}")
        if problems:
            raise ModelError(f"LoRA adapter {self.path} does not fit base {base.path}:\n  " + "\n  ".join(problems[:20]))
        self.base = base
        self._infos = {n: base.info(n) for n in base.names}
        self.names = list(base.names)
        self.total_float_params = base.total_float_params
        self.total_bytes = base.total_bytes

    def _bound(self) -> ModelReader:
        if self.base is None:
            raise ModelError(f"{self.path} is a LoRA adapter ({ADAPTER_CONFIG}): it reads as a model only over its "
                             "base; give it as a fine-tuned model of that base")
        return self.base

    # -- reading
    def delta(self, name: str, r0: int = 0, r1: Optional[int] = None) -> torch.Tensor:
        """Rows [r0, r1) of the module's Δ = transpose(B @ A) * s in float32, as peft computes it."""
        mod = self.modules[name]
        a = self.tensors.get(mod.a_key).float()
        b = self.tensors.get(mod.b_key).float()
        rows = self._bound().info(name).shape[0]
        r1 = rows if r1 is None else r1
        if (r0, r1) == (0, rows):
            return (b @ a).T * mod.scaling if mod.transpose else (b @ a) * mod.scaling
        w0, w1 = r0, r1
        if w1 - w0 == 1 and rows > 1:  # a one-row product rounds differently: take a neighbour too
            w0, w1 = (w0, w1 + 1) if w1 < rows else (w0 - 1, w1)
        d = (b @ a[:, w0:w1]).T * mod.scaling if mod.transpose else (b[w0:w1] @ a) * mod.scaling
        return d[r0 - w0 : r1 - w0]

    def get(self, name: str, mmap: bool = False) -> torch.Tensor:
        base = self._bound()
        if name in self.replaced:  # modules_to_save, or the base layer an adapter saved with an embedding
            w = self.tensors.get(self.replaced[name]).to(base.info(name).dtype)
        elif name in self.modules:
            w = base.get(name)
        else:
            return base.get(name, mmap=mmap)
        if name in self.modules:
            _add(w, self.modules[name], self.delta(name))
        return w

    def get_range(self, name: str, lo: int, hi: int) -> torch.Tensor:
        base = self._bound()
        info = self.info(name)
        if not 0 <= lo <= hi <= info.numel:
            raise ModelError(f"tensor {name!r} in model {self.path}: range [{lo}, {hi}) outside [0, {info.numel})")
        if name not in self.modules or lo == hi:
            if name in self.replaced:
                return self.get(name).reshape(-1)[lo:hi].clone()
            return base.get_range(name, lo, hi)
        cols = info.shape[1]
        r0, r1 = lo // cols, -(-hi // cols)
        if name in self.replaced:
            w0 = self.tensors.get_range(self.replaced[name], r0 * cols, r1 * cols).to(info.dtype)
        else:
            w0 = base.get_range(name, r0 * cols, r1 * cols)
        w = w0.reshape(r1 - r0, cols)
        _add(w, self.modules[name], self.delta(name, r0, r1))
        return w.reshape(-1)[lo - r0 * cols : hi - r0 * cols].clone()

    def iter_raw(self, name: str, chunk_bytes: int = _IO_CHUNK) -> Iterator[memoryview]:
        raw = memoryview(self.get(name).reshape(-1).view(torch.uint8).numpy()).cast("B")
        for at in range(0, len(raw), max(1, chunk_bytes)):
            yield raw[at : at + chunk_bytes]

    def byte_range(self, name: str) -> tuple[Path, int, int]:
        raise ModelError(f"tensor {name!r} of LoRA adapter {self.path} is computed: it has no byte range")

    def alias(self, name: str, target: str) -> None:
        raise ModelError(f"LoRA adapter {self.path}: cannot tie {name!r} to {target!r}")

    def hide(self, name: str) -> None:
        raise ModelError(f"LoRA adapter {self.path}: cannot leave out {name!r}")

    def close(self) -> None:
        tensors = getattr(self, "tensors", None)
        if tensors is not None:
            tensors.close()

    def __repr__(self) -> str:
        return f"LoraReader({str(self.path)!r}, {len(self.modules)} target module(s))"
