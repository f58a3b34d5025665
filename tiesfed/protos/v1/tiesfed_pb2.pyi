from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LatePolicy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LATE_POLICY_UNSPECIFIED: _ClassVar[LatePolicy]
    LATE_POLICY_REJECT: _ClassVar[LatePolicy]
    LATE_POLICY_ACCEPT: _ClassVar[LatePolicy]

class ReplacePolicy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REPLACE_POLICY_UNSPECIFIED: _ClassVar[ReplacePolicy]
    REPLACE_POLICY_REPLACE: _ClassVar[ReplacePolicy]
    REPLACE_POLICY_REFUSE: _ClassVar[ReplacePolicy]

class RoundState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROUND_STATE_UNSPECIFIED: _ClassVar[RoundState]
    ROUND_STATE_OPEN: _ClassVar[RoundState]
    ROUND_STATE_FINALIZING: _ClassVar[RoundState]
    ROUND_STATE_FINALIZED: _ClassVar[RoundState]
    ROUND_STATE_FAILED: _ClassVar[RoundState]

class EventKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EVENT_KIND_UNSPECIFIED: _ClassVar[EventKind]
    ROUND_OPENED: _ClassVar[EventKind]
    UPLOAD_COMMITTED: _ClassVar[EventKind]
    UPLOAD_DUPLICATE: _ClassVar[EventKind]
    UPLOAD_REPLACED: _ClassVar[EventKind]
    UPLOAD_REJECTED: _ClassVar[EventKind]
    UPLOAD_ABANDONED: _ClassVar[EventKind]
    ROUND_FINALIZING: _ClassVar[EventKind]
    ROUND_FINALIZED: _ClassVar[EventKind]
    ROUND_FAILED: _ClassVar[EventKind]
LATE_POLICY_UNSPECIFIED: LatePolicy
LATE_POLICY_REJECT: LatePolicy
LATE_POLICY_ACCEPT: LatePolicy
REPLACE_POLICY_UNSPECIFIED: ReplacePolicy
REPLACE_POLICY_REPLACE: ReplacePolicy
REPLACE_POLICY_REFUSE: ReplacePolicy
ROUND_STATE_UNSPECIFIED: RoundState
ROUND_STATE_OPEN: RoundState
ROUND_STATE_FINALIZING: RoundState
ROUND_STATE_FINALIZED: RoundState
ROUND_STATE_FAILED: RoundState
EVENT_KIND_UNSPECIFIED: EventKind
ROUND_OPENED: EventKind
UPLOAD_COMMITTED: EventKind
UPLOAD_DUPLICATE: EventKind
UPLOAD_REPLACED: EventKind
UPLOAD_REJECTED: EventKind
UPLOAD_ABANDONED: EventKind
ROUND_FINALIZING: EventKind
ROUND_FINALIZED: EventKind
ROUND_FAILED: EventKind

class TensorSpec(_message.Message):
    __slots__ = ("name", "shape", "dtype")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ...) -> None: ...

class Participant(_message.Message):
    __slots__ = ("client_id", "weight", "density", "model_key")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    DENSITY_FIELD_NUMBER: _ClassVar[int]
    MODEL_KEY_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    weight: float
    density: float
    model_key: str
    def __init__(self, client_id: _Optional[str] = ..., weight: _Optional[float] = ..., density: _Optional[float] = ..., model_key: _Optional[str] = ...) -> None: ...

class RoundSpec(_message.Message):
    __slots__ = ("round_id", "method", "options_json", "k", "base_fingerprint", "manifest", "participants", "quorum", "deadline_unix", "late_policy", "replace_policy", "max_chunk_bytes", "state", "max_abs_value")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_JSON_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    LAMBDA_FIELD_NUMBER: _ClassVar[int]
    BASE_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANTS_FIELD_NUMBER: _ClassVar[int]
    QUORUM_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_FIELD_NUMBER: _ClassVar[int]
    LATE_POLICY_FIELD_NUMBER: _ClassVar[int]
    REPLACE_POLICY_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    MAX_ABS_VALUE_FIELD_NUMBER: _ClassVar[int]
    round_id: str
    method: str
    options_json: str
    k: float
    base_fingerprint: str
    manifest: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    participants: _containers.RepeatedCompositeFieldContainer[Participant]
    quorum: int
    deadline_unix: float
    late_policy: LatePolicy
    replace_policy: ReplacePolicy
    max_chunk_bytes: int
    state: RoundState
    max_abs_value: float
    def __init__(self, round_id: _Optional[str] = ..., method: _Optional[str] = ..., options_json: _Optional[str] = ..., k: _Optional[float] = ..., base_fingerprint: _Optional[str] = ..., manifest: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., participants: _Optional[_Iterable[_Union[Participant, _Mapping]]] = ..., quorum: _Optional[int] = ..., deadline_unix: _Optional[float] = ..., late_policy: _Optional[_Union[LatePolicy, str]] = ..., replace_policy: _Optional[_Union[ReplacePolicy, str]] = ..., max_chunk_bytes: _Optional[int] = ..., state: _Optional[_Union[RoundState, str]] = ..., max_abs_value: _Optional[float] = ..., **kwargs) -> None: ...

