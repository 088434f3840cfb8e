from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DEPLOYMENT_PHASE_FAILED: DeploymentPhase
DEPLOYMENT_PHASE_PENDING: DeploymentPhase
DEPLOYMENT_PHASE_READY: DeploymentPhase
DEPLOYMENT_PHASE_STARTING: DeploymentPhase
DEPLOYMENT_PHASE_STOPPED: DeploymentPhase
DEPLOYMENT_PHASE_STOPPING: DeploymentPhase
DEPLOYMENT_PHASE_UNSPECIFIED: DeploymentPhase
DESCRIPTOR: _descriptor.FileDescriptor
OWNERSHIP_LEASE: Ownership
OWNERSHIP_UNSPECIFIED: Ownership
OWNERSHIP_WORKSPACE: Ownership

class Command(_message.Message):
    __slots__ = ["argv", "cwd", "env"]
    class EnvEntry(_message.Message):
        __slots__ = ["key", "value"]
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ARGV_FIELD_NUMBER: _ClassVar[int]
    CWD_FIELD_NUMBER: _ClassVar[int]
    ENV_FIELD_NUMBER: _ClassVar[int]
    argv: _containers.RepeatedScalarFieldContainer[str]
    cwd: str
    env: _containers.ScalarMap[str, str]
    def __init__(self, argv: _Optional[_Iterable[str]] = ..., env: _Optional[_Mapping[str, str]] = ..., cwd: _Optional[str] = ...) -> None: ...

class ContainerSpec(_message.Message):
    __slots__ = ["command", "name"]
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    command: Command
    name: str
    def __init__(self, name: _Optional[str] = ..., command: _Optional[_Union[Command, _Mapping]] = ...) -> None: ...

