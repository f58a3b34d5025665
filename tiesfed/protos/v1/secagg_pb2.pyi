from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class SecureSpecRequest(_message.Message):
    __slots__ = ("round_id",)
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    round_id: str
    def __init__(self, round_id: _Optional[str] = ...) -> None: ...

class SecureSpec(_message.Message):
    __slots__ = ("round_id", "secure", "params_json")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    SECURE_FIELD_NUMBER: _ClassVar[int]
    PARAMS_JSON_FIELD_NUMBER: _ClassVar[int]
    round_id: str
    secure: bool
    params_json: str
    def __init__(self, round_id: _Optional[str] = ..., secure: _Optional[bool] = ..., params_json: _Optional[str] = ...) -> None: ...

class SecAggStep(_message.Message):
    __slots__ = ("round_id", "phase", "payload")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    round_id: str
    phase: str
    payload: bytes
    def __init__(self, round_id: _Optional[str] = ..., phase: _Optional[str] = ..., payload: _Optional[bytes] = ...) -> None: ...

class SecAggAck(_message.Message):
    __slots__ = ("phase", "message")
    PHASE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    phase: str
    message: str
    def __init__(self, phase: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class SecAggPoll(_message.Message):
    __slots__ = ("round_id", "phase", "wait_seconds", "max_chunk_bytes")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    round_id: str
    phase: str
    wait_seconds: float
    max_chunk_bytes: int
    def __init__(self, round_id: _Optional[str] = ..., phase: _Optional[str] = ..., wait_seconds: _Optional[float] = ..., max_chunk_bytes: _Optional[int] = ...) -> None: ...

class StepChunk(_message.Message):
    __slots__ = ("round_id", "phase", "total_bytes", "data", "sha256")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    round_id: str
    phase: str
    total_bytes: int
    data: bytes
    sha256: str
    def __init__(self, round_id: _Optional[str] = ..., phase: _Optional[str] = ..., total_bytes: _Optional[int] = ..., data: _Optional[bytes] = ..., sha256: _Optional[str] = ...) -> None: ...

class PollChunk(_message.Message):
    __slots__ = ("ready", "phase", "total_bytes", "sha256", "data")
    READY_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    ready: bool
    phase: str
    total_bytes: int
    sha256: str
    data: bytes
    def __init__(self, ready: _Optional[bool] = ..., phase: _Optional[str] = ..., total_bytes: _Optional[int] = ..., sha256: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class SecAggReply(_message.Message):
    __slots__ = ("ready", "payload", "phase")
    READY_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    ready: bool
    payload: bytes
    phase: str
    def __init__(self, ready: _Optional[bool] = ..., payload: _Optional[bytes] = ..., phase: _Optional[str] = ...) -> None: ...

class MaskedChunk(_message.Message):
    __slots__ = ("round_id", "offset", "data", "total_bytes", "sha256")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    round_id: str
    offset: int
    data: bytes
    total_bytes: int
    sha256: str
    def __init__(self, round_id: _Optional[str] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., total_bytes: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class MaskedUploadStatus(_message.Message):
    __slots__ = ("committed_offset", "prefix_sha256", "total_bytes", "committed")
    COMMITTED_OFFSET_FIELD_NUMBER: _ClassVar[int]
    PREFIX_SHA256_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_FIELD_NUMBER: _ClassVar[int]
    committed_offset: int
    prefix_sha256: str
    total_bytes: int
    committed: bool
    def __init__(self, committed_offset: _Optional[int] = ..., prefix_sha256: _Optional[str] = ..., total_bytes: _Optional[int] = ..., committed: _Optional[bool] = ...) -> None: ...

class SecAggStatus(_message.Message):
    __slots__ = ("round_id", "phase", "arrived", "waiting_for", "phase_deadline_unix", "message", "threshold")
    ROUND_ID_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    ARRIVED_FIELD_NUMBER: _ClassVar[int]
    WAITING_FOR_FIELD_NUMBER: _ClassVar[int]
    PHASE_DEADLINE_UNIX_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    round_id: str
    phase: str
    arrived: _containers.RepeatedScalarFieldContainer[str]
    waiting_for: _containers.RepeatedScalarFieldContainer[str]
    phase_deadline_unix: float
    message: str
    threshold: int
    def __init__(self, round_id: _Optional[str] = ..., phase: _Optional[str] = ..., arrived: _Optional[_Iterable[str]] = ..., waiting_for: _Optional[_Iterable[str]] = ..., phase_deadline_unix: _Optional[float] = ..., message: _Optional[str] = ..., threshold: _Optional[int] = ...) -> None: ...
