"""The coordinator's own copy of the merged model (θ₀ + λ·τ_m in its spool, with the model
card), written from the merged stream once that is on disk.

By default the copy is part of finalization: a round is finalized once both are
written, and a failed copy fails the attempt (see `finalize`). With the coordinator's
`publish_first`, the round is finalized, and clients fetch, as soon as the merged stream
is signed; the copy is written afterwards (`copy_after_publish`), its failures retried
and logged, never failing the round, and a copy a restart finds unfinished
(`model_pending` in the state file) is written again.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Optional

from tiesfed.coordinator.aggregator import AggregatorLike
from tiesfed.coordinator.rounds.aggregation import release
from tiesfed.coordinator.rounds.config import RoundConfig
from tiesfed.coordinator.rounds.events import Merged
from tiesfed.coordinator.rounds.state import RoundState
from tiesfed.coordinator.spool import RoundSpool

log = logging.getLogger("tiesfed.coordinator")

#: Tries at the copy after publishing, `BACKOFF_S` apart and doubling.
COPY_ATTEMPTS = 3
BACKOFF_S = 0.5


def write_copy(r: RoundState, agg: Optional[AggregatorLike], merged: Merged, contributors: list[str]) -> None:
    """The merged model and its card into the spool's model folder."""
    from tiesfed.io.model_card import write_round_card  # the card: a merge of these contributions

    write_model(agg, r.base_path, merged.path, r.spool, r.shard_bytes, r.config)
    write_round_card(r.spool.model_dir, Path(r.base_path),
                     r.config.model_dump(mode="json", by_alias=True, exclude={"manifest"}),
                     {c: r.committed[c].sha256 for c in contributors}, merged.sha256)
    log.info("round %s: merged model written to %s", r.id, r.spool.model_dir,
             extra={"round": r.id, "path": str(r.spool.model_dir)})


def copy_after_publish(r: RoundState, agg: Optional[AggregatorLike], merged: Merged,
                       contributors: list[str]) -> None:
    """publish_first: the copy of a finalized round, `COPY_ATTEMPTS` tries from a clean model
    folder; the aggregator (its actors can write in parallel) is let go after."""
    delay = BACKOFF_S
    try:
        for attempt in range(1, COPY_ATTEMPTS + 1):
            try:
                write_copy(r, agg, merged, contributors)
                break
            except Exception as e:
                log.exception("round %s: the model copy, attempt %d of %d, failed", r.id, attempt, COPY_ATTEMPTS)
                try:
                    r.spool.clear_outputs(keep_merged=True)
                except OSError:
                    log.exception("round %s: removing the partial model copy failed", r.id)
                if attempt == COPY_ATTEMPTS:
                    with r.lock:
                        r.message = (f"the coordinator's copy of the merged model failed after {attempt} "
                                     f"attempt(s): {e!r}; the merged stream is published, and a restart "
                                     "writes the copy again")
                        persist(r)
                    return
                time.sleep(delay)
                delay *= 2
        with r.lock:
            r.model_pending = False
            persist(r)
    finally:
        release(agg)


def resume_copy(r: RoundState) -> None:
    """A finalized round whose copy a restart found unfinished: write it on a thread of its own."""
    if not r.base_path or r.merged is None:
        return
    contributors = sorted(r.committed)

    def run() -> None:
        r.spool.clear_outputs(keep_merged=True)
        copy_after_publish(r, None, r.merged, contributors)

    r._finalizer = threading.Thread(target=run, name=f"model-copy-{r.id}", daemon=True)
    r._finalizer.start()


def persist(r: RoundState) -> None:
    try:
        r._persist()
    except OSError:
        log.exception("round %s: writing the state file failed", r.id)


def write_model(
    agg: AggregatorLike | None,
    base_path: str,
    merged_path: Path,
    spool: RoundSpool,
    shard_bytes: int,
    config: RoundConfig,
) -> None:
    """The full merged model: by the shard actors in parallel where the aggregator
    can (a Ray-sharded one, base and spool on a shared filesystem), else here."""
    from tiesfed.io.materialize import apply_merged
    from tiesfed.io.model_io import ModelReader, copy_side_files

    parallel = getattr(agg, "write_model", None)
    if parallel is not None:
        try:
            parallel(base_path, str(merged_path), spool.model_dir, shard_bytes,
                     {"tiesfed_method": config.options.method})
            copy_side_files(Path(base_path), spool.model_dir)
            return
        except Exception as e:  # e.g. the base is not readable on every node
            log.warning("round %s: parallel model write failed (%r); writing it here", config.round_id, e)
            spool.clear_outputs(keep_merged=True)
    with ModelReader(base_path) as base:
        apply_merged(base, merged_path, spool.model_dir, shard_bytes=shard_bytes)
