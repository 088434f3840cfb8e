from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from leasehold.v1 import event_pb2 as _event_pb2
from leasehold.v1 import resource_pb2 as _resource_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

CLOSE_REASON_COMMITTED: CloseReason
CLOSE_REASON_EXPIRED: CloseReason
CLOSE_REASON_ROLLED_BACK: CloseReason
CLOSE_REASON_UNSPECIFIED: CloseReason
DESCRIPTOR: _descriptor.FileDescriptor
LEASE_STATE_COMMITTED: LeaseState
LEASE_STATE_OPEN: LeaseState
LEASE_STATE_ROLLED_BACK: LeaseState
LEASE_STATE_UNSPECIFIED: LeaseState

class CollectOutputsRequest(_message.Message):
    __slots__ = ["lease_id", "timeout"]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    timeout: _duration_pb2.Duration
    def __init__(self, lease_id: _Optional[str] = ..., timeout: _Optional[_Union[_duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class CollectOutputsResponse(_message.Message):
    __slots__ = ["file_ids", "skipped"]
    FILE_IDS_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    file_ids: _containers.RepeatedScalarFieldContainer[str]
    skipped: _containers.RepeatedCompositeFieldContainer[SkippedOutput]
    def __init__(self, file_ids: _Optional[_Iterable[str]] = ..., skipped: _Optional[_Iterable[_Union[SkippedOutput, _Mapping]]] = ...) -> None: ...

class CommitLeaseRequest(_message.Message):
    __slots__ = ["lease_id"]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    def __init__(self, lease_id: _Optional[str] = ...) -> None: ...

class CommitLeaseResponse(_message.Message):
    __slots__ = ["kept_resources", "lease"]
    KEPT_RESOURCES_FIELD_NUMBER: _ClassVar[int]
    LEASE_FIELD_NUMBER: _ClassVar[int]
    kept_resources: int
    lease: Lease
    def __init__(self, lease: _Optional[_Union[Lease, _Mapping]] = ..., kept_resources: _Optional[int] = ...) -> None: ...

class CreateLeaseRequest(_message.Message):
    __slots__ = ["label", "request_id", "runtime", "ttl"]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    label: str
    request_id: str
    runtime: str
    ttl: _duration_pb2.Duration
    def __init__(self, runtime: _Optional[str] = ..., ttl: _Optional[_Union[_duration_pb2.Duration, _Mapping]] = ..., label: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class CreateLeaseResponse(_message.Message):
    __slots__ = ["lease"]
    LEASE_FIELD_NUMBER: _ClassVar[int]
    lease: Lease
    def __init__(self, lease: _Optional[_Union[Lease, _Mapping]] = ...) -> None: ...

class DebugLeaseRequest(_message.Message):
    __slots__ = ["event_limit", "lease_id"]
    EVENT_LIMIT_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    event_limit: int
    lease_id: str
    def __init__(self, lease_id: _Optional[str] = ..., event_limit: _Optional[int] = ...) -> None: ...

class DebugLeaseResponse(_message.Message):
    __slots__ = ["deployments", "events", "lease", "omitted_deployments", "omitted_events", "omitted_resource_bodies", "omitted_resources", "resources"]
    DEPLOYMENTS_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    LEASE_FIELD_NUMBER: _ClassVar[int]
    OMITTED_DEPLOYMENTS_FIELD_NUMBER: _ClassVar[int]
    OMITTED_EVENTS_FIELD_NUMBER: _ClassVar[int]
    OMITTED_RESOURCES_FIELD_NUMBER: _ClassVar[int]
    OMITTED_RESOURCE_BODIES_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_FIELD_NUMBER: _ClassVar[int]
    deployments: _containers.RepeatedCompositeFieldContainer[_resource_pb2.Deployment]
    events: _containers.RepeatedCompositeFieldContainer[_event_pb2.Event]
    lease: Lease
    omitted_deployments: int
    omitted_events: int
    omitted_resource_bodies: int
    omitted_resources: int
    resources: _containers.RepeatedCompositeFieldContainer[_resource_pb2.Resource]
    def __init__(self, lease: _Optional[_Union[Lease, _Mapping]] = ..., resources: _Optional[_Iterable[_Union[_resource_pb2.Resource, _Mapping]]] = ..., deployments: _Optional[_Iterable[_Union[_resource_pb2.Deployment, _Mapping]]] = ..., events: _Optional[_Iterable[_Union[_event_pb2.Event, _Mapping]]] = ..., omitted_deployments: _Optional[int] = ..., omitted_events: _Optional[int] = ..., omitted_resource_bodies: _Optional[int] = ..., omitted_resources: _Optional[int] = ...) -> None: ...

class DeleteLeaseRequest(_message.Message):
    __slots__ = ["lease_id"]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    def __init__(self, lease_id: _Optional[str] = ...) -> None: ...

class DeleteLeaseResponse(_message.Message):
    __slots__ = []
    def __init__(self) -> None: ...

class DeleteLeasesRequest(_message.Message):
    __slots__ = ["all", "closed_before", "label", "runtime"]
    ALL_FIELD_NUMBER: _ClassVar[int]
    CLOSED_BEFORE_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_FIELD_NUMBER: _ClassVar[int]
    all: bool
    closed_before: _timestamp_pb2.Timestamp
    label: str
    runtime: str
    def __init__(self, label: _Optional[str] = ..., closed_before: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., runtime: _Optional[str] = ..., all: bool = ...) -> None: ...

class DeleteLeasesResponse(_message.Message):
    __slots__ = ["deleted", "skipped_open", "skipped_running"]
    DELETED_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_OPEN_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_RUNNING_FIELD_NUMBER: _ClassVar[int]
    deleted: int
    skipped_open: int
    skipped_running: int
    def __init__(self, deleted: _Optional[int] = ..., skipped_open: _Optional[int] = ..., skipped_running: _Optional[int] = ...) -> None: ...

class GetLeaseRequest(_message.Message):
    __slots__ = ["lease_id"]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    def __init__(self, lease_id: _Optional[str] = ...) -> None: ...

class GetLeaseResponse(_message.Message):
    __slots__ = ["lease"]
    LEASE_FIELD_NUMBER: _ClassVar[int]
    lease: Lease
    def __init__(self, lease: _Optional[_Union[Lease, _Mapping]] = ...) -> None: ...

class Lease(_message.Message):
    __slots__ = ["close_reason", "close_time", "create_time", "created_by", "expire_time", "id", "label", "owned_resources", "result", "runtime", "state", "ttl"]
    CLOSE_REASON_FIELD_NUMBER: _ClassVar[int]
    CLOSE_TIME_FIELD_NUMBER: _ClassVar[int]
    CREATED_BY_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    OWNED_RESOURCES_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    close_reason: CloseReason
    close_time: _timestamp_pb2.Timestamp
    create_time: _timestamp_pb2.Timestamp
    created_by: str
    expire_time: _timestamp_pb2.Timestamp
    id: str
    label: str
    owned_resources: int
    result: _struct_pb2.Struct
    runtime: str
    state: LeaseState
    ttl: _duration_pb2.Duration
    def __init__(self, id: _Optional[str] = ..., runtime: _Optional[str] = ..., label: _Optional[str] = ..., state: _Optional[_Union[LeaseState, str]] = ..., close_reason: _Optional[_Union[CloseReason, str]] = ..., ttl: _Optional[_Union[_duration_pb2.Duration, _Mapping]] = ..., create_time: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., expire_time: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., close_time: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., result: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., owned_resources: _Optional[int] = ..., created_by: _Optional[str] = ...) -> None: ...

class ListLeasesRequest(_message.Message):
    __slots__ = ["label", "page_size", "page_token", "runtime", "state"]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    label: str
    page_size: int
    page_token: str
    runtime: str
    state: LeaseState
    def __init__(self, state: _Optional[_Union[LeaseState, str]] = ..., label: _Optional[str] = ..., runtime: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListLeasesResponse(_message.Message):
    __slots__ = ["leases", "next_page_token"]
    LEASES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    leases: _containers.RepeatedCompositeFieldContainer[Lease]
    next_page_token: str
    def __init__(self, leases: _Optional[_Iterable[_Union[Lease, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class PromoteResourceRequest(_message.Message):
    __slots__ = ["kind", "lease_id", "resource_id"]
    KIND_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_ID_FIELD_NUMBER: _ClassVar[int]
    kind: str
    lease_id: str
    resource_id: str
    def __init__(self, lease_id: _Optional[str] = ..., kind: _Optional[str] = ..., resource_id: _Optional[str] = ...) -> None: ...

class PromoteResourceResponse(_message.Message):
    __slots__ = ["resource"]
    RESOURCE_FIELD_NUMBER: _ClassVar[int]
    resource: _resource_pb2.Resource
    def __init__(self, resource: _Optional[_Union[_resource_pb2.Resource, _Mapping]] = ...) -> None: ...

class RenewLeaseRequest(_message.Message):
    __slots__ = ["lease_id", "ttl"]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    ttl: _duration_pb2.Duration
    def __init__(self, lease_id: _Optional[str] = ..., ttl: _Optional[_Union[_duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class RenewLeaseResponse(_message.Message):
    __slots__ = ["lease"]
    LEASE_FIELD_NUMBER: _ClassVar[int]
    lease: Lease
    def __init__(self, lease: _Optional[_Union[Lease, _Mapping]] = ...) -> None: ...

class RollbackLeaseRequest(_message.Message):
    __slots__ = ["lease_id"]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    def __init__(self, lease_id: _Optional[str] = ...) -> None: ...

class RollbackLeaseResponse(_message.Message):
    __slots__ = ["destroyed_resources", "lease"]
    DESTROYED_RESOURCES_FIELD_NUMBER: _ClassVar[int]
    LEASE_FIELD_NUMBER: _ClassVar[int]
    destroyed_resources: int
    lease: Lease
    def __init__(self, lease: _Optional[_Union[Lease, _Mapping]] = ..., destroyed_resources: _Optional[int] = ...) -> None: ...

class SetResultRequest(_message.Message):
    __slots__ = ["lease_id", "result"]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    result: _struct_pb2.Struct
    def __init__(self, lease_id: _Optional[str] = ..., result: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class SetResultResponse(_message.Message):
    __slots__ = ["lease"]
    LEASE_FIELD_NUMBER: _ClassVar[int]
    lease: Lease
    def __init__(self, lease: _Optional[_Union[Lease, _Mapping]] = ...) -> None: ...

class SkippedOutput(_message.Message):
    __slots__ = ["path", "reason", "size_bytes"]
    PATH_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    path: str
    reason: str
    size_bytes: int
    def __init__(self, path: _Optional[str] = ..., size_bytes: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class WaitLeaseRequest(_message.Message):
    __slots__ = ["lease_id", "timeout"]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    timeout: _duration_pb2.Duration
    def __init__(self, lease_id: _Optional[str] = ..., timeout: _Optional[_Union[_duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class WaitLeaseResponse(_message.Message):
    __slots__ = ["deployment", "done", "timed_out"]
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    TIMED_OUT_FIELD_NUMBER: _ClassVar[int]
    deployment: _resource_pb2.Deployment
    done: bool
    timed_out: bool
    def __init__(self, deployment: _Optional[_Union[_resource_pb2.Deployment, _Mapping]] = ..., done: bool = ..., timed_out: bool = ...) -> None: ...

class LeaseState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = []

class CloseReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = []
