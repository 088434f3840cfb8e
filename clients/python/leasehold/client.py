"""ActionClient: submit actions and follow them (ActionService), with errors decoded."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import grpc

from leasehold.channels import open_channel
from leasehold.errors import LeaseholdError
from leasehold.structs import python_to_struct
from leasehold.v1 import action_pb2, action_pb2_grpc

TERMINAL_STATES = frozenset(
    {action_pb2.ACTION_STATE_SUCCEEDED, action_pb2.ACTION_STATE_FAILED, action_pb2.ACTION_STATE_CANCELLED}
)


class ActionClient:
    """A small client of ActionService; every failed call raises :class:`LeaseholdError`.

    Read payloads and outputs with :func:`leasehold.struct_to_python`. Use as a
    context manager or call :meth:`close`.
    """

    def __init__(
        self, address: str, *, credentials: grpc.ChannelCredentials | None = None, timeout: float = 30.0
    ) -> None:
        """A client of the server at ``address`` (host:port); ``timeout`` bounds each unary call, in seconds."""
        self._channel = open_channel(address, credentials)
        self._stub = action_pb2_grpc.ActionServiceStub(self._channel)
        self._timeout = timeout

    def __enter__(self) -> ActionClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        """Closes the channel."""
        self._channel.close()

    def submit(
        self,
        cluster: str,
        payload: Mapping[str, Any] | None = None,
        *,
        request_id: str = "",
        labels: Mapping[str, str] | None = None,
        run_id: str = "",
        priority: int = 0,
    ) -> action_pb2.Action:
        """Queues an action for ``cluster``; a retried ``request_id`` returns the first call's action."""
        request = action_pb2.SubmitActionRequest(
            request_id=request_id,
            cluster=cluster,
            run_id=run_id,
            label_selector=dict(labels or {}),
            priority=priority,
        )
        if payload is not None:
            request.payload.CopyFrom(python_to_struct(payload))
        try:
            response: action_pb2.SubmitActionResponse = self._stub.SubmitAction(request, timeout=self._timeout)
        except grpc.RpcError as error:
            raise LeaseholdError.from_rpc_error(error) from None
        return response.action

    def get(self, action_id: str) -> action_pb2.GetActionResponse:
        """The action with its attempts (``.action``, ``.attempts``)."""
        try:
            response: action_pb2.GetActionResponse = self._stub.GetAction(
                action_pb2.GetActionRequest(action_id=action_id), timeout=self._timeout
            )
        except grpc.RpcError as error:
            raise LeaseholdError.from_rpc_error(error) from None
        return response

    def watch(self, action_id: str) -> Iterator[action_pb2.Action]:
        """The action now, then after every change; ends once it reached a terminal state."""
        try:
            for message in self._stub.WatchAction(action_pb2.WatchActionRequest(action_id=action_id)):
                yield message.action
        except grpc.RpcError as error:
            raise LeaseholdError.from_rpc_error(error) from None

    def wait(self, action_id: str) -> action_pb2.Action:
        """The action once it reached a terminal state (SUCCEEDED, FAILED or CANCELLED)."""
        last: action_pb2.Action | None = None
        for last in self.watch(action_id):
            if last.state in TERMINAL_STATES:
                return last
        raise LeaseholdError(grpc.StatusCode.UNAVAILABLE, f"the watch of action {action_id} ended early")
