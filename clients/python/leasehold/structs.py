"""google.protobuf.Struct to and from plain Python, and the server's limits on Struct payloads.

A Struct holds JSON: its numbers are doubles, so every number arrives as a
``float``. :func:`struct_to_python` turns each integral one back into an
``int`` (``3.0`` becomes ``3``), which is what a payload like ``{"n": 3}``
meant; a float that happens to be integral (``2.0``) becomes an int too, and
compares equal to it. Integers beyond 2**53 do not survive a Struct exactly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from google.protobuf import struct_pb2

# Limits of a Struct payload (see proto/leasehold/v1/worker.proto): levels of
# objects and lists (the payload itself is level 1), values and keys, and size
# as JSON. The size is counted as the server counts it: UTF-16 code units of
# keys and strings plus a few characters per value.
MAX_DEPTH = 32
MAX_NODES = 10_000
MAX_JSON_CHARS = 1024 * 1024

_NUL = "\u0000"
_REPLACEMENT = "\ufffd"


def struct_to_python(struct: struct_pb2.Struct) -> dict[str, Any]:
    """The Struct as a dict of plain Python values, integral numbers as ``int``."""
    return {key: _value_to_python(value) for key, value in struct.fields.items()}


def _value_to_python(value: struct_pb2.Value) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "number_value":
        number = value.number_value
        return int(number) if number.is_integer() else number
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        return struct_to_python(value.struct_value)
    if kind == "list_value":
        return [_value_to_python(item) for item in value.list_value.values]
    return None


def python_to_struct(value: Mapping[str, Any]) -> struct_pb2.Struct:
    """A Struct of a JSON-like mapping (dicts, lists, tuples, str, int, float, bool, None).

    Raises TypeError for any other value.
    """
    struct = struct_pb2.Struct()
    struct.update(_checked(value))
    return struct


def _checked(value: Any) -> Any:
    """``value`` unchanged, after checking that Struct.update() takes it as JSON."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"Struct keys must be strings, got {type(key).__name__}")
            _checked(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _checked(item)
    elif value is not None and not isinstance(value, (str, int, float)):
        raise TypeError(f"a Struct cannot hold a {type(value).__name__}")
    return value


def scrub_nul(value: Any) -> Any:
    """A copy of ``value`` with every NUL in its strings and keys replaced by U+FFFD.

    The server refuses NUL (PostgreSQL text cannot hold it); command output may contain it.
    """
    if isinstance(value, str):
        return value.replace(_NUL, _REPLACEMENT)
    if isinstance(value, Mapping):
        return {scrub_nul(key): scrub_nul(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [scrub_nul(item) for item in value]
    return value


def utf16_length(text: str) -> int:
    """The length of ``text`` as the server counts a payload's size as JSON (UTF-16 code units)."""
    return len(text.encode("utf-16-le")) // 2


def payload_violation(payload: Mapping[str, Any]) -> str | None:
    """Why the server would refuse ``payload`` as a Struct, or None when it fits.

    The server ends a Connect stream on a report that breaks these limits, and
    an agent sends unanswered reports again on every new stream: so reports
    are checked before they are sent.
    """
    counter = _PayloadCounter()
    return counter.walk(payload, 1)


class _PayloadCounter:
    """Walks a payload counting values, keys and JSON size like the server's validator."""

    def __init__(self) -> None:
        self.nodes = 0
        self.chars = 0

    def walk(self, value: Any, depth: int) -> str | None:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            return f"must have at most {MAX_NODES} values and keys"
        violation: str | None = None
        if isinstance(value, str):
            self.chars += utf16_length(value) + 2
            if _NUL in value:
                violation = "must not contain NUL (\\u0000) characters"
        elif isinstance(value, bool) or value is None:
            self.chars += 5 if isinstance(value, bool) else 4
        elif isinstance(value, (int, float)):
            self.chars += 8
            if isinstance(value, float) and not math.isfinite(value):
                violation = f"must be a finite number (got {value})"
        elif depth > MAX_DEPTH:
            return f"must be nested at most {MAX_DEPTH} levels deep"
        elif isinstance(value, Mapping):
            self.chars += 2
            for key, item in value.items():
                self.nodes += 1
                self.chars += utf16_length(key) + 3
                if _NUL in key:
                    return "keys must not contain NUL (\\u0000) characters"
                violation = self.walk(item, depth + 1)
                if violation is not None:
                    return violation
        else:
            self.chars += 2
            for item in value:
                violation = self.walk(item, depth + 1)
                if violation is not None:
                    return violation
        if violation is None and self.chars > MAX_JSON_CHARS:
            violation = f"must be at most {MAX_JSON_CHARS // (1024 * 1024)} MiB as JSON"
        return violation
