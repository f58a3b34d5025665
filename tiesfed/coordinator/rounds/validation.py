"""What a contribution must be to enter a round: checked record by record, before it folds.

The codec checks each record's indices, order, values and checksums; these rules
check it against the round: the stream header (kind, base fingerprint, trim, and a
global top-k trim's threshold), each tensor (in the manifest, once, of the base's
shape, within the client's budget; a tensor sent as span records: its spans back to
back, in order, covering it exactly once), completeness at the end marker, and, under
the refuse policy, identity with the committed stream. A failed rule raises
`RoundError`; the caller withdraws the upload.

A global top-k trim keeps |τ| ≥ t, t the int(D·k)-th largest |τ|: ties at t all
survive, as in the paper, so the nonzeros alone bound nothing tight. The header
declares t; every value must be at least t (cast to the values' dtype: rounding is
monotonic, so an honest survivor stays at least the cast threshold), and at most
int(D·k) may be strictly above it (above the cast threshold implies above t).
"""

from __future__ import annotations

import math

import torch

from tiesfed.coordinator.rounds.config import RoundConfig, nnz_budget
from tiesfed.coordinator.rounds.events import RoundError
from tiesfed.coordinator.rounds.uploads import UploadSession
from tiesfed.core.trim import TrimSpec, keep_count
from tiesfed.protos.codec import CodecError, Limits, SparseTensor


def limits_for(config: RoundConfig) -> Limits:
    """Codec limits from the manifest: no record larger than the round's biggest tensor."""
    biggest = max((t.numel for t in config.manifest), default=1)
    return Limits(max_numel=max(biggest, 1), max_payload_bytes=16 * biggest + 4096, max_header_bytes=1 << 20)