class OpenRoundRequest(_message.Message):
    __slots__ = ("round_id", "options_json", "participants", "quorum", "deadline_unix", "deadline_seconds", "late_policy", "replace_policy", "base_fingerprint", "manifest", "max_abs_value", "secure_aggregation", "secagg_json")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_JSON_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANTS_FIELD_NUMBER: _ClassVar[int]
    QUORUM_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LATE_POLICY_FIELD_NUMBER: _ClassVar[int]
    REPLACE_POLICY_FIELD_NUMBER: _ClassVar[int]
    BASE_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    MAX_ABS_VALUE_FIELD_NUMBER: _ClassVar[int]
    SECURE_AGGREGATION_FIELD_NUMBER: _ClassVar[int]
    SECAGG_JSON_FIELD_NUMBER: _ClassVar[int]
    round_id: str
    options_json: str
    participants: _containers.RepeatedCompositeFieldContainer[Participant]
    quorum: int
    deadline_unix: float
    deadline_seconds: float
    late_policy: LatePolicy
    replace_policy: ReplacePolicy
    base_fingerprint: str
    manifest: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    max_abs_value: float
    secure_aggregation: bool
    secagg_json: str
    def __init__(self, round_id: _Optional[str] = ..., options_json: _Optional[str] = ..., participants: _Optional[_Iterable[_Union[Participant, _Mapping]]] = ..., quorum: _Optional[int] = ..., deadline_unix: _Optional[float] = ..., deadline_seconds: _Optional[float] = ..., late_policy: _Optional[_Union[LatePolicy, str]] = ..., replace_policy: _Optional[_Union[ReplacePolicy, str]] = ..., base_fingerprint: _Optional[str] = ..., manifest: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., max_abs_value: _Optional[float] = ..., secure_aggregation: _Optional[bool] = ..., secagg_json: _Optional[str] = ...) -> None: ...

class CloseRoundRequest(_message.Message):
    __slots__ = ("round_id", "abort")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    ABORT_FIELD_NUMBER: _ClassVar[int]
    round_id: str
    abort: bool
    def __init__(self, round_id: _Optional[str] = ..., abort: _Optional[bool] = ...) -> None: ...

class GetRoundSpecRequest(_message.Message):
    __slots__ = ("round_id",)
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    round_id: str
    def __init__(self, round_id: _Optional[str] = ...) -> None: ...

class GetRoundStatusRequest(_message.Message):
    __slots__ = ("round_id",)
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    round_id: str
    def __init__(self, round_id: _Optional[str] = ...) -> None: ...

class RoundStatus(_message.Message):
    __slots__ = ("round_id", "state", "committed_clients", "quorum", "expected", "deadline_unix", "merged_sha256", "merged_bytes", "message", "majority_sign")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_CLIENTS_FIELD_NUMBER: _ClassVar[int]
    QUORUM_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_FIELD_NUMBER: _ClassVar[int]
    MERGED_SHA256_FIELD_NUMBER: _ClassVar[int]
    MERGED_BYTES_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    MAJORITY_SIGN_FIELD_NUMBER: _ClassVar[int]
    round_id: str
    state: RoundState
    committed_clients: _containers.RepeatedScalarFieldContainer[str]
    quorum: int
    expected: int
    deadline_unix: float
    merged_sha256: str
    merged_bytes: int
    message: str
    majority_sign: int
    def __init__(self, round_id: _Optional[str] = ..., state: _Optional[_Union[RoundState, str]] = ..., committed_clients: _Optional[_Iterable[str]] = ..., quorum: _Optional[int] = ..., expected: _Optional[int] = ..., deadline_unix: _Optional[float] = ..., merged_sha256: _Optional[str] = ..., merged_bytes: _Optional[int] = ..., message: _Optional[str] = ..., majority_sign: _Optional[int] = ...) -> None: ...

