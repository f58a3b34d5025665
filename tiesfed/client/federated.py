"""The federated client: submit a contribution to a round, fetch the merged model.

    from tiesfed.client.federated import submit, fetch
    submit("coordinator:50051", "r1", None, base="base/", model="ft-a/", tls="org-a/")
    fetch("coordinator:50051", "r1", None, base="base/", out_dir="merged/", tls="org-a/")

`tls` is an identity folder from `tiesfed pki` (the client id is its certificate's);
`insecure=True` with a client id instead is for a loopback coordinator run --insecure.

`submit` reads the round's spec, checks that its base is the round's base
(fingerprint and manifest), trims with the round's options through the same
`iter_contribution` the local engine uses, and uploads the encoded stream as
one pipelined gRPC client stream: a producer thread encodes tensor by tensor
into a local spool file while the sender streams that file in chunks, so
memory is one tensor plus one chunk. After a broken connection it backs off,
asks the coordinator how many bytes it holds (and their sha256), and resumes
from there out of the local spool.

`fetch` watches the round until it is finalized, downloads the merged task
vector with resume, checks its sha256, and applies θ₀ + λ·τ_m to its own base
with `tiesfed.core.apply.apply_sparse` into a Hugging Face style folder.
"""

from __future__ import annotations

from tiesfed.client.connection import RETRYABLE, Connection, FederatedError, Retry, check_base, spec_options
from tiesfed.client.fetch import FetchResult, download, fetch, wait_finalized
from tiesfed.client.submit import DEFAULT_CHUNK_BYTES, Fault, SubmitResult, reserve_slot, submit, within_bound

__all__ = [
    "Connection", "FederatedError", "Retry", "RETRYABLE", "check_base", "spec_options",
    "submit", "SubmitResult", "DEFAULT_CHUNK_BYTES", "Fault", "reserve_slot", "within_bound",
    "fetch", "FetchResult", "download", "wait_finalized",
]
