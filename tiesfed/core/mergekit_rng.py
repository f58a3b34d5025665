"""mergekit 0.1.5's random masks, replayed: `mergekit-yaml --random-seed N` gives DARE's
and DELLA's masks; `tiesfed merge --random-seed N` draws the same ones.

What mergekit does (read in its source, checked by tracing `torch.bernoulli` in a run):
- `set_seed(N)` seeds torch's global CPU generator once, before planning; nothing else
  draws from it until the merge tasks run.
- Its executor runs the tensors' tasks in a lexicographic topological sort keyed by the
  tasks' group label, which is the tensor's name as stored: tensors in ascending name
  order (as strings: `layers.10` before `layers.2`), one tensor's whole chain at a time.
- Within a tensor, `merge_group` sparsifies the models in the config's order (the base
  left out). `bernoulli` draws nothing at density ≥ 1 and `della_magprune` nothing at
  density ≥ 1 or ≤ 0; otherwise each draws `torch.bernoulli` once over the tensor's
  shape, one 32-bit draw per element in row-major order, with probabilities in the
  work dtype: bfloat16 for a bfloat16 tensor, float32 otherwise (so a bf16 density is
  rounded to bf16, and DELLA's ranks too).
- Which tensors it merges comes from its architecture definition
  (`mergekit/_data/architectures/*.json`); `ARCHITECTURES` restates the ones replayed here.

So a replay needs one generator seeded with N, the tensors in `draw_order`, the models in
order, and each mask drawn exactly as mergekit draws it (`MergekitDraw.keep`). A merge whose
tensors are not the ones mergekit would merge is refused (`draw_order` raises), since any
tensor more or less would shift every later mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Collection, Optional, Sequence

import torch

#: mergekit 0.1.5's definitions (names, aliases) of the architectures whose order is replayed:
#: pre-layer weights, per-layer templates ("{i}" the layer), post-layer weights, the config key of
#: the layer count. Each weight: (name, aliases, optional, tied_names).
_Weight = tuple[str, tuple[str, ...], bool, tuple[str, ...]]
_LLAMA_LAYER = tuple(f"model.layers.{{i}}.{w}.weight" for w in (
    "input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "post_attention_layernorm", "mlp.up_proj", "mlp.gate_proj", "mlp.down_proj"))
_LLAMA: tuple = (
    (("model.embed_tokens.weight", (), False, ()),),
    tuple((n, (), False, ()) for n in _LLAMA_LAYER),
    (("model.norm.weight", (), False, ()), ("lm_head.weight", (), True, ("model.embed_tokens.weight",))),
    "num_hidden_layers",
)
_QWEN2: tuple = (
    _LLAMA[0],
    _LLAMA[1] + tuple((f"model.layers.{{i}}.self_attn.{p}_proj.bias", (), False, ()) for p in "qkv"),
    _LLAMA[2],
    "num_hidden_layers",
)
_GPT2_LAYER = ("attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight", "attn.c_proj.bias",
               "ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias", "mlp.c_proj.weight", "mlp.c_proj.bias",
               "mlp.c_fc.weight", "mlp.c_fc.bias")
_GPT2: tuple = (
    (("transformer.wte.weight", ("wte.weight",), False, ()), ("transformer.wpe.weight", ("wpe.weight",), False, ())),
    tuple((f"transformer.h.{{i}}.{w}", (f"h.{{i}}.{w}",), False, ()) for w in _GPT2_LAYER),
    (("transformer.ln_f.weight", ("ln_f.weight",), False, ()), ("transformer.ln_f.bias", ("ln_f.bias",), False, ()),
     ("lm_head.weight", (), True, ("transformer.wte.weight", "wte.weight"))),
    "n_layer",
)
ARCHITECTURES: dict[str, tuple] = {"LlamaForCausalLM": _LLAMA, "LLaMaForCausalLM": _LLAMA,
                                   "MistralForCausalLM": _LLAMA, "Qwen2ForCausalLM": _QWEN2,
                                   "GPT2LMHeadModel": _GPT2}


class ReplayError(ValueError):
    """mergekit's draw order cannot be reproduced for this merge; says why."""