class ContainerState(_message.Message):
    __slots__ = ["exit_code", "message", "name", "state"]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    exit_code: int
    message: str
    name: str
    state: str
    def __init__(self, name: _Optional[str] = ..., state: _Optional[str] = ..., exit_code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class CreateDeploymentRequest(_message.Message):
    __slots__ = ["lease_id", "request_id", "runtime", "spec"]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    request_id: str
    runtime: str
    spec: DeploymentSpec
    def __init__(self, lease_id: _Optional[str] = ..., spec: _Optional[_Union[DeploymentSpec, _Mapping]] = ..., runtime: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class CreateDeploymentResponse(_message.Message):
    __slots__ = ["resource"]
    RESOURCE_FIELD_NUMBER: _ClassVar[int]
    resource: Resource
    def __init__(self, resource: _Optional[_Union[Resource, _Mapping]] = ...) -> None: ...

class CreateFileRequest(_message.Message):
    __slots__ = ["content", "content_type", "lease_id", "name", "output_of", "request_id"]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    CONTENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_OF_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    content: bytes
    content_type: str
    lease_id: str
    name: str
    output_of: DeploymentRun
    request_id: str
    def __init__(self, lease_id: _Optional[str] = ..., name: _Optional[str] = ..., content: _Optional[bytes] = ..., content_type: _Optional[str] = ..., output_of: _Optional[_Union[DeploymentRun, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class CreateFileResponse(_message.Message):
    __slots__ = ["resource"]
    RESOURCE_FIELD_NUMBER: _ClassVar[int]
    resource: Resource
    def __init__(self, resource: _Optional[_Union[Resource, _Mapping]] = ...) -> None: ...

class CreateObjectRequest(_message.Message):
    __slots__ = ["body", "kind", "lease_id", "request_id"]
    BODY_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    body: _struct_pb2.Struct
    kind: str
    lease_id: str
    request_id: str
    def __init__(self, lease_id: _Optional[str] = ..., kind: _Optional[str] = ..., body: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class CreateObjectResponse(_message.Message):
    __slots__ = ["resource"]
    RESOURCE_FIELD_NUMBER: _ClassVar[int]
    resource: Resource
    def __init__(self, resource: _Optional[_Union[Resource, _Mapping]] = ...) -> None: ...

class DeleteResourceRequest(_message.Message):
    __slots__ = ["resource_id"]
    RESOURCE_ID_FIELD_NUMBER: _ClassVar[int]
    resource_id: str
    def __init__(self, resource_id: _Optional[str] = ...) -> None: ...

class DeleteResourceResponse(_message.Message):
    __slots__ = []
    def __init__(self) -> None: ...

class Deployment(_message.Message):
    __slots__ = ["action_id", "containers", "epoch", "id", "message", "output_file_ids", "phase", "spec"]
    ACTION_ID_FIELD_NUMBER: _ClassVar[int]
    CONTAINERS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FILE_IDS_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    action_id: str
    containers: _containers.RepeatedCompositeFieldContainer[ContainerState]
    epoch: int
    id: str
    message: str
    output_file_ids: _containers.RepeatedScalarFieldContainer[str]
    phase: DeploymentPhase
    spec: DeploymentSpec
    def __init__(self, id: _Optional[str] = ..., spec: _Optional[_Union[DeploymentSpec, _Mapping]] = ..., phase: _Optional[_Union[DeploymentPhase, str]] = ..., containers: _Optional[_Iterable[_Union[ContainerState, _Mapping]]] = ..., action_id: _Optional[str] = ..., message: _Optional[str] = ..., output_file_ids: _Optional[_Iterable[str]] = ..., epoch: _Optional[int] = ...) -> None: ...

class DeploymentRun(_message.Message):
    __slots__ = ["deployment_id", "epoch"]
    DEPLOYMENT_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    deployment_id: str
    epoch: int
    def __init__(self, deployment_id: _Optional[str] = ..., epoch: _Optional[int] = ...) -> None: ...

class DeploymentSpec(_message.Message):
    __slots__ = ["containers", "inputs", "outputs_dir", "readiness_probe"]
    CONTAINERS_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_DIR_FIELD_NUMBER: _ClassVar[int]
    READINESS_PROBE_FIELD_NUMBER: _ClassVar[int]
    containers: _containers.RepeatedCompositeFieldContainer[ContainerSpec]
    inputs: _containers.RepeatedCompositeFieldContainer[FileMount]
    outputs_dir: str
    readiness_probe: ReadinessProbe
    def __init__(self, containers: _Optional[_Iterable[_Union[ContainerSpec, _Mapping]]] = ..., readiness_probe: _Optional[_Union[ReadinessProbe, _Mapping]] = ..., outputs_dir: _Optional[str] = ..., inputs: _Optional[_Iterable[_Union[FileMount, _Mapping]]] = ...) -> None: ...

class DownloadFileRequest(_message.Message):
    __slots__ = ["resource_id"]
    RESOURCE_ID_FIELD_NUMBER: _ClassVar[int]
    resource_id: str
    def __init__(self, resource_id: _Optional[str] = ...) -> None: ...

class DownloadFileResponse(_message.Message):
    __slots__ = ["chunk"]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    chunk: bytes
    def __init__(self, chunk: _Optional[bytes] = ...) -> None: ...

class FileInfo(_message.Message):
    __slots__ = ["content_type", "name", "sha256", "size_bytes"]
    CONTENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    content_type: str
    name: str
    sha256: str
    size_bytes: int
    def __init__(self, name: _Optional[str] = ..., size_bytes: _Optional[int] = ..., sha256: _Optional[str] = ..., content_type: _Optional[str] = ...) -> None: ...

class FileMount(_message.Message):
    __slots__ = ["file_id", "path"]
    FILE_ID_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    file_id: str
    path: str
    def __init__(self, file_id: _Optional[str] = ..., path: _Optional[str] = ...) -> None: ...

class GetResourceRequest(_message.Message):
    __slots__ = ["resource_id"]
    RESOURCE_ID_FIELD_NUMBER: _ClassVar[int]
    resource_id: str
    def __init__(self, resource_id: _Optional[str] = ...) -> None: ...

class GetResourceResponse(_message.Message):
    __slots__ = ["resource"]
    RESOURCE_FIELD_NUMBER: _ClassVar[int]
    resource: Resource
    def __init__(self, resource: _Optional[_Union[Resource, _Mapping]] = ...) -> None: ...

class ListResourcesRequest(_message.Message):
    __slots__ = ["kind", "lease_id", "ownership", "page_size", "page_token"]
    KIND_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    OWNERSHIP_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    kind: str
    lease_id: str
    ownership: Ownership
    page_size: int
    page_token: str
    def __init__(self, lease_id: _Optional[str] = ..., kind: _Optional[str] = ..., ownership: _Optional[_Union[Ownership, str]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListResourcesResponse(_message.Message):
    __slots__ = ["next_page_token", "resources"]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_FIELD_NUMBER: _ClassVar[int]
    next_page_token: str
    resources: _containers.RepeatedCompositeFieldContainer[Resource]
    def __init__(self, resources: _Optional[_Iterable[_Union[Resource, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class ReadinessProbe(_message.Message):
    __slots__ = ["exec", "http_get", "period", "tcp_port", "timeout"]
    EXEC_FIELD_NUMBER: _ClassVar[int]
    HTTP_GET_FIELD_NUMBER: _ClassVar[int]
    PERIOD_FIELD_NUMBER: _ClassVar[int]
    TCP_PORT_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    exec: Command
    http_get: str
    period: _duration_pb2.Duration
    tcp_port: int
    timeout: _duration_pb2.Duration
    def __init__(self, exec: _Optional[_Union[Command, _Mapping]] = ..., tcp_port: _Optional[int] = ..., http_get: _Optional[str] = ..., period: _Optional[_Union[_duration_pb2.Duration, _Mapping]] = ..., timeout: _Optional[_Union[_duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class Resource(_message.Message):
    __slots__ = ["create_time", "deployment", "file", "id", "kind", "lease_id", "object", "ownership"]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    FILE_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    OBJECT_FIELD_NUMBER: _ClassVar[int]
    OWNERSHIP_FIELD_NUMBER: _ClassVar[int]
    create_time: _timestamp_pb2.Timestamp
    deployment: Deployment
    file: FileInfo
    id: str
    kind: str
    lease_id: str
    object: _struct_pb2.Struct
    ownership: Ownership
    def __init__(self, id: _Optional[str] = ..., kind: _Optional[str] = ..., ownership: _Optional[_Union[Ownership, str]] = ..., lease_id: _Optional[str] = ..., create_time: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., file: _Optional[_Union[FileInfo, _Mapping]] = ..., deployment: _Optional[_Union[Deployment, _Mapping]] = ..., object: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class Ownership(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = []

class DeploymentPhase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = []
