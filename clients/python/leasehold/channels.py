"""Opening a gRPC channel to a Leasehold server."""

from __future__ import annotations

import grpc

# Keepalive pings find a dead connection (a server host that vanished without
# a FIN) long before the lease's grace runs out; the server permits them.
_KEEPALIVE_OPTIONS = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
]


def open_channel(address: str, credentials: grpc.ChannelCredentials | None) -> grpc.Channel:
    """A channel to ``address`` (host:port): insecure without ``credentials``.

    For TLS pass ``grpc.ssl_channel_credentials(...)``; for a bearer token
    compose it with ``grpc.access_token_call_credentials(token)`` through
    ``grpc.composite_channel_credentials``.
    """
    if credentials is None:
        return grpc.insecure_channel(address, options=_KEEPALIVE_OPTIONS)
    return grpc.secure_channel(address, credentials, options=_KEEPALIVE_OPTIONS)