def _weights(arch: tuple, layers: int) -> list[_Weight]:
    pre, per_layer, post, _ = arch
    fill = lambda w, i: (w[0].format(i=i), tuple(a.format(i=i) for a in w[1]), w[2], w[3])  # noqa: E731
    return [*pre, *(fill(w, i) for i in range(layers) for w in per_layer), *post]


def draw_order(config: Optional[dict], stored: Sequence[Collection[str]]) -> list[str]:
    """The tensors mergekit 0.1.5 merges, in the order it sparsifies them: `config` the base's
    config.json, `stored` the tensor names each model (base first) stores. Raises `ReplayError`
    for an architecture not in `ARCHITECTURES` or where mergekit's order is ambiguous."""
    archs = (config or {}).get("architectures") or []
    if len(archs) != 1 or archs[0] not in ARCHITECTURES:
        raise ReplayError(f"--random-seed replays mergekit's draw order for {', '.join(sorted(set(ARCHITECTURES)))} "
                          f"only; the base's config.json names {archs or 'no architecture'}")
    arch = ARCHITECTURES[archs[0]]
    layers = config.get(arch[3])
    if not isinstance(layers, int) or layers < 0:
        raise ReplayError(f"--random-seed: the base's config.json has no layer count {arch[3]!r}")
    labels: dict[str, str] = {}
    for name, aliases, optional, tied in _weights(arch, layers):
        if optional and not any(n in s for s in stored for n in (name, *aliases)):
            continue  # mergekit skips an optional weight no model stores
        found = [next((n for n in (name, *aliases, *tied) if n in s), None) for s in stored]
        if any(f is None for f in found):
            raise ReplayError(f"--random-seed: tensor {name!r} of {archs[0]} is missing from a model")
        if len(set(found)) > 1:
            raise ReplayError(f"--random-seed: the models store {name!r} under different names "
                              f"({', '.join(sorted(set(found)))}); mergekit's order is not replayed for that")
        label = found[0]
        if label in labels:
            raise ReplayError(f"--random-seed: {name!r} and {labels[label]!r} are both read from {label!r}; "
                              "mergekit's order between them is not replayed")
        labels[label] = name
    return sorted(labels)


def mergekit_generator(seed: int) -> torch.Generator:
    """A CPU generator in the state `transformers.trainer_utils.set_seed(seed)` leaves torch's global one."""
    return torch.Generator(device="cpu").manual_seed(seed)


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype mergekit's `bernoulli`/`della_magprune` draw in on CPU."""
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


@dataclass(frozen=True)
class MergekitDraw:
    """The replayed generator, at one tensor whose mergekit compute dtype is `dtype` (the inputs'
    promoted dtype, or the config's `dtype`)."""

    generator: torch.Generator
    dtype: torch.dtype

    def draws(self, method: str, density: float) -> bool:
        """Whether mergekit's sparsifier draws for this density."""
        if method == "random":
            return density < 1
        return method == "della_magprune" and 0 < density < 1

    def keep(self, tau: torch.Tensor, method: str, density: float, epsilon: float = 0.0) -> torch.Tensor:
        """mergekit's mask for τ (the tensor's shape; any float dtype: it is cast to `dtype` first, which
        gives mergekit's delta exactly) as a bool tensor, drawn from the generator as mergekit draws it."""
        delta = tau.to(self.dtype).cpu()
        work = work_dtype(self.dtype)
        if method == "random":
            probs = torch.full_like(delta, density, dtype=work)
        elif method == "della_magprune":
            t = delta.unsqueeze(0) if delta.dim() < 2 else delta
            ranks = torch.argsort(t.abs(), dim=1, descending=False).argsort(dim=1).to(work) + 1
            lo = ranks.min(dim=1, keepdim=True).values
            hi = ranks.max(dim=1, keepdim=True).values
            probs = (density - epsilon) + ((ranks - lo) / (hi - lo)).clamp(0, 1) * 2 * epsilon
        else:
            raise ValueError(f"mergekit's {method!r} sparsifier draws nothing")
        mask = torch.bernoulli(probs, generator=self.generator)
        return (mask != 0).reshape(tau.shape).to(tau.device)
