from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor
EVENT_KIND_ACTION_CANCELLED: EventKind
EVENT_KIND_ACTION_CANCEL_REQUESTED: EventKind
EVENT_KIND_ACTION_FAILED: EventKind
EVENT_KIND_ACTION_RETRY_SCHEDULED: EventKind
EVENT_KIND_ACTION_SUBMITTED: EventKind
EVENT_KIND_ACTION_SUCCEEDED: EventKind
EVENT_KIND_CLUSTER_EXPIRIES_RESUMED: EventKind
EVENT_KIND_CLUSTER_HEALTH_CHANGED: EventKind
EVENT_KIND_CLUSTER_PARTITIONED: EventKind
EVENT_KIND_CLUSTER_RECOVERED: EventKind
EVENT_KIND_DATABASE_RESTORED: EventKind
EVENT_KIND_DATABASE_UNREACHABLE: EventKind
EVENT_KIND_DEPLOYMENT_CREATED: EventKind
EVENT_KIND_EPOCH_REGRESSION: EventKind
EVENT_KIND_LEASE_EXPIRED: EventKind
EVENT_KIND_LEASE_GRANTED: EventKind
EVENT_KIND_LEASE_RELEASED: EventKind
EVENT_KIND_LEASE_RESUMED: EventKind
EVENT_KIND_LEASE_REVOKED: EventKind
EVENT_KIND_OUTPUTS_REQUESTED: EventKind
EVENT_KIND_REPORT_FENCED: EventKind
EVENT_KIND_RESOURCE_CREATED: EventKind
EVENT_KIND_RESOURCE_DELETED: EventKind
EVENT_KIND_RESOURCE_PROMOTED: EventKind
EVENT_KIND_SCOPE_LEASE_COMMITTED: EventKind
EVENT_KIND_SCOPE_LEASE_CREATED: EventKind
EVENT_KIND_SCOPE_LEASE_DELETED: EventKind
EVENT_KIND_SCOPE_LEASE_RENEWED: EventKind
EVENT_KIND_SCOPE_LEASE_RESULT_SET: EventKind
EVENT_KIND_SCOPE_LEASE_ROLLED_BACK: EventKind
EVENT_KIND_SESSION_CLOSED: EventKind
EVENT_KIND_SESSION_REAPED: EventKind
EVENT_KIND_SESSION_RESUMED: EventKind
EVENT_KIND_SESSION_STARTED: EventKind
EVENT_KIND_SESSION_TAKEN_OVER: EventKind
EVENT_KIND_STREAM_LOST: EventKind
EVENT_KIND_UNSPECIFIED: EventKind
EVENT_KIND_WORKER_DRAINING: EventKind
EVENT_KIND_WORKER_FORGOTTEN: EventKind
EVENT_KIND_WORKER_UNDRAINED: EventKind

class Event(_message.Message):
    __slots__ = ["action_id", "actor", "cluster", "details", "epoch", "kind", "lease_id", "message", "sequence", "session_id", "time", "worker_id"]
    ACTION_ID_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    action_id: str
    actor: str
    cluster: str
    details: _struct_pb2.Struct
    epoch: int
    kind: EventKind
    lease_id: str
    message: str
    sequence: int
    session_id: str
    time: _timestamp_pb2.Timestamp
    worker_id: str
    def __init__(self, sequence: _Optional[int] = ..., kind: _Optional[_Union[EventKind, str]] = ..., time: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., action_id: _Optional[str] = ..., worker_id: _Optional[str] = ..., cluster: _Optional[str] = ..., session_id: _Optional[str] = ..., epoch: _Optional[int] = ..., lease_id: _Optional[str] = ..., message: _Optional[str] = ..., details: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., actor: _Optional[str] = ...) -> None: ...

class ListEventsRequest(_message.Message):
    __slots__ = ["action_id", "cluster", "kind", "lease_id", "newest_first", "page_size", "page_token", "worker_id"]
    ACTION_ID_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    NEWEST_FIRST_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    action_id: str
    cluster: str
    kind: EventKind
    lease_id: str
    newest_first: bool
    page_size: int
    page_token: str
    worker_id: str
    def __init__(self, action_id: _Optional[str] = ..., worker_id: _Optional[str] = ..., cluster: _Optional[str] = ..., kind: _Optional[_Union[EventKind, str]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., newest_first: bool = ..., lease_id: _Optional[str] = ...) -> None: ...

class ListEventsResponse(_message.Message):
    __slots__ = ["events", "next_page_token"]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[Event]
    next_page_token: str
    def __init__(self, events: _Optional[_Iterable[_Union[Event, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class WatchEventsRequest(_message.Message):
    __slots__ = ["action_id", "after_sequence", "cluster", "kind", "lease_id", "worker_id"]
    ACTION_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    action_id: str
    after_sequence: int
    cluster: str
    kind: EventKind
    lease_id: str
    worker_id: str
    def __init__(self, action_id: _Optional[str] = ..., worker_id: _Optional[str] = ..., cluster: _Optional[str] = ..., kind: _Optional[_Union[EventKind, str]] = ..., after_sequence: _Optional[int] = ..., lease_id: _Optional[str] = ...) -> None: ...

class WatchEventsResponse(_message.Message):
    __slots__ = ["event"]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    event: Event
    def __init__(self, event: _Optional[_Union[Event, _Mapping]] = ...) -> None: ...

class EventKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = []
