"""How long an agent waits before opening a new Connect stream (see WorkerService.Connect)."""

from __future__ import annotations

import random
from collections.abc import Callable

BACKOFF_CAP_BEFORE_WELCOME = 1.0
"""Largest reconnect delay, in seconds, before a welcome told the grace period.

An agent that was never welcomed holds no lease, so this only paces the wait
for a server that is not up yet.
"""

REFUSED_BACKOFF_CAP = 30.0
"""Longest wait, in seconds, between attempts whose credentials the server refused."""


def reconnect_ceiling(attempt: int, initial: float, grace: float | None) -> float:
    """The ceiling of the next reconnect delay, in seconds.

    ``initial`` doubled per ``attempt`` that got no welcome (0 for the first
    retry after a welcome), never above an eighth of ``grace`` (the grace
    period of the last welcome), or :data:`BACKOFF_CAP_BEFORE_WELCOME` before
    any welcome: a server back within the grace then finds the worker while
    its leases are still guaranteed.
    """
    cap = BACKOFF_CAP_BEFORE_WELCOME if grace is None else grace / 8
    return max(0.0, min(cap, initial * 2.0 ** min(attempt, 30)))


def reconnect_delay(
    attempt: int, initial: float, grace: float | None, draw: Callable[[], float] = random.random
) -> float:
    """The next reconnect delay with full jitter: uniform between zero and the ceiling.

    Workers that lost the same server then do not come back in lockstep.
    ``draw`` returns a number in [0, 1).
    """
    return draw() * reconnect_ceiling(attempt, initial, grace)


def refused_delay(refusals: int, draw: Callable[[], float] = random.random) -> float:
    """The delay after the server refused the agent's credentials ``refusals`` times in a row.

    A refusal (UNAUTHENTICATED, PERMISSION_DENIED) is not an outage: retrying at
    the reconnect pace would only flood the server's log. 2 s doubling per
    refusal up to 30 s, between half and all of that (a rotated token may fix it).
    """
    ceiling = min(REFUSED_BACKOFF_CAP, 2.0 * 2.0 ** min(max(refusals - 1, 0), 30))
    return ceiling / 2 + draw() * ceiling / 2
