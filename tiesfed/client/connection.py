"""A client's channel to the coordinator: identity, retries, waiting for it to come up,
and the round spec checks every client call starts with.

The channel is mutual TLS with an identity folder from `tiesfed pki` (the client id
is then the certificate's, as the coordinator will see it), or plaintext only when
the caller says `insecure=True` (loopback demos and in-process tests)."""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import grpc

from tiesfed.core.options import MergeOptions
from tiesfed.io.model_io import (
    ModelReader,
    fingerprint,
    mergeable,
)
from tiesfed.protos.v1 import (
    CLIENT_ID_KEY,
    KEEPALIVE_TIME_MS,
    channel_options,
    check_target,
)
from tiesfed.protos.v1 import tiesfed_pb2 as pb
from tiesfed.protos.v1 import tiesfed_pb2_grpc as pb_grpc
from tiesfed.trust.identity import Identity, secure_channel

log = logging.getLogger("tiesfed.client")

#: Transient answers: the coordinator is unreachable or busy (a stream limit reached),
#: or an upload slot lapsed; the call is tried again with backoff.
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED,
                       grpc.StatusCode.RESOURCE_EXHAUSTED})



class FederatedError(RuntimeError):
    """A round refused a request, or a transfer could not be completed.

    `code` is the gRPC status name when the coordinator answered with one.
    """

    def __init__(self, message: str, code: Optional[str] = None) -> None:
        super().__init__(message)
        self.code = code

    @classmethod
    def from_rpc(cls, e: grpc.RpcError, what: str) -> "FederatedError":
        code = e.code() if hasattr(e, "code") else None
        details = e.details() if hasattr(e, "details") else str(e)
        name = code.name if code is not None else None
        return cls(f"{what}: {name}: {details}", name)


@dataclass(frozen=True)
class Retry:
    """Exponential backoff with jitter for transient failures."""

    attempts: int = 8
    backoff_s: float = 0.2
    max_backoff_s: float = 10.0

    def delay(self, n: int) -> float:
        """Seconds to wait before attempt n + 1 (jittered)."""
        return min(self.max_backoff_s, self.backoff_s * (2**n)) * (0.5 + random.random() / 2)

    def sleep(self, n: int, delay: Optional[float] = None) -> None:
        time.sleep(self.delay(n) if delay is None else delay)


