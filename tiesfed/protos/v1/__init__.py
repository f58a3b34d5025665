"""tiesfed.v1: the gRPC contract (generated stubs: tiesfed_pb2, tiesfed_pb2_grpc).

The constants below are part of the contract: both sides of a connection
use them, so the message-size limits and keepalive settings agree.
"""

from __future__ import annotations

#: Largest `UploadChunk.data` / `DownloadChunk.data` (bytes).
MAX_CHUNK_BYTES = 4 << 20
#: gRPC message limit: one full chunk plus room for the other fields.
MAX_MESSAGE_BYTES = MAX_CHUNK_BYTES + (64 << 10)

#: gRPC metadata keys (lower case, as gRPC requires).
CLIENT_ID_KEY = "tiesfed-client-id"
ADMIN_TOKEN_KEY = "tiesfed-admin-token"
UPLOAD_LEASE_KEY = "tiesfed-upload-lease"

KEEPALIVE_TIME_MS = 30_000
KEEPALIVE_TIMEOUT_MS = 10_000
#: A waiting client redials at most this far apart (gRPC's default grows to 2 minutes).
MAX_RECONNECT_BACKOFF_MS = 5_000


def _common_options(keepalive_ms: int) -> list[tuple[str, int]]:
    """Both ends: message limits and keepalive, set explicitly."""
    return [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", keepalive_ms),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def server_options(keepalive_ms: int = KEEPALIVE_TIME_MS) -> list[tuple[str, int]]:
    """Options of the coordinator's gRPC server.

    The server must accept the clients' keepalive pings, which arrive every
    `keepalive_ms` even on a quiet stream (a client waiting hours on Watch):
    gRPC's default policy allows one ping per 5 minutes without data and
    answers more with GOAWAY "too_many_pings". The argument's name is
    `grpc.http2.min_ping_interval_without_data_ms` (C-core's
    GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS).
    """
    return _common_options(keepalive_ms) + [
        ("grpc.http2.min_ping_interval_without_data_ms", keepalive_ms // 2),
        ("grpc.http2.max_ping_strikes", 2),
        ("grpc.so_reuseport", 0),
    ]


def channel_options(keepalive_ms: int = KEEPALIVE_TIME_MS) -> list[tuple[str, int]]:
    """Options of a client's channel to the coordinator."""
    return _common_options(keepalive_ms) + [
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.min_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
    ]


def check_target(target: str) -> str:
    """`host:port` (or `[v6]:port`), else a clear error rather than a silent dial to :443."""
    host, sep, port = target.rpartition(":")
    if "://" in target:
        raise ValueError(f"target {target!r} must be HOST:PORT, without a scheme (e.g. 127.0.0.1:50051)")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"target {target!r} must be HOST:PORT (e.g. 127.0.0.1:50051)")
    return target