class UploadChunk(_message.Message):
    __slots__ = ("round_id", "offset", "data", "signature")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    round_id: str
    offset: int
    data: bytes
    signature: bytes
    def __init__(self, round_id: _Optional[str] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class UploadReceipt(_message.Message):
    __slots__ = ("committed", "committed_offset", "sha256", "bytes", "nnz", "duplicate", "replaced", "committed_count")
    COMMITTED_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_OFFSET_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    NNZ_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    REPLACED_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_COUNT_FIELD_NUMBER: _ClassVar[int]
    committed: bool
    committed_offset: int
    sha256: str
    bytes: int
    nnz: int
    duplicate: bool
    replaced: bool
    committed_count: int
    def __init__(self, committed: _Optional[bool] = ..., committed_offset: _Optional[int] = ..., sha256: _Optional[str] = ..., bytes: _Optional[int] = ..., nnz: _Optional[int] = ..., duplicate: _Optional[bool] = ..., replaced: _Optional[bool] = ..., committed_count: _Optional[int] = ...) -> None: ...

class UploadStatusRequest(_message.Message):
    __slots__ = ("round_id",)
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    round_id: str
    def __init__(self, round_id: _Optional[str] = ...) -> None: ...

class UploadStatusReply(_message.Message):
    __slots__ = ("committed_offset", "prefix_sha256", "committed", "committed_sha256")
    COMMITTED_OFFSET_FIELD_NUMBER: _ClassVar[int]
    PREFIX_SHA256_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_SHA256_FIELD_NUMBER: _ClassVar[int]
    committed_offset: int
    prefix_sha256: str
    committed: bool
    committed_sha256: str
    def __init__(self, committed_offset: _Optional[int] = ..., prefix_sha256: _Optional[str] = ..., committed: _Optional[bool] = ..., committed_sha256: _Optional[str] = ...) -> None: ...

class ReserveUploadRequest(_message.Message):
    __slots__ = ("round_id", "wait_seconds")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    round_id: str
    wait_seconds: float
    def __init__(self, round_id: _Optional[str] = ..., wait_seconds: _Optional[float] = ...) -> None: ...

class ReserveUploadReply(_message.Message):
    __slots__ = ("granted", "lease", "lease_seconds")
    GRANTED_FIELD_NUMBER: _ClassVar[int]
    LEASE_FIELD_NUMBER: _ClassVar[int]
    LEASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    granted: bool
    lease: str
    lease_seconds: float
    def __init__(self, granted: _Optional[bool] = ..., lease: _Optional[str] = ..., lease_seconds: _Optional[float] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("round_id", "from_seq")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    FROM_SEQ_FIELD_NUMBER: _ClassVar[int]
    round_id: str
    from_seq: int
    def __init__(self, round_id: _Optional[str] = ..., from_seq: _Optional[int] = ...) -> None: ...

class RoundEvent(_message.Message):
    __slots__ = ("seq", "time_unix", "kind", "round_id", "client_id", "message", "committed", "expected", "state", "sha256", "bytes")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TIME_UNIX_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    seq: int
    time_unix: float
    kind: EventKind
    round_id: str
    client_id: str
    message: str
    committed: int
    expected: int
    state: RoundState
    sha256: str
    bytes: int
    def __init__(self, seq: _Optional[int] = ..., time_unix: _Optional[float] = ..., kind: _Optional[_Union[EventKind, str]] = ..., round_id: _Optional[str] = ..., client_id: _Optional[str] = ..., message: _Optional[str] = ..., committed: _Optional[int] = ..., expected: _Optional[int] = ..., state: _Optional[_Union[RoundState, str]] = ..., sha256: _Optional[str] = ..., bytes: _Optional[int] = ...) -> None: ...

class DownloadRequest(_message.Message):
    __slots__ = ("round_id", "offset")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    round_id: str
    offset: int
    def __init__(self, round_id: _Optional[str] = ..., offset: _Optional[int] = ...) -> None: ...

class DownloadChunk(_message.Message):
    __slots__ = ("offset", "data", "total_bytes", "sha256", "merged_manifest_json", "merged_signature", "coordinator_cert_pem")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    MERGED_MANIFEST_JSON_FIELD_NUMBER: _ClassVar[int]
    MERGED_SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    COORDINATOR_CERT_PEM_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    total_bytes: int
    sha256: str
    merged_manifest_json: str
    merged_signature: bytes
    coordinator_cert_pem: str
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ..., total_bytes: _Optional[int] = ..., sha256: _Optional[str] = ..., merged_manifest_json: _Optional[str] = ..., merged_signature: _Optional[bytes] = ..., coordinator_cert_pem: _Optional[str] = ...) -> None: ...