class Connection:
    """A channel to the coordinator as this client.

    Give exactly one of `tls` (an identity folder or a loaded `Identity`: mutual TLS,
    the client id is the certificate's) and `insecure=True` (plaintext, the id
    `client_id` sent as metadata). `server_name` overrides the name the server's
    certificate must carry (default: the host dialled).

    `wait_s` > 0: the first call waits up to that long for a coordinator that
    is not listening yet (started after its clients), redialling with gRPC's
    bounded backoff and logging each wait, instead of failing at once.
    """

    def __init__(
        self, target: str, client_id: Optional[str] = None, retry: Retry = Retry(), *,
        tls: Union[str, Path, Identity, None] = None, insecure: bool = False, server_name: Optional[str] = None,
        wait_s: float = 0.0, keepalive_ms: int = KEEPALIVE_TIME_MS,
    ) -> None:
        self.target = check_target(target)
        self.identity, self.client_id = client_identity(client_id, tls, insecure)
        if server_name and self.identity is None:
            raise ValueError("server_name (--server-name) checks the server's certificate: it needs tls (--tls)")
        self.retry = retry
        if self.identity is not None:
            self.channel = secure_channel(target, self.identity, server_name=server_name,
                                          options=channel_options(keepalive_ms))
        else:
            self.channel = grpc.insecure_channel(target, options=channel_options(keepalive_ms))
        self.stub = pb_grpc.CoordinatorStub(self.channel)
        self.metadata = ((CLIENT_ID_KEY, self.client_id),)
        if wait_s > 0:
            self.wait_ready(wait_s)

    def wait_ready(self, wait_s: float, report_every_s: float = 5.0) -> None:
        """Block until the channel connects, at most `wait_s` seconds."""
        started = time.monotonic()
        while True:
            left = wait_s - (time.monotonic() - started)
            try:
                grpc.channel_ready_future(self.channel).result(timeout=max(0.0, min(left, report_every_s)))
                return
            except grpc.FutureTimeoutError:
                waited = time.monotonic() - started
                if waited >= wait_s:
                    raise FederatedError(
                        f"no coordinator answered at {self.target} within {wait_s:g} s "
                        "(is it running? --wait-for-coordinator waits longer)", "UNAVAILABLE") from None
                log.warning("waiting for the coordinator at %s: %.0f of %g s", self.target, waited, wait_s)

    def call(self, name: str, request, timeout: float = 60.0):
        """A unary call, retried on transient errors."""
        method = getattr(self.stub, name)
        for n in range(self.retry.attempts + 1):
            try:
                return method(request, metadata=self.metadata, timeout=timeout)
            except grpc.RpcError as e:
                if e.code() not in RETRYABLE or n == self.retry.attempts:
                    raise FederatedError.from_rpc(e, f"{name} for {self.client_id!r} at {self.target}") from None
                delay = self.retry.delay(n)
                log.warning("%s at %s: %s (%s); retry %d of %d in %.1f s", name, self.target, e.code().name,
                            e.details(), n + 1, self.retry.attempts, delay)
                self.retry.sleep(n, delay)
        raise AssertionError("unreachable")  # pragma: no cover

    def round_spec(self, round_id: str) -> pb.RoundSpec:
        return self.call("GetRoundSpec", pb.GetRoundSpecRequest(round_id=round_id))

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "Connection":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def client_identity(client_id: Optional[str], tls: Union[str, Path, Identity, None],
                    insecure: bool) -> tuple[Optional[Identity], str]:
    """(identity, client id) for a connection: exactly one of tls/insecure; with tls the
    id is the certificate's (a different `client_id` is a mistake worth stopping at)."""
    if (tls is None) == (not insecure):
        raise ValueError("give exactly one of --tls IDENTITY_DIR (mutual TLS) and --insecure (plaintext, for "
                         "loopback demos)" + (", not both" if insecure else ""))
    if tls is None:
        if not client_id:
            raise ValueError("an insecure connection needs a client id (--client-id)")
        return None, client_id
    identity = tls if isinstance(tls, Identity) else Identity.load(tls)
    if not identity.name:
        raise ValueError(f"--tls {identity.folder}: the certificate names no client id (CN)")
    if client_id is not None and client_id != identity.name:
        raise ValueError(f"--client-id {client_id!r} is not the id of the certificate in {identity.folder} "
                         f"({identity.name!r}); with --tls the id is the certificate's: leave --client-id out")
    return identity, identity.name


def spec_options(spec: pb.RoundSpec) -> MergeOptions:
    return MergeOptions.model_validate_json(spec.options_json)


def check_base(spec: pb.RoundSpec, base: ModelReader, opts: MergeOptions) -> str:
    """The base must be the round's: same fingerprint and mergeable manifest. Returns the fingerprint."""
    fp = fingerprint(base)
    if fp != spec.base_fingerprint:
        raise FederatedError(
            f"base model {base.path} has fingerprint {fp}, but round {spec.round_id!r} merges onto "
            f"{spec.base_fingerprint}: use the round's base model",
            "FAILED_PRECONDITION",
        )
    mine = [(t.name, list(t.shape)) for t in mergeable(base.manifest(), opts.keep_base)]
    theirs = [(t.name, list(t.shape)) for t in spec.manifest]
    if mine != theirs:
        raise FederatedError(
            f"base model {base.path} does not have the round's tensor manifest", "FAILED_PRECONDITION"
        )
    return fp


# ----------------------------------------------------------------------------- submit


