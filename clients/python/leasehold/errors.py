"""LeaseholdError: a failed call's status with its machine-readable details decoded.

The server puts a google.rpc.Status in the ``grpc-status-details-bin``
trailer: an ErrorInfo whose ``reason`` is stable (for programs; the message is
for people), a BadRequest naming each invalid field, a PreconditionFailure for
a state that does not allow the call.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from google.rpc import error_details_pb2, status_pb2

_DETAILS_KEY = "grpc-status-details-bin"


@dataclass(frozen=True)
class FieldViolation:
    """One invalid field of a request (google.rpc.BadRequest.FieldViolation)."""

    field: str
    """The field's path, e.g. ``cluster`` or ``actions[3].payload``."""
    description: str


@dataclass(frozen=True)
class PreconditionViolation:
    """One failed precondition (google.rpc.PreconditionFailure.Violation)."""

    type: str
    """Kind of precondition, e.g. ``ACTION_STATE``."""
    subject: str
    description: str


class LeaseholdError(Exception):
    """A call that failed: its gRPC code, message and decoded details."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        reason: str | None = None,
        domain: str | None = None,
        metadata: dict[str, str] | None = None,
        field_violations: tuple[FieldViolation, ...] = (),
        precondition_violations: tuple[PreconditionViolation, ...] = (),
    ) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message
        self.reason = reason
        """google.rpc.ErrorInfo.reason, e.g. ``INVALID_ARGUMENT`` or ``ACTION_NOT_FOUND``."""
        self.domain = domain
        self.metadata = metadata or {}
        """google.rpc.ErrorInfo.metadata: extra facts, e.g. ``retry_after_ms``."""
        self.field_violations = field_violations
        self.precondition_violations = precondition_violations

    def __str__(self) -> str:
        reason = f" [{self.reason}]" if self.reason else ""
        return f"{self.code.name}{reason}: {self.message}"

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> LeaseholdError:
        """The error a failed call raised, with the details of its trailers decoded."""
        if not isinstance(error, grpc.Call):
            return cls(grpc.StatusCode.UNKNOWN, str(error))
        code = error.code() or grpc.StatusCode.UNKNOWN
        message = error.details() or ""
        trailers = error.trailing_metadata() or ()
        raw = next((value for key, value in trailers if key == _DETAILS_KEY), None)
        if not isinstance(raw, bytes):
            return cls(code, message)
        status = status_pb2.Status.FromString(raw)
        info = error_details_pb2.ErrorInfo()
        bad_request = error_details_pb2.BadRequest()
        precondition = error_details_pb2.PreconditionFailure()
        fields: list[FieldViolation] = []
        preconditions: list[PreconditionViolation] = []
        found_info = False
        for detail in status.details:
            if detail.Is(info.DESCRIPTOR):
                detail.Unpack(info)
                found_info = True
            elif detail.Is(bad_request.DESCRIPTOR):
                detail.Unpack(bad_request)
                fields += [FieldViolation(v.field, v.description) for v in bad_request.field_violations]
            elif detail.Is(precondition.DESCRIPTOR):
                detail.Unpack(precondition)
                preconditions += [
                    PreconditionViolation(v.type, v.subject, v.description) for v in precondition.violations
                ]
        return cls(
            code,
            status.message or message,
            reason=info.reason if found_info else None,
            domain=info.domain if found_info else None,
            metadata=dict(info.metadata),
            field_violations=tuple(fields),
            precondition_violations=tuple(preconditions),
        )
