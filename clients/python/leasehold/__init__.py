"""Leasehold's Python client: an agent library and a small ActionService client.

The protobuf and gRPC modules generated from proto/ are ``leasehold.v1``
(e.g. ``from leasehold.v1 import action_pb2``); ``google.rpc`` holds the
error details. See clients/python/README.md.
"""

from leasehold.agent import ActionContext, ActionFailure, Agent, AgentEvent, Handler
from leasehold.client import TERMINAL_STATES, ActionClient
from leasehold.errors import FieldViolation, LeaseholdError, PreconditionViolation
from leasehold.structs import python_to_struct, struct_to_python

__all__ = [
    "TERMINAL_STATES",
    "ActionClient",
    "ActionContext",
    "ActionFailure",
    "Agent",
    "AgentEvent",
    "FieldViolation",
    "Handler",
    "LeaseholdError",
    "PreconditionViolation",
    "python_to_struct",
    "struct_to_python",
]
