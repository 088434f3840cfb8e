#!/usr/bin/env python3
"""An example Leasehold agent in Python: doubles numbers, slowly.

    python3 clients/python/example_agent.py ADDRESS CLUSTER WORKER_ID [CAPACITY]

Each action's payload is ``{"n": K, "sleep_ms": N}``: the job sleeps N ms
(stopping early when its lease is revoked or fenced) and returns
``{"doubled": 2K}``. An optional ``"retry_sleep_ms"`` replaces ``sleep_ms`` on
attempts after the first: a job that hangs on its first worker and is quick
when retried elsewhere. A payload without a number ``n`` fails, not retryable.

Prints one JSON line per agent event on stdout (welcome, grant, completed,
revoked, self_fenced, disconnected, drain, closed). SIGTERM or SIGINT drains:
the agent asks the server for no more grants, running jobs finish (up to 30 s),
then it says goodbye and exits 0.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from typing import Any

from leasehold import ActionContext, ActionFailure, Agent, AgentEvent


def double(ctx: ActionContext) -> dict[str, Any]:
    """The job: sleep, then double ``n``."""
    n = ctx.payload.get("n")
    if isinstance(n, bool) or not isinstance(n, (int, float)):
        raise ActionFailure("payload.n must be a number", retryable=False)
    sleep_ms = ctx.payload.get("sleep_ms", 0)
    if ctx.attempt > 1:
        sleep_ms = ctx.payload.get("retry_sleep_ms", sleep_ms)
    # Returns early when the lease is lost; the agent then reports what the
    # contract asks (a release, or nothing), never this output.
    ctx.cancelled.wait(sleep_ms / 1000)
    return {"doubled": 2 * n}


def print_event(event: AgentEvent) -> None:
    """One JSON line per event, flushed at once so a reader follows along."""
    print(json.dumps(event), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description="An example Leasehold agent that doubles numbers.")
    parser.add_argument("address", help="the server, host:port")
    parser.add_argument("cluster")
    parser.add_argument("worker_id")
    parser.add_argument("capacity", nargs="?", type=int, default=4, help="actions run at once (default 4)")
    args = parser.parse_args()

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    agent = Agent(args.address, args.cluster, args.worker_id, double, capacity=args.capacity, on_event=print_event)
    with agent:
        stop.wait()
    sys.exit(0)


if __name__ == "__main__":
    main()