class ContributionRules:
    """A round's checks on its uploads; stateless but for what each session records."""

    def __init__(self, config: RoundConfig, trims: dict[str, TrimSpec]) -> None:
        self.round_id = config.round_id
        self.base_fingerprint = config.base_fingerprint
        self.trims = trims
        self.manifest = {t.name: t for t in config.manifest}
        self.total = sum(t.numel for t in config.manifest)
        self.budgets = {cid: nnz_budget(t, self.total) for cid, t in trims.items()}
        #: clients whose trim keeps |τ| ≥ a declared threshold (global top-k that drops something)
        self.thresholded = {cid for cid, t in trims.items() if thresholded(t, self.total)}
        self.max_abs_value = config.max_abs_value if config.max_abs_value is not None else math.inf

    def check_header(self, s: UploadSession, h: dict) -> None:
        """The stream was made for this round: a contribution, on its base, trimmed as asked."""
        if h.get("kind") != "contribution":
            raise RoundError("INVALID_ARGUMENT", f"stream header kind is {h.get('kind')!r}, expected 'contribution'")
        fp = h.get("base_fingerprint")
        if fp != self.base_fingerprint:
            raise RoundError(
                "FAILED_PRECONDITION",
                f"contribution of {s.client_id!r} was computed against base {fp!r}, "
                f"but round {self.round_id!r} merges onto base {self.base_fingerprint!r}",
            )
        want = self.trims[s.client_id]
        got = h.get("trim") or {}
        if not isinstance(got, dict):
            raise RoundError("INVALID_ARGUMENT", f"contribution of {s.client_id!r}: stream header key 'trim' is "
                             f"{type(got).__name__}, expected an object")
        keys = ["kind", "fraction"] + (["scope"] if want.kind == "topk" else []) + (["seed"] if want.kind == "dare" else [])
        bad = [k for k in keys if got.get(k) != getattr(want, k)]
        if bad:
            raise RoundError(
                "INVALID_ARGUMENT",
                f"contribution of {s.client_id!r} was trimmed with {({k: got.get(k) for k in keys})}, "
                f"round {self.round_id!r} asks for {({k: getattr(want, k) for k in keys})}",
            )
        if s.client_id in self.thresholded:
            t = h.get("threshold")
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
                said = "does not declare its trim threshold" if t is None else f"declares trim threshold {t!r}"
                raise RoundError(
                    "INVALID_ARGUMENT",
                    f"contribution of {s.client_id!r} {said}: a top-k trim over the whole model must declare "
                    "the threshold it kept |values| at or above (header key 'threshold', a finite number >= 0)",
                )
            s.threshold = float(t)

    def check_record(self, s: UploadSession, t: SparseTensor) -> None:
        """One record (a whole tensor, or a span of one): in the manifest, not seen before,
        the base's shape, spans in order, no value below a declared threshold; counts it
        into the session (`seen`, `cover`, `nnz`, `above`) and checks the client's budget."""
        e = self.manifest.get(t.name)
        if e is None:
            raise RoundError("INVALID_ARGUMENT", f"tensor {t.name!r} is not in the manifest of round {self.round_id!r}")
        first = s.cover.open is None  # the record starts a tensor (else it continues the one in progress)
        if first and t.name in s.seen:
            raise RoundError("INVALID_ARGUMENT", f"tensor {t.name!r} appears twice in the contribution")
        if tuple(t.shape) != tuple(e.shape):
            raise RoundError(
                "INVALID_ARGUMENT", f"tensor {t.name!r} has shape {list(t.shape)}, the round's base has {list(e.shape)}"
            )
        try:
            s.cover.add(t)
        except CodecError as err:
            raise RoundError("INVALID_ARGUMENT", f"contribution of {s.client_id!r}: {err}") from None
        if first:
            s.tensor_nnz = 0
        s.tensor_nnz += t.nnz
        mag = t.values.abs() if t.nnz else None  # once: the bound and the threshold both look at it
        if mag is not None and (peak := float(mag.max())) > self.max_abs_value:
            raise RoundError(
                "INVALID_ARGUMENT",
                f"tensor {t.name!r} carries |value| {peak:g}, over the max_abs_value "
                f"{self.max_abs_value:g} of round {self.round_id!r} (the bound that keeps the merged model finite)",
            )
        trim = self.trims[s.client_id]
        over = f"over the budget of {trim.kind} trim at {100 * trim.fraction:g}%"
        if s.threshold is not None and mag is not None:
            floor = torch.tensor(s.threshold, dtype=torch.float32).to(mag.dtype)  # monotonic rounding
            if bool(mag.min() < floor):
                raise RoundError(
                    "INVALID_ARGUMENT",
                    f"tensor {t.name!r} of {s.client_id!r} carries |value| {float(mag.min()):g}: "
                    f"a value below the declared trim threshold {s.threshold:g}",
                )
            s.above += int((mag > floor).sum())
        elif trim.kind == "topk" and trim.scope == "tensor" and s.tensor_nnz > (keep := keep_count(e.numel, trim.fraction)):
            raise RoundError(
                "INVALID_ARGUMENT",
                f"tensor {t.name!r} of {s.client_id!r} carries {s.tensor_nnz:,} nonzeros, more than int(k*n) = "
                f"{keep:,} of its {e.numel:,}: {over} per tensor",
            )
        s.seen.add(t.name)
        s.nnz += t.nnz
        budget = self.budgets[s.client_id]
        if s.threshold is not None and s.above > budget:
            raise RoundError(
                "INVALID_ARGUMENT",
                f"contribution of {s.client_id!r} carries more than {budget:,} values above its declared "
                f"threshold {s.threshold:g} (at {t.name!r}): {over} of {self.total:,} parameters",
            )
        most = budget if s.threshold is None else self.total
        if s.nnz > most:
            raise RoundError(
                "INVALID_ARGUMENT",
                f"contribution of {s.client_id!r} carries more than {most:,} nonzeros (at {t.name!r}): "
                f"{over} of {self.total:,} parameters",
            )

    def check_complete(self, s: UploadSession) -> None:
        """At the end marker: every tensor of the manifest arrived, the last one whole."""
        try:
            s.cover.finish()
        except CodecError as err:
            raise RoundError("INVALID_ARGUMENT", f"contribution of {s.client_id!r}: {err}") from None
        missing = [n for n in self.manifest if n not in s.seen]
        if missing:
            raise RoundError(
                "INVALID_ARGUMENT",
                f"contribution of {s.client_id!r} ends without {len(missing)} tensor(s) of the manifest, e.g. "
                + ", ".join(repr(m) for m in missing[:5]),
            )

    def check_unchanged(self, s: UploadSession, data: bytes) -> None:
        """Refuse policy: a re-upload must be byte-identical to the committed one."""
        c = s.compare
        with open(c.path, "rb") as f:
            f.seek(s.offset)
            same = f.read(len(data)) == data
        if not same:
            raise RoundError(
                "FAILED_PRECONDITION",
                f"client {s.client_id!r} already committed a different contribution (sha256 {c.sha256[:16]}…) "
                f"and round {self.round_id!r} refuses replacements",
            )


def thresholded(trim: TrimSpec, total: int) -> bool:
    """Whether `trim` keeps the |τ| at or above a threshold it declares: a top-k trim over
    the whole model that drops something (int(D·k) < D)."""
    return trim.kind == "topk" and trim.scope == "global" and keep_count(total, trim.fraction) < total
