from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor
REJECT_REASON_FENCED: RejectReason
REJECT_REASON_INVALID: RejectReason
REJECT_REASON_NOT_FOUND: RejectReason
REJECT_REASON_UNAVAILABLE: RejectReason
REJECT_REASON_UNSPECIFIED: RejectReason
REVOKE_REASON_CANCELLED: RevokeReason
REVOKE_REASON_COLLECT_OUTPUTS: RevokeReason
REVOKE_REASON_DRAINED: RevokeReason
REVOKE_REASON_EXPIRED: RevokeReason
REVOKE_REASON_ROLLED_BACK: RevokeReason
REVOKE_REASON_SUPERSEDED: RevokeReason
REVOKE_REASON_UNSPECIFIED: RevokeReason

class ActionFailure(_message.Message):
    __slots__ = ["details", "message", "retryable"]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RETRYABLE_FIELD_NUMBER: _ClassVar[int]
    details: _struct_pb2.Struct
    message: str
    retryable: bool
    def __init__(self, message: _Optional[str] = ..., retryable: bool = ..., details: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class ActionSuccess(_message.Message):
    __slots__ = ["output"]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    output: _struct_pb2.Struct
    def __init__(self, output: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class CompletionReport(_message.Message):
    __slots__ = ["action_id", "epoch", "failed", "report_id", "succeeded", "trace_parent"]
    ACTION_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    REPORT_ID_FIELD_NUMBER: _ClassVar[int]
    SUCCEEDED_FIELD_NUMBER: _ClassVar[int]
    TRACE_PARENT_FIELD_NUMBER: _ClassVar[int]
    action_id: str
    epoch: int
    failed: ActionFailure
    report_id: int
    succeeded: ActionSuccess
    trace_parent: str
    def __init__(self, report_id: _Optional[int] = ..., action_id: _Optional[str] = ..., epoch: _Optional[int] = ..., succeeded: _Optional[_Union[ActionSuccess, _Mapping]] = ..., failed: _Optional[_Union[ActionFailure, _Mapping]] = ..., trace_parent: _Optional[str] = ...) -> None: ...

class ConnectRequest(_message.Message):
    __slots__ = ["batch", "completion", "goodbye", "grant_ack", "heartbeat", "hello", "progress", "release", "stop_grants"]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_FIELD_NUMBER: _ClassVar[int]
    GOODBYE_FIELD_NUMBER: _ClassVar[int]
    GRANT_ACK_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    HELLO_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    STOP_GRANTS_FIELD_NUMBER: _ClassVar[int]
    batch: ConnectRequestBatch
    completion: CompletionReport
    goodbye: Goodbye
    grant_ack: GrantAck
    heartbeat: Heartbeat
    hello: Hello
    progress: ProgressReport
    release: ReleaseReport
    stop_grants: StopGrants
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., grant_ack: _Optional[_Union[GrantAck, _Mapping]] = ..., progress: _Optional[_Union[ProgressReport, _Mapping]] = ..., completion: _Optional[_Union[CompletionReport, _Mapping]] = ..., release: _Optional[_Union[ReleaseReport, _Mapping]] = ..., goodbye: _Optional[_Union[Goodbye, _Mapping]] = ..., batch: _Optional[_Union[ConnectRequestBatch, _Mapping]] = ..., stop_grants: _Optional[_Union[StopGrants, _Mapping]] = ...) -> None: ...

class ConnectRequestBatch(_message.Message):
    __slots__ = ["messages"]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[ConnectRequest]
    def __init__(self, messages: _Optional[_Iterable[_Union[ConnectRequest, _Mapping]]] = ...) -> None: ...

class ConnectResponse(_message.Message):
    __slots__ = ["batch", "drain", "grant", "heartbeat_ack", "report_result", "revoke", "welcome"]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    DRAIN_FIELD_NUMBER: _ClassVar[int]
    GRANT_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_ACK_FIELD_NUMBER: _ClassVar[int]
    REPORT_RESULT_FIELD_NUMBER: _ClassVar[int]
    REVOKE_FIELD_NUMBER: _ClassVar[int]
    WELCOME_FIELD_NUMBER: _ClassVar[int]
    batch: ConnectResponseBatch
    drain: Drain
    grant: Grant
    heartbeat_ack: HeartbeatAck
    report_result: ReportResult
    revoke: Revoke
    welcome: Welcome
    def __init__(self, welcome: _Optional[_Union[Welcome, _Mapping]] = ..., grant: _Optional[_Union[Grant, _Mapping]] = ..., heartbeat_ack: _Optional[_Union[HeartbeatAck, _Mapping]] = ..., revoke: _Optional[_Union[Revoke, _Mapping]] = ..., report_result: _Optional[_Union[ReportResult, _Mapping]] = ..., drain: _Optional[_Union[Drain, _Mapping]] = ..., batch: _Optional[_Union[ConnectResponseBatch, _Mapping]] = ...) -> None: ...

class ConnectResponseBatch(_message.Message):
    __slots__ = ["messages"]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[ConnectResponse]
    def __init__(self, messages: _Optional[_Iterable[_Union[ConnectResponse, _Mapping]]] = ...) -> None: ...

class Drain(_message.Message):
    __slots__ = ["deadline", "reason"]
    DEADLINE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    deadline: _timestamp_pb2.Timestamp
    reason: str
    def __init__(self, reason: _Optional[str] = ..., deadline: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class Goodbye(_message.Message):
    __slots__ = ["reason"]
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class Grant(_message.Message):
    __slots__ = ["action_id", "attempt", "checkpoint", "epoch", "payload", "run_id", "trace_parent"]
    ACTION_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    TRACE_PARENT_FIELD_NUMBER: _ClassVar[int]
    action_id: str
    attempt: int
    checkpoint: _struct_pb2.Struct
    epoch: int
    payload: _struct_pb2.Struct
    run_id: str
    trace_parent: str
    def __init__(self, action_id: _Optional[str] = ..., epoch: _Optional[int] = ..., attempt: _Optional[int] = ..., payload: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., run_id: _Optional[str] = ..., checkpoint: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., trace_parent: _Optional[str] = ...) -> None: ...

class GrantAck(_message.Message):
    __slots__ = ["action_id", "epoch", "report_id"]
    ACTION_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    REPORT_ID_FIELD_NUMBER: _ClassVar[int]
    action_id: str
    epoch: int
    report_id: int
    def __init__(self, report_id: _Optional[int] = ..., action_id: _Optional[str] = ..., epoch: _Optional[int] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ["held_leases", "sequence"]
    HELD_LEASES_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    held_leases: _containers.RepeatedCompositeFieldContainer[HeldLease]
    sequence: int
    def __init__(self, sequence: _Optional[int] = ..., held_leases: _Optional[_Iterable[_Union[HeldLease, _Mapping]]] = ...) -> None: ...

class HeartbeatAck(_message.Message):
    __slots__ = ["database_unreachable", "remaining", "sequence"]
    DATABASE_UNREACHABLE_FIELD_NUMBER: _ClassVar[int]
    REMAINING_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    database_unreachable: bool
    remaining: _duration_pb2.Duration
    sequence: int
    def __init__(self, sequence: _Optional[int] = ..., remaining: _Optional[_Union[_duration_pb2.Duration, _Mapping]] = ..., database_unreachable: bool = ...) -> None: ...

class HeldLease(_message.Message):
    __slots__ = ["action_id", "epoch"]
    ACTION_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    action_id: str
    epoch: int
    def __init__(self, action_id: _Optional[str] = ..., epoch: _Optional[int] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ["accepts_batches", "agent_version", "capacity", "cluster", "held_leases", "instance_id", "labels", "stop_grants", "worker_id"]
    class LabelsEntry(_message.Message):
        __slots__ = ["key", "value"]
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ACCEPTS_BATCHES_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    HELD_LEASES_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    STOP_GRANTS_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    accepts_batches: bool
    agent_version: str
    capacity: int
    cluster: str
    held_leases: _containers.RepeatedCompositeFieldContainer[HeldLease]
    instance_id: str
    labels: _containers.ScalarMap[str, str]
    stop_grants: bool
    worker_id: str
    def __init__(self, worker_id: _Optional[str] = ..., cluster: _Optional[str] = ..., capacity: _Optional[int] = ..., labels: _Optional[_Mapping[str, str]] = ..., held_leases: _Optional[_Iterable[_Union[HeldLease, _Mapping]]] = ..., agent_version: _Optional[str] = ..., accepts_batches: bool = ..., instance_id: _Optional[str] = ..., stop_grants: bool = ...) -> None: ...

class ProgressReport(_message.Message):
    __slots__ = ["action_id", "checkpoint", "details", "epoch", "phase", "report_id"]
    ACTION_ID_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    REPORT_ID_FIELD_NUMBER: _ClassVar[int]
    action_id: str
    checkpoint: _struct_pb2.Struct
    details: _struct_pb2.Struct
    epoch: int
    phase: str
    report_id: int
    def __init__(self, report_id: _Optional[int] = ..., action_id: _Optional[str] = ..., epoch: _Optional[int] = ..., phase: _Optional[str] = ..., details: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., checkpoint: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class ReleaseReport(_message.Message):
    __slots__ = ["action_id", "epoch", "reason", "report_id", "self_fenced"]
    ACTION_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    REPORT_ID_FIELD_NUMBER: _ClassVar[int]
    SELF_FENCED_FIELD_NUMBER: _ClassVar[int]
    action_id: str
    epoch: int
    reason: str
    report_id: int
    self_fenced: bool
    def __init__(self, report_id: _Optional[int] = ..., action_id: _Optional[str] = ..., epoch: _Optional[int] = ..., reason: _Optional[str] = ..., self_fenced: bool = ...) -> None: ...

class ReportResult(_message.Message):
    __slots__ = ["accepted", "action_id", "epoch", "message", "reject_reason", "report_id"]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    ACTION_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    REJECT_REASON_FIELD_NUMBER: _ClassVar[int]
    REPORT_ID_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    action_id: str
    epoch: int
    message: str
    reject_reason: RejectReason
    report_id: int
    def __init__(self, report_id: _Optional[int] = ..., action_id: _Optional[str] = ..., epoch: _Optional[int] = ..., accepted: bool = ..., reject_reason: _Optional[_Union[RejectReason, str]] = ..., message: _Optional[str] = ...) -> None: ...

class Revoke(_message.Message):
    __slots__ = ["action_id", "epoch", "message", "reason"]
    ACTION_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    action_id: str
    epoch: int
    message: str
    reason: RevokeReason
    def __init__(self, action_id: _Optional[str] = ..., epoch: _Optional[int] = ..., reason: _Optional[_Union[RevokeReason, str]] = ..., message: _Optional[str] = ...) -> None: ...

class StopGrants(_message.Message):
    __slots__ = ["reason"]
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class Welcome(_message.Message):
    __slots__ = ["accepts_batches", "accepts_stop_grants", "grace_period", "heartbeat_interval", "resumed", "revoked", "server_id", "session_id", "session_resumed"]
    ACCEPTS_BATCHES_FIELD_NUMBER: _ClassVar[int]
    ACCEPTS_STOP_GRANTS_FIELD_NUMBER: _ClassVar[int]
    GRACE_PERIOD_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    RESUMED_FIELD_NUMBER: _ClassVar[int]
    REVOKED_FIELD_NUMBER: _ClassVar[int]
    SERVER_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_RESUMED_FIELD_NUMBER: _ClassVar[int]
    accepts_batches: bool
    accepts_stop_grants: bool
    grace_period: _duration_pb2.Duration
    heartbeat_interval: _duration_pb2.Duration
    resumed: _containers.RepeatedCompositeFieldContainer[HeldLease]
    revoked: _containers.RepeatedCompositeFieldContainer[HeldLease]
    server_id: str
    session_id: str
    session_resumed: bool
    def __init__(self, session_id: _Optional[str] = ..., heartbeat_interval: _Optional[_Union[_duration_pb2.Duration, _Mapping]] = ..., grace_period: _Optional[_Union[_duration_pb2.Duration, _Mapping]] = ..., resumed: _Optional[_Iterable[_Union[HeldLease, _Mapping]]] = ..., revoked: _Optional[_Iterable[_Union[HeldLease, _Mapping]]] = ..., session_resumed: bool = ..., server_id: _Optional[str] = ..., accepts_batches: bool = ..., accepts_stop_grants: bool = ...) -> None: ...

class RevokeReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = []

class RejectReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = []
