from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from leasehold.v1 import event_pb2 as _event_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

ACTION_STATE_CANCELLED: ActionState
ACTION_STATE_FAILED: ActionState
ACTION_STATE_LEASED: ActionState
ACTION_STATE_QUEUED: ActionState
ACTION_STATE_SUCCEEDED: ActionState
ACTION_STATE_UNSPECIFIED: ActionState
ACTION_VIEW_BASIC: ActionView
ACTION_VIEW_FULL: ActionView
ACTION_VIEW_UNSPECIFIED: ActionView
ATTEMPT_OUTCOME_CANCELLED: AttemptOutcome
ATTEMPT_OUTCOME_FAILED: AttemptOutcome
ATTEMPT_OUTCOME_LEASE_EXPIRED: AttemptOutcome
ATTEMPT_OUTCOME_RELEASED: AttemptOutcome
ATTEMPT_OUTCOME_RUNNING: AttemptOutcome
ATTEMPT_OUTCOME_SUCCEEDED: AttemptOutcome
ATTEMPT_OUTCOME_UNSPECIFIED: AttemptOutcome
DESCRIPTOR: _descriptor.FileDescriptor

class Action(_message.Message):
    __slots__ = ["attempt_count", "cancel_requested", "cluster", "create_time", "created_by", "epoch", "failure_count", "failure_reason", "finish_time", "id", "label_selector", "last_error", "lease", "max_system_retries", "not_before", "output", "payload", "phase", "phase_details", "priority", "request_id", "retry_policy", "run_id", "state", "system_retry_count", "update_time"]
    class LabelSelectorEntry(_message.Message):
        __slots__ = ["key", "value"]
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ATTEMPT_COUNT_FIELD_NUMBER: _ClassVar[int]
    CANCEL_REQUESTED_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    CREATED_BY_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    FAILURE_COUNT_FIELD_NUMBER: _ClassVar[int]
    FAILURE_REASON_FIELD_NUMBER: _ClassVar[int]
    FINISH_TIME_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    LABEL_SELECTOR_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    LEASE_FIELD_NUMBER: _ClassVar[int]
    MAX_SYSTEM_RETRIES_FIELD_NUMBER: _ClassVar[int]
    NOT_BEFORE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    PHASE_DETAILS_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RETRY_POLICY_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SYSTEM_RETRY_COUNT_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    attempt_count: int
    cancel_requested: bool
    cluster: str
    create_time: _timestamp_pb2.Timestamp
    created_by: str
    epoch: int
    failure_count: int
    failure_reason: str
    finish_time: _timestamp_pb2.Timestamp
    id: str
    label_selector: _containers.ScalarMap[str, str]
    last_error: ActionError
    lease: ActionLease
    max_system_retries: int
    not_before: _timestamp_pb2.Timestamp
    output: _struct_pb2.Struct
    payload: _struct_pb2.Struct
    phase: str
    phase_details: _struct_pb2.Struct
    priority: int
    request_id: str
    retry_policy: RetryPolicy
    run_id: str
    state: ActionState
    system_retry_count: int
    update_time: _timestamp_pb2.Timestamp
    def __init__(self, id: _Optional[str] = ..., request_id: _Optional[str] = ..., run_id: _Optional[str] = ..., cluster: _Optional[str] = ..., label_selector: _Optional[_Mapping[str, str]] = ..., payload: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., priority: _Optional[int] = ..., retry_policy: _Optional[_Union[RetryPolicy, _Mapping]] = ..., max_system_retries: _Optional[int] = ..., state: _Optional[_Union[ActionState, str]] = ..., epoch: _Optional[int] = ..., attempt_count: _Optional[int] = ..., failure_count: _Optional[int] = ..., system_retry_count: _Optional[int] = ..., lease: _Optional[_Union[ActionLease, _Mapping]] = ..., cancel_requested: bool = ..., output: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., last_error: _Optional[_Union[ActionError, _Mapping]] = ..., failure_reason: _Optional[str] = ..., phase: _Optional[str] = ..., create_time: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., not_before: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., finish_time: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., created_by: _Optional[str] = ..., phase_details: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class ActionError(_message.Message):
    __slots__ = ["details", "message", "retryable"]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RETRYABLE_FIELD_NUMBER: _ClassVar[int]
    details: _struct_pb2.Struct
    message: str
    retryable: bool
    def __init__(self, message: _Optional[str] = ..., retryable: bool = ..., details: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class ActionLease(_message.Message):
    __slots__ = ["epoch", "grant_time", "session_id", "worker_id"]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    GRANT_TIME_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    grant_time: _timestamp_pb2.Timestamp
    session_id: str
    worker_id: str
    def __init__(self, worker_id: _Optional[str] = ..., session_id: _Optional[str] = ..., epoch: _Optional[int] = ..., grant_time: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class Attempt(_message.Message):
    __slots__ = ["action_id", "end_time", "epoch", "error", "outcome", "session_id", "start_time", "worker_id"]
    ACTION_ID_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    action_id: str
    end_time: _timestamp_pb2.Timestamp
    epoch: int
    error: ActionError
    outcome: AttemptOutcome
    session_id: str
    start_time: _timestamp_pb2.Timestamp
    worker_id: str
    def __init__(self, action_id: _Optional[str] = ..., epoch: _Optional[int] = ..., worker_id: _Optional[str] = ..., session_id: _Optional[str] = ..., outcome: _Optional[_Union[AttemptOutcome, str]] = ..., error: _Optional[_Union[ActionError, _Mapping]] = ..., start_time: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class CancelActionRequest(_message.Message):
    __slots__ = ["action_id", "reason"]
    ACTION_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    action_id: str
    reason: str
    def __init__(self, action_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class CancelActionResponse(_message.Message):
    __slots__ = ["action", "omitted"]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    OMITTED_FIELD_NUMBER: _ClassVar[int]
    action: Action
    omitted: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, action: _Optional[_Union[Action, _Mapping]] = ..., omitted: _Optional[_Iterable[str]] = ...) -> None: ...

class CancelActionsRequest(_message.Message):
    __slots__ = ["action_ids", "all", "cluster", "limit", "reason", "run_id", "state"]
    ACTION_IDS_FIELD_NUMBER: _ClassVar[int]
    ALL_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    action_ids: _containers.RepeatedScalarFieldContainer[str]
    all: bool
    cluster: str
    limit: int
    reason: str
    run_id: str
    state: ActionState
    def __init__(self, cluster: _Optional[str] = ..., run_id: _Optional[str] = ..., action_ids: _Optional[_Iterable[str]] = ..., state: _Optional[_Union[ActionState, str]] = ..., all: bool = ..., reason: _Optional[str] = ..., limit: _Optional[int] = ...) -> None: ...

class CancelActionsResponse(_message.Message):
    __slots__ = ["cancel_requested_ids", "cancelled_ids", "more"]
    CANCELLED_IDS_FIELD_NUMBER: _ClassVar[int]
    CANCEL_REQUESTED_IDS_FIELD_NUMBER: _ClassVar[int]
    MORE_FIELD_NUMBER: _ClassVar[int]
    cancel_requested_ids: _containers.RepeatedScalarFieldContainer[str]
    cancelled_ids: _containers.RepeatedScalarFieldContainer[str]
    more: bool
    def __init__(self, cancelled_ids: _Optional[_Iterable[str]] = ..., cancel_requested_ids: _Optional[_Iterable[str]] = ..., more: bool = ...) -> None: ...

class ExplainActionRequest(_message.Message):
    __slots__ = ["action_id"]
    ACTION_ID_FIELD_NUMBER: _ClassVar[int]
    action_id: str
    def __init__(self, action_id: _Optional[str] = ...) -> None: ...

class ExplainActionResponse(_message.Message):
    __slots__ = ["action", "attempts", "omitted", "timeline", "truncated"]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    OMITTED_FIELD_NUMBER: _ClassVar[int]
    TIMELINE_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    action: Action
    attempts: _containers.RepeatedCompositeFieldContainer[ExplainedAttempt]
    omitted: _containers.RepeatedScalarFieldContainer[str]
    timeline: _containers.RepeatedCompositeFieldContainer[TimelineStep]
    truncated: bool
    def __init__(self, action: _Optional[_Union[Action, _Mapping]] = ..., attempts: _Optional[_Iterable[_Union[ExplainedAttempt, _Mapping]]] = ..., timeline: _Optional[_Iterable[_Union[TimelineStep, _Mapping]]] = ..., truncated: bool = ..., omitted: _Optional[_Iterable[str]] = ...) -> None: ...

class ExplainedAttempt(_message.Message):
    __slots__ = ["attempt", "session_deadline", "session_end_reason", "session_end_time", "session_last_heard_time", "stream_lost_time"]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    SESSION_DEADLINE_FIELD_NUMBER: _ClassVar[int]
    SESSION_END_REASON_FIELD_NUMBER: _ClassVar[int]
    SESSION_END_TIME_FIELD_NUMBER: _ClassVar[int]
    SESSION_LAST_HEARD_TIME_FIELD_NUMBER: _ClassVar[int]
    STREAM_LOST_TIME_FIELD_NUMBER: _ClassVar[int]
    attempt: Attempt
    session_deadline: _timestamp_pb2.Timestamp
    session_end_reason: str
    session_end_time: _timestamp_pb2.Timestamp
    session_last_heard_time: _timestamp_pb2.Timestamp
    stream_lost_time: _timestamp_pb2.Timestamp
    def __init__(self, attempt: _Optional[_Union[Attempt, _Mapping]] = ..., session_last_heard_time: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., session_deadline: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., stream_lost_time: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., session_end_time: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., session_end_reason: _Optional[str] = ...) -> None: ...

class GetActionRequest(_message.Message):
    __slots__ = ["action_id"]
    ACTION_ID_FIELD_NUMBER: _ClassVar[int]
    action_id: str
    def __init__(self, action_id: _Optional[str] = ...) -> None: ...

class GetActionResponse(_message.Message):
    __slots__ = ["action", "attempts", "omitted"]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    OMITTED_FIELD_NUMBER: _ClassVar[int]
    action: Action
    attempts: _containers.RepeatedCompositeFieldContainer[Attempt]
    omitted: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, action: _Optional[_Union[Action, _Mapping]] = ..., attempts: _Optional[_Iterable[_Union[Attempt, _Mapping]]] = ..., omitted: _Optional[_Iterable[str]] = ...) -> None: ...

class ListActionsRequest(_message.Message):
    __slots__ = ["cluster", "page_size", "page_token", "run_id", "state", "worker_id"]
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    cluster: str
    page_size: int
    page_token: str
    run_id: str
    state: ActionState
    worker_id: str
    def __init__(self, state: _Optional[_Union[ActionState, str]] = ..., cluster: _Optional[str] = ..., run_id: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., worker_id: _Optional[str] = ...) -> None: ...

class ListActionsResponse(_message.Message):
    __slots__ = ["actions", "next_page_token", "omitted"]
    ACTIONS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    OMITTED_FIELD_NUMBER: _ClassVar[int]
    actions: _containers.RepeatedCompositeFieldContainer[Action]
    next_page_token: str
    omitted: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, actions: _Optional[_Iterable[_Union[Action, _Mapping]]] = ..., next_page_token: _Optional[str] = ..., omitted: _Optional[_Iterable[str]] = ...) -> None: ...

class RetryPolicy(_message.Message):
    __slots__ = ["backoff_multiplier", "initial_backoff", "max_attempts", "max_backoff"]
    BACKOFF_MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
    INITIAL_BACKOFF_FIELD_NUMBER: _ClassVar[int]
    MAX_ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    MAX_BACKOFF_FIELD_NUMBER: _ClassVar[int]
    backoff_multiplier: float
    initial_backoff: _duration_pb2.Duration
    max_attempts: int
    max_backoff: _duration_pb2.Duration
    def __init__(self, max_attempts: _Optional[int] = ..., initial_backoff: _Optional[_Union[_duration_pb2.Duration, _Mapping]] = ..., backoff_multiplier: _Optional[float] = ..., max_backoff: _Optional[_Union[_duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class SubmitActionRequest(_message.Message):
    __slots__ = ["cluster", "label_selector", "max_system_retries", "payload", "priority", "request_id", "retry_policy", "run_id"]
    class LabelSelectorEntry(_message.Message):
        __slots__ = ["key", "value"]
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    LABEL_SELECTOR_FIELD_NUMBER: _ClassVar[int]
    MAX_SYSTEM_RETRIES_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RETRY_POLICY_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    cluster: str
    label_selector: _containers.ScalarMap[str, str]
    max_system_retries: int
    payload: _struct_pb2.Struct
    priority: int
    request_id: str
    retry_policy: RetryPolicy
    run_id: str
    def __init__(self, request_id: _Optional[str] = ..., cluster: _Optional[str] = ..., run_id: _Optional[str] = ..., label_selector: _Optional[_Mapping[str, str]] = ..., payload: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., priority: _Optional[int] = ..., retry_policy: _Optional[_Union[RetryPolicy, _Mapping]] = ..., max_system_retries: _Optional[int] = ...) -> None: ...

class SubmitActionResponse(_message.Message):
    __slots__ = ["action", "created"]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    action: Action
    created: bool
    def __init__(self, action: _Optional[_Union[Action, _Mapping]] = ..., created: bool = ...) -> None: ...

class SubmitActionsRequest(_message.Message):
    __slots__ = ["actions", "view"]
    ACTIONS_FIELD_NUMBER: _ClassVar[int]
    VIEW_FIELD_NUMBER: _ClassVar[int]
    actions: _containers.RepeatedCompositeFieldContainer[SubmitActionRequest]
    view: ActionView
    def __init__(self, actions: _Optional[_Iterable[_Union[SubmitActionRequest, _Mapping]]] = ..., view: _Optional[_Union[ActionView, str]] = ...) -> None: ...

class SubmitActionsResponse(_message.Message):
    __slots__ = ["results"]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[SubmitActionResponse]
    def __init__(self, results: _Optional[_Iterable[_Union[SubmitActionResponse, _Mapping]]] = ...) -> None: ...

class TimelineStep(_message.Message):
    __slots__ = ["epoch", "event", "summary", "time"]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    event: _event_pb2.Event
    summary: str
    time: _timestamp_pb2.Timestamp
    def __init__(self, time: _Optional[_Union[_timestamp_pb2.Timestamp, _Mapping]] = ..., epoch: _Optional[int] = ..., summary: _Optional[str] = ..., event: _Optional[_Union[_event_pb2.Event, _Mapping]] = ...) -> None: ...

class WatchActionRequest(_message.Message):
    __slots__ = ["action_id"]
    ACTION_ID_FIELD_NUMBER: _ClassVar[int]
    action_id: str
    def __init__(self, action_id: _Optional[str] = ...) -> None: ...

class WatchActionResponse(_message.Message):
    __slots__ = ["action", "omitted"]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    OMITTED_FIELD_NUMBER: _ClassVar[int]
    action: Action
    omitted: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, action: _Optional[_Union[Action, _Mapping]] = ..., omitted: _Optional[_Iterable[str]] = ...) -> None: ...

class ActionState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = []

class AttemptOutcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = []

class ActionView(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = []
