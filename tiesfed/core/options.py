"""Merge options: one validated object shared by the CLI, the YAML config, the
local engine and the federated round spec.

pydantic does the validation so that a bad value is rejected with a message
naming the field, before any tensor is read.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from tiesfed.core.sparsify import DEFAULT_EPSILON, DEFAULT_GAMMA, OPTION_NAMES, Sparsifier, check_della

Method = Literal["ties", "task_arithmetic", "average", "dare_ties", "dare_linear"]
TrimScope = Literal["global", "tensor"]
Election = Literal["mass", "count"]
ZeroSign = Literal["majority", "positive"]
Disjoint = Literal["mean", "sum", "max"]
WeightSemantics = Literal["mergekit", "peft"]
ValueDtype = Literal["float32", "float16", "bfloat16"]
SparsifierName = Literal["magnitude", "dare", "breadcrumbs", "della"]
#: the methods whose trim a sparsifier replaces (the DARE methods drop at random already)
SPARSIFIED_METHODS = ("ties", "task_arithmetic", "average")


def validation_message(e: ValidationError) -> str:
    """One line per bad field, naming it: what the CLI and the coordinator show."""
    return "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'value'}: {err['msg']}" for err in e.errors())


class MergeOptions(BaseModel):
    """How to merge. Defaults are the paper's (Yadav et al. 2023)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    method: Method = "ties"
    k: float = Field(20.0, gt=0, le=100, description="percent of each task vector kept")
    lam: float = Field(1.0, alias="lambda", description="scale of the merged task vector")
    trim: TrimScope = "global"
    election: Election = "mass"
    zero_sign: ZeroSign = "majority"
    disjoint: Disjoint = "mean"
    weight_semantics: WeightSemantics = "mergekit"
    min_support: int = Field(1, ge=1, description="publish only where at least this many models agree")
    seed: int = Field(0, description="seed of DARE's random drop")
    value_dtype: Optional[ValueDtype] = Field(
        None, description="dtype of uploaded values; default: the model's dtype"
    )
    keep_base: tuple[str, ...] = Field(
        (), description="globs of tensors left at their base value (e.g. resized embeddings)"
    )
    sparsifier: Optional[SparsifierName] = Field(
        None, description="mergekit's sparsifier instead of the method's trim, on each whole tensor, keeping "
        "density (k): magnitude, dare (no 1/p rescale), breadcrumbs (gamma), della (epsilon)"
    )
    rescale: bool = Field(False, description="with a sparsifier: scale the survivors to the tensor's L1 norm "
                                             "(mergekit's rescale)")
    gamma: Optional[float] = Field(None, ge=0, lt=1, description=f"breadcrumbs: share of the largest |τ| "
                                   f"dropped (default {DEFAULT_GAMMA})")
    epsilon: Optional[float] = Field(None, gt=0, lt=1, description=f"della: keep probabilities span density "
                                     f"± epsilon by magnitude rank (default {DEFAULT_EPSILON})")

    @field_validator("lam")
    @classmethod
    def _finite_lambda(cls, v: float) -> float:
        if v != v or v in (float("inf"), float("-inf")):
            raise ValueError("lambda must be finite")
        return v

    @model_validator(mode="after")
    def _sparsifier_settings(self) -> "MergeOptions":
        """A sparsifier replaces the trim of ties, task_arithmetic or average; its settings need it."""
        if self.sparsifier is None:
            for key in ("rescale", "gamma", "epsilon"):
                if getattr(self, key) not in (None, False):
                    raise ValueError(f"{key} is a setting of a sparsifier: give sparsifier too")
            return self
        if self.method not in SPARSIFIED_METHODS:
            raise ValueError(f"sparsifier {self.sparsifier!r} replaces the trim of {', '.join(SPARSIFIED_METHODS)}; "
                             f"method {self.method!r} drops at random already")
        if self.gamma is not None and self.sparsifier != "breadcrumbs":
            raise ValueError(f"gamma is a setting of the breadcrumbs sparsifier, not of {self.sparsifier!r}")
        if self.epsilon is not None and self.sparsifier != "della":
            raise ValueError(f"epsilon is a setting of the della sparsifier, not of {self.sparsifier!r}")
        if self.sparsifier == "della":
            check_della(self.k / 100, self.epsilon_value)
        return self

    @property
    def epsilon_value(self) -> float:
        return DEFAULT_EPSILON if self.epsilon is None else self.epsilon

    def sparsifier_spec(self) -> Optional[Sparsifier]:
        """The sparsifier every model's tensors go through, with its settings; None without one."""
        if self.sparsifier is None:
            return None
        return Sparsifier(method=OPTION_NAMES[self.sparsifier], rescale=self.rescale,
                          gamma=DEFAULT_GAMMA if self.gamma is None else self.gamma, epsilon=self.epsilon_value)


