from google.protobuf import timestamp_pb2 as _timestamp_pb2
from leasehold.v1 import worker_pb2 as _worker_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

CLUSTER_HEALTH_DEGRADED: ClusterHealth
CLUSTER_HEALTH_HEALTHY: ClusterHealth
CLUSTER_HEALTH_PARTITIONED: ClusterHealth
CLUSTER_HEALTH_UNHEALTHY: ClusterHealth
CLUSTER_HEALTH_UNSPECIFIED: ClusterHealth
DESCRIPTOR: _descriptor.FileDescriptor
WORKER_STATE_CONNECTED: WorkerState
WORKER_STATE_IN_GRACE: WorkerState
WORKER_STATE_OFFLINE: WorkerState
WORKER_STATE_UNSPECIFIED: WorkerState

class Cluster(_message.Message):
    __slots__ = ["connected_workers", "expiries_paused", "health", "health_reason", "leased_actions", "name", "partitioned_time", "queued_actions", "recent_expiries", "workers_in_grace"]
    CONNECTED_WORKERS_FIELD_NUMBER: _ClassVar[int]
    EXPIRIES_PAUSED_FIELD_NUMBER: _ClassVar[int]
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    HEALTH_REASON_FIELD_NUMBER: _ClassVar[int]
    LEASED_ACTIONS_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    PARTITIONED_TIME_FIELD_NUMBER: _ClassVar[int]
    QUEUED_ACTIONS_FIELD_NUMBER: _ClassVar[int]
    RECENT_EXPIRIES_FIELD_NUMBER: _ClassVar[int]
    WORKERS_IN_GRACE_FIELD_NUMBER: _ClassVar[int]
    connected_workers: int
    expiries_paused: bool
    health: ClusterHealth
    health_reason: str
    leased_actions: int
    name: str
    partitioned_time: _timestamp_pb2.Timestamp
    queued_actions: int
    recent_expiries: int
    workers_in_grace: int
    def __init__(self, name: _Optional[str] = ..., health: _Optional[_Union[ClusterHealth, str]] = ..., health_reason: _Optional[str] = ..., connected_workers: _Optional[int] = ..., workers_in_grace: _Optional[int] = ..., queued_actions: _Optional[int] = ..., leased_actions: _Optional[int] = ..., recent_expiries: _Optional[int] = ..., partitioned_time: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., expiries_paused: bool = ...) -> None: ...

class DrainWorkerRequest(_message.Message):
    __slots__ = ["reason", "worker_id"]
    REASON_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    reason: str
    worker_id: str
    def __init__(self, worker_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class DrainWorkerResponse(_message.Message):
    __slots__ = ["worker"]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    worker: Worker
    def __init__(self, worker: _Optional[_Union[Worker, _Mapping]] = ...) -> None: ...

class ForgetWorkerRequest(_message.Message):
    __slots__ = ["reason", "worker_id"]
    REASON_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    reason: str
    worker_id: str
    def __init__(self, worker_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ForgetWorkerResponse(_message.Message):
    __slots__ = ["worker"]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    worker: Worker
    def __init__(self, worker: _Optional[_Union[Worker, _Mapping]] = ...) -> None: ...

class GetWorkerRequest(_message.Message):
    __slots__ = ["worker_id"]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    def __init__(self, worker_id: _Optional[str] = ...) -> None: ...

class GetWorkerResponse(_message.Message):
    __slots__ = ["worker"]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    worker: Worker
    def __init__(self, worker: _Optional[_Union[Worker, _Mapping]] = ...) -> None: ...

class ListClustersRequest(_message.Message):
    __slots__ = []
    def __init__(self) -> None: ...

class ListClustersResponse(_message.Message):
    __slots__ = ["clusters"]
    CLUSTERS_FIELD_NUMBER: _ClassVar[int]
    clusters: _containers.RepeatedCompositeFieldContainer[Cluster]
    def __init__(self, clusters: _Optional[_Iterable[_Union[Cluster, _Mapping]]] = ...) -> None: ...

class ListWorkersRequest(_message.Message):
    __slots__ = ["cluster", "page_size", "page_token", "state"]
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    cluster: str
    page_size: int
    page_token: str
    state: WorkerState
    def __init__(self, cluster: _Optional[str] = ..., state: _Optional[_Union[WorkerState, str]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListWorkersResponse(_message.Message):
    __slots__ = ["next_page_token", "workers"]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    next_page_token: str
    workers: _containers.RepeatedCompositeFieldContainer[Worker]
    def __init__(self, workers: _Optional[_Iterable[_Union[Worker, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class ResumeExpiriesRequest(_message.Message):
    __slots__ = ["cluster", "reason"]
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    cluster: str
    reason: str
    def __init__(self, cluster: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ResumeExpiriesResponse(_message.Message):
    __slots__ = ["cluster"]
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    cluster: Cluster
    def __init__(self, cluster: _Optional[_Union[Cluster, _Mapping]] = ...) -> None: ...

class UndrainWorkerRequest(_message.Message):
    __slots__ = ["reason", "worker_id"]
    REASON_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    reason: str
    worker_id: str
    def __init__(self, worker_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class UndrainWorkerResponse(_message.Message):
    __slots__ = ["drain_ended", "worker"]
    DRAIN_ENDED_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    drain_ended: bool
    worker: Worker
    def __init__(self, worker: _Optional[_Union[Worker, _Mapping]] = ..., drain_ended: bool = ...) -> None: ...

class Worker(_message.Message):
    __slots__ = ["agent_version", "capacity", "cluster", "draining", "held_leases", "labels", "last_seen_time", "session", "state", "worker_id"]
    class LabelsEntry(_message.Message):
        __slots__ = ["key", "value"]
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    HELD_LEASES_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_TIME_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    agent_version: str
    capacity: int
    cluster: str
    draining: bool
    held_leases: _containers.RepeatedCompositeFieldContainer[_worker_pb2.HeldLease]
    labels: _containers.ScalarMap[str, str]
    last_seen_time: _timestamp_pb2.Timestamp
    session: WorkerSession
    state: WorkerState
    worker_id: str
    def __init__(self, worker_id: _Optional[str] = ..., cluster: _Optional[str] = ..., capacity: _Optional[int] = ..., labels: _Optional[_Mapping[str, str]] = ..., state: _Optional[_Union[WorkerState, str]] = ..., session: _Optional[_Union[WorkerSession, _Mapping]] = ..., held_leases: _Optional[_Iterable[_Union[_worker_pb2.HeldLease, _Mapping]]] = ..., draining: bool = ..., last_seen_time: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., agent_version: _Optional[str] = ...) -> None: ...

class WorkerSession(_message.Message):
    __slots__ = ["deadline", "server_id", "session_id", "start_time", "stream_lost_time"]
    DEADLINE_FIELD_NUMBER: _ClassVar[int]
    SERVER_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    STREAM_LOST_TIME_FIELD_NUMBER: _ClassVar[int]
    deadline: _timestamp_pb2.Timestamp
    server_id: str
    session_id: str
    start_time: _timestamp_pb2.Timestamp
    stream_lost_time: _timestamp_pb2.Timestamp
    def __init__(self, session_id: _Optional[str] = ..., start_time: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., deadline: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., stream_lost_time: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., server_id: _Optional[str] = ...) -> None: ...

class ClusterHealth(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = []

class WorkerState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = []
