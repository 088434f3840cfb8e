"""Asking a server's grpc.health.v1 ``Health/Check``, without the grpcio-health-checking package.

That package (``grpc_health.v1``) is not part of Debian's python3-grpcio, and
this client depends on grpcio and protobuf only, so the method is called
generically. Its two messages have one field each, and are the same on the
wire as two well-known wrappers: HealthCheckRequest ``{string service = 1}``
is a ``StringValue``, and HealthCheckResponse ``{ServingStatus status = 1}``
(an enum is a varint, like an int32) is an ``Int32Value``.
"""

from __future__ import annotations

import grpc
from google.protobuf import wrappers_pb2

SERVING = 1
"""HealthCheckResponse.ServingStatus SERVING (0 is UNKNOWN, 2 NOT_SERVING, 3 SERVICE_UNKNOWN)."""

_CHECK = "/grpc.health.v1.Health/Check"


def check_health(channel: grpc.Channel, service: str, timeout: float) -> grpc.Future:
    """Starts a Check of ``service`` on ``channel``; the future's result is its ServingStatus number."""
    call = channel.unary_unary(
        _CHECK,
        request_serializer=wrappers_pb2.StringValue.SerializeToString,
        response_deserializer=lambda data: wrappers_pb2.Int32Value.FromString(data).value,
    )
    return call.future(wrappers_pb2.StringValue(value=service), timeout=timeout)


def answered_serving(check: grpc.Future) -> bool:
    """Waits for ``check`` (bounded by its deadline): whether it answered SERVING.

    An error, a deadline passed or a cancelled call count as not serving.
    """
    try:
        return check.result() == SERVING
    except (grpc.RpcError, grpc.FutureCancelledError):
        return False


def answered_in_time(check: grpc.Future) -> bool:
    """Waits for ``check`` (bounded by its deadline): whether the server answered before it.

    Whatever it answered: a server that is starting, or waits for its database,
    still answers (NOT_SERVING, or an error status); a hung one (a stopped
    process, a connection dead one way) does not. Only a deadline passed
    without an answer is no: a call cancelled, or a connection that failed,
    ends the stream on the same channel anyway.
    """
    try:
        check.result()
    except grpc.FutureCancelledError:
        return True
    except grpc.RpcError as error:
        return not (isinstance(error, grpc.Call) and error.code() == grpc.StatusCode.DEADLINE_EXCEEDED)
    return True