class ModelEntry(BaseModel):
    """One fine-tuned model of a merge, with its optional weight and density."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str
    weight: float = Field(1.0, gt=0)
    density: Optional[float] = Field(None, gt=0, le=1, description="fraction kept; overrides k")
    #: mergekit format only: the weight and density settings of this model, highest precedence
    #: first (its own, then the merge's), each a number, a gradient over the layers or a list of
    #: `{filter, value}`; resolved per tensor (`tiesfed.core.tensor_params`), and override the above
    weight_settings: Optional[tuple[Any, ...]] = None
    density_settings: Optional[tuple[Any, ...]] = None
    weight_default: Optional[float] = None
    density_default: Optional[float] = None
    #: mergekit format only: mergekit's sparsifier for this model, run on each tensor before the merge
    #: (`tiesfed.core.sparsify`): {method, rescale, and gamma/epsilon settings as the two above}
    sparsifier: Optional[dict[str, Any]] = None

    @property
    def per_tensor(self) -> bool:
        return self.weight_settings is not None or self.density_settings is not None


class MergeConfig(BaseModel):
    """A whole local merge, as written in a mergekit-style YAML file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_model: str
    models: list[ModelEntry] = Field(min_length=1)
    options: MergeOptions = MergeOptions()
    #: dtype the inputs are cast to when read (mergekit's `dtype`); default: as stored
    dtype: Optional[ValueDtype] = None
    #: dtype of the merged float tensors (mergekit's `out_dtype`); default: `dtype`, else the base's
    out_dtype: Optional[ValueDtype] = None
    #: which file format this came from: "tiesfed" or "mergekit" (reported, and names the semantics)
    semantics: Literal["tiesfed", "mergekit"] = "tiesfed"
    #: mergekit format only: the model folder whose tokenizer files the output takes instead of the
    #: base's (`tokenizer_source: MODEL`), and the chat template written into it (`chat_template`)
    tokenizer_source: Optional[str] = None
    chat_template: Optional[str] = None
    #: "base": a fine-tune whose vocabulary grew (tokens appended after the base's) is read at the
    #: base's rows (`--vocab base`; mergekit's `tokenizer_source: base`, `tiesfed.io.vocab_rows`);
    #: "union": the output also grows the rows of one fine-tune's added tokens, as mergekit's `union`
    vocab: Optional[Literal["base", "union"]] = None

    @model_validator(mode="before")
    @classmethod
    def _from_mergekit_shape(cls, data: object) -> object:
        """Accept mergekit's layout: `merge_method`, `parameters`, per-model `parameters`."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        options = dict(data.pop("options", {}) or {})
        for key in ("merge_method", "method"):
            if key in data:
                options["method"] = data.pop(key)
        options.update(data.pop("parameters", {}) or {})
        if "density" in options:  # mergekit's global density is a fraction
            options["k"] = float(options.pop("density")) * 100
        models = []
        for m in data.get("models", []):
            if isinstance(m, str):
                models.append({"model": m})
                continue
            m = dict(m)
            m.update(m.pop("parameters", {}) or {})
            models.append(m)
        data["models"] = models
        data["options"] = options
        return data
