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


def _common_options() -> list[tuple[str, int]]:
    """Both ends: message limits and keepalive, set explicitly."""
    return [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def server_options() -> list[tuple[str, int]]:
    """Options of the coordinator's gRPC server."""
    return _common_options() + [
        # accept the clients' keepalive pings (the default minimum is 5 minutes)
        ("grpc.http2.min_recv_ping_interval_without_data_ms", KEEPALIVE_TIME_MS // 2),
        ("grpc.http2.max_ping_strikes", 2),
        ("grpc.so_reuseport", 0),
    ]


def channel_options() -> list[tuple[str, int]]:
    """Options of a client's channel to the coordinator."""
    return _common_options()
