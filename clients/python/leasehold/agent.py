"""A Leasehold agent: runs the actions the server grants to one worker.

This follows the wire contract of ``WorkerService.Connect`` (see the comments
of proto/leasehold/v1/worker.proto); the TypeScript agent SDK
(src/agent/agent.ts) is the reference implementation. In short:

* one bidirectional stream; a hello (listing the leases still held, so they
  resume after a reconnect), then heartbeats at the welcome's interval, each
  listing the held leases;
* every grant is acknowledged and run by the handler in a thread pool of
  ``capacity`` threads; its outcome is reported with (action_id, epoch) as the
  fencing token and the lease stays held until the server answers the report;
* a revoke sets the handler's ``cancelled`` event; after CANCELLED or DRAINED
  the lease is released once the handler returns, after EXPIRED, SUPERSEDED
  or ROLLED_BACK it is dropped without a word;
* a lost stream is reopened after a delay with full jitter, never longer than
  an eighth of the grace period, on one of the other addresses picked at
  random (the next one in a fixed order would move every agent of a server
  that went away onto one server);
* a stream is left for another address when its heartbeats go unanswered for
  1.5 intervals, or, given several addresses, when its acks have said for an
  interval that the server cannot reach its database and another address's
  health answers SERVING (at most one round of checks per 4 intervals; the
  stream then goes to that one);
* before the welcome, given several addresses, the agent asks the server for
  its health (grpc.health.v1 Check) on the stream's own channel right after
  the hello and every heartbeat interval, and leaves the stream when a check
  goes unanswered for 1.5 intervals: a hung server holds a hello forever, and
  HTTP/2 keepalive would notice it only after 15 s;
* self-fencing: each heartbeat ack guarantees the session until (send time of
  the acknowledged heartbeat + ``remaining`` - margin); when that local
  deadline passes without a fresh ack, every running handler is cancelled and
  its lease released, never reported as done, and new grants wait for an ack.

Threads: one reads the stream (and reconnects), one asks the server's health
per stream until its welcome (given several addresses), one sends heartbeats
per stream (and one asks the other addresses' health while a round of checks,
started by an ack once the acks have said for an interval that the database
is unreachable, is out), one watches the self-fence deadline, ``capacity``
run handlers, and one delivers events to ``on_event``. All agent state is
guarded by one lock.
"""

from __future__ import annotations

import logging
import math
import queue
import random
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for_futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import struct_pb2

from leasehold.backoff import reconnect_delay, refused_delay
from leasehold.channels import open_channel
from leasehold.errors import LeaseholdError
from leasehold.health import answered_in_time, answered_serving, check_health
from leasehold.structs import payload_violation, python_to_struct, scrub_nul, struct_to_python
from leasehold.v1 import worker_pb2, worker_pb2_grpc

_log = logging.getLogger(__name__)

AgentEvent = dict[str, Any]
"""An event for logs and tests: ``{"event": <kind>, ...fields}``. The kinds:

* ``welcome``: session_id, session_resumed, resumed and revoked (action ids), address
* ``disconnected``: error, retry_in_ms
* ``grant``: action_id, epoch, attempt
* ``completed``: action_id, epoch, outcome (succeeded, failed or released),
  accepted (whether the server applied the report), message
* ``revoked``: action_id, epoch, reason (expired, cancelled, superseded,
  rolled_back, collect_outputs, drained)
* ``self_fenced``: action_ids (the handlers cancelled), silent_ms (since the last ack),
  database_unreachable (acks came, but the last said its server could not reach its
  database, so they could not extend the leases)
* ``drain``: reason. The server sends no more grants while the drain lasts;
  the agent stays connected and takes grants again if an operator ends the
  drain (ClusterService.UndrainWorker), which no event announces.
* ``taken_over``: retry_in_ms. Another process connected with this worker id and
  took the session over, or holds it and the server refused this agent's hello
  (WORKER_ID_IN_USE; worker ids must be unique): every handler was cancelled
  (superseded) and every lease dropped (none is reported on or listed again: they
  are the other process's), and the agent connects again after retry_in_ms: at
  least a grace period after a takeover, 1-2 s after a first refusal, doubling to
  15-30 s.
* ``closed``
"""

# Heartbeat intervals the oldest unanswered heartbeat may wait before the agent leaves the stream.
_UNANSWERED_HEARTBEATS = 1.5
# Heartbeat intervals between the starts of two rounds of health checks of the other addresses,
# asked while a stream's acks say the server cannot reach its database (worker.proto, Connect): per
# agent, whichever stream a round was on, so that a move does not allow a new round at once.
_HEALTH_ROUND_HEARTBEATS = 4
# Heartbeat intervals the acks of a stream must have said database_unreachable before a round
# starts: servers notice an outage up to an interval apart. Three quarters: the second such ack,
# about an interval after the first, is enough even when it comes a little early.
_UNREACHABLE_HEARTBEATS = 0.75
# The health service name the other addresses, and a server that has not welcomed the agent yet,
# are asked about.
_HEALTH_SERVICE = "leasehold.v1.WorkerService"
# The heartbeat interval assumed before the first welcome tells the server's, in seconds: its default.
_DEFAULT_HEARTBEAT_INTERVAL = 2.0

_REVOKE_REASONS = {
    worker_pb2.REVOKE_REASON_EXPIRED: "expired",
    worker_pb2.REVOKE_REASON_CANCELLED: "cancelled",
    worker_pb2.REVOKE_REASON_SUPERSEDED: "superseded",
    worker_pb2.REVOKE_REASON_ROLLED_BACK: "rolled_back",
    worker_pb2.REVOKE_REASON_COLLECT_OUTPUTS: "collect_outputs",
    worker_pb2.REVOKE_REASON_DRAINED: "drained",
}

_GONE = frozenset({"expired", "superseded", "rolled_back"})
"""Cancel reasons after which the lease is no longer the worker's: nothing more is reported on it."""

_RELEASE_REASONS = {
    "self_fenced": "no heartbeat ack from the server before the lease's guaranteed time ran out; "
    "stopped so the server can hand the action to another worker",
    # Acks that kept coming but counted down: the server was heard, its database was not.
    "self_fenced_unreachable": "the server could not reach its database to extend the lease before the "
    "lease's guaranteed time ran out; stopped so the server can hand the action to another worker",
    "closing": "the agent is shutting down",
}

_MAX_FAILURE_MESSAGE = 65_536
_MAX_SHORT_TEXT = 1024
_HANDLER_STOP_WAIT = 5.0
"""Seconds close() waits for cancelled handlers to return before releasing their leases anyway."""
_GOODBYE_WAIT = 5.0
"""Seconds close() waits for the answers to the last reports and for the server to end the session."""
_UNAVAILABLE_RETRY = 0.5
"""Seconds before a report the server could not apply (REJECT_REASON_UNAVAILABLE) is sent again."""


class ActionFailure(Exception):
    """Raise from a handler to fail the action and choose whether it may be retried.

    Any other exception fails the action as retryable.
    """

    def __init__(self, message: str, *, retryable: bool = True, details: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable
        self.details = details


@dataclass(frozen=True)
class ActionContext:
    """What a handler gets for one granted action (a lease, like Temporal's activity context)."""

    action_id: str
    epoch: int
    """The fencing epoch of this grant."""
    attempt: int
    """1 for the first attempt, then increasing."""
    payload: dict[str, Any]
    """What to run, with integral numbers as ``int`` (see leasehold.structs)."""
    run_id: str
    checkpoint: dict[str, Any] | None
    """The last checkpoint an earlier attempt reported, if any."""
    cancelled: threading.Event
    """Set when the handler must stop: a revoke, a self-fence, or close().

    Whatever the handler returns afterwards is not reported as the action's
    outcome: the lease is released (or dropped, when the server took it back).
    """
    stop_requested: threading.Event
    """Set when the server asks to stop and keep the outputs (revoke COLLECT_OUTPUTS).

    The lease stays valid: save the outputs and return them; they are reported as usual.
    """
    _lease: _Lease = field(repr=False)
    _agent: Agent = field(repr=False)

    @property
    def cancel_reason(self) -> str | None:
        """Why ``cancelled`` is set: a revoke reason, ``self_fenced`` or ``closing``."""
        return self._lease.cancel_reason

    def progress(
        self,
        phase: str,
        details: Mapping[str, Any] | None = None,
        checkpoint: Mapping[str, Any] | None = None,
    ) -> None:
        """Reports a phase, optional details, and optionally a checkpoint for the next attempt.

        NULs become U+FFFD. Raises ValueError when details or checkpoint break a
        server limit, rather than sending what would end the stream.
        """
        self._agent._progress(self._lease, phase, details, checkpoint)


Handler = Callable[[ActionContext], Mapping[str, Any] | None]
"""Runs one action and returns its output (or None), or raises (ActionFailure to choose retries)."""


@dataclass(frozen=True)
class _Report:
    """How a grant ended, as it is (re)sent until the server answers it."""

    kind: str
    """succeeded, failed or released."""
    output: struct_pb2.Struct | None = None
    message: str = ""
    """The failure's message, or why the lease was released."""
    retryable: bool = False
    details: struct_pb2.Struct | None = None
    refused: bool = False
    """Sent in place of a completion the server refused as INVALID (never replaced again)."""
    self_fenced: bool = False
    """A release made on the self-fence (ReleaseReport.self_fenced)."""

    def request(self, report_id: int, lease: _Lease) -> worker_pb2.ConnectRequest:
        """The report as a ConnectRequest."""
        if self.kind == "released":
            release = worker_pb2.ReleaseReport(
                report_id=report_id,
                action_id=lease.action_id,
                epoch=lease.epoch,
                reason=self.message,
                self_fenced=self.self_fenced,
            )
            return worker_pb2.ConnectRequest(release=release)
        completion = worker_pb2.CompletionReport(report_id=report_id, action_id=lease.action_id, epoch=lease.epoch)
        if self.kind == "succeeded":
            completion.succeeded.SetInParent()
            if self.output is not None:
                completion.succeeded.output.CopyFrom(self.output)
        else:
            completion.failed.message = self.message
            completion.failed.retryable = self.retryable
            if self.details is not None:
                completion.failed.details.CopyFrom(self.details)
        return worker_pb2.ConnectRequest(completion=completion)


def _released(reason: str, self_fenced: bool = False) -> _Report:
    return _Report("released", message=_clip(reason, _MAX_SHORT_TEXT), self_fenced=self_fenced)


def _clip(text: str, limit: int) -> str:
    """``text`` without NULs and cut to ``limit`` characters (code points, as the server counts them)."""
    text = scrub_nul(text)
    return text if len(text) <= limit else text[:limit]


def _struct_of(value: Mapping[str, Any], what: str) -> tuple[struct_pb2.Struct | None, str | None]:
    """``value`` as a Struct the server takes, or why it cannot be one."""
    if not isinstance(value, Mapping):
        return None, f"the handler's {what} must be a mapping, not {type(value).__name__}"
    clean = scrub_nul(value)
    violation = payload_violation(clean)
    if violation is not None:
        return None, f"the handler's {what} breaks a server limit, so it was not reported: {violation}"
    try:
        return python_to_struct(clean), None
    except (TypeError, ValueError, OverflowError) as error:
        return None, f"the handler's {what} is not JSON: {error}"


def _succeeded(output: Mapping[str, Any] | None) -> _Report:
    if output is None:
        return _Report("succeeded")
    struct, problem = _struct_of(output, "output")
    if problem is not None:
        return _Report("failed", message=_clip(problem, _MAX_FAILURE_MESSAGE), retryable=False)
    return _Report("succeeded", output=struct)


def _failed(message: str, retryable: bool, details: Mapping[str, Any] | None = None) -> _Report:
    struct = None
    if details is not None:
        struct, problem = _struct_of(details, "failure details")
        if problem is not None:
            message = f"{message} ({problem})"
    return _Report("failed", message=_clip(message, _MAX_FAILURE_MESSAGE), retryable=retryable, details=struct)


class _Lease:
    """One grant the agent holds: from the grant until the server answered its report."""

    def __init__(self, agent: Agent, grant: worker_pb2.Grant) -> None:
        self.action_id = grant.action_id
        self.epoch = grant.epoch
        self.cancel_reason: str | None = None
        self.fenced_unreachable = False
        """Self-fenced while the last ack said its server could not reach its database."""
        # The server ended this lease (EXPIRED, SUPERSEDED, ROLLED_BACK, or revoked in a welcome),
        # whatever cancelled the handler first: its slot is free there, its outcome not ours.
        self.gone = False
        self.waiting = False
        """Granted but not started: waits for a heartbeat ack with a fresh guarantee."""
        self.started = False
        self.began = False
        """The handler was called (started only queues it in the pool, where it may wait for a thread)."""
        self.future: Future[None] | None = None
        self.after: Future[None] | None = None
        """The handler of an earlier grant of this action, still stopping: this one starts after it."""
        self.report: _Report | None = None
        """Set when the handler returned (or the grant was given back); None while it runs."""
        self.context = ActionContext(
            action_id=grant.action_id,
            epoch=grant.epoch,
            attempt=grant.attempt,
            payload=struct_to_python(grant.payload),
            run_id=grant.run_id,
            checkpoint=struct_to_python(grant.checkpoint) if grant.HasField("checkpoint") else None,
            cancelled=threading.Event(),
            stop_requested=threading.Event(),
            _lease=self,
            _agent=agent,
        )

    def held(self) -> worker_pb2.HeldLease:
        return worker_pb2.HeldLease(action_id=self.action_id, epoch=self.epoch)


class _Stream:
    """One Connect stream: its outbox, heartbeat bookkeeping and unanswered reports."""

    def __init__(self, index: int, address: str, channel: grpc.Channel) -> None:
        self.index = index
        """The position of ``address`` in the agent's addresses."""
        self.address = address
        self.channel = channel
        self._outbox: queue.SimpleQueue[worker_pb2.ConnectRequest | None] = queue.SimpleQueue()
        self._writes_closed = False
        self.ended = threading.Event()
        self.welcomed = False
        self.said_goodbye = False
        self.hello_stopped_grants = False
        """The hello set stop_grants: the agent was closing when it went out."""
        self.takes_stop_grants = False
        """The welcome set accepts_stop_grants."""
        self.grants_stopped = False
        """The server sends no more grants on this stream: the agent is closing and the server takes
        StopGrants (see Agent._stop_grants)."""
        # Why the agent left this stream itself (the server stopped answering, answered no health
        # check before its welcome, or cannot reach its database while another address serves), if
        # it did.
        self.abandoned: str | None = None
        self.next_index: int | None = None
        """The address the next stream goes to, when the agent left this one for an address that serves."""
        self.asking_health = False
        """A round of health checks of the other addresses is out."""
        self.unreachable_since: float | None = None
        """When the first of the acks that have said database_unreachable since the last one that
        did not arrived (monotonic); None while the last ack did not say so."""
        self.sequence = 0
        self.sent: dict[int, float] = {}
        """Local (monotonic) send time of each unacknowledged heartbeat, by sequence."""
        self.last_acked: tuple[int, float] | None = None
        """The last heartbeat acknowledged and its send time: a server whose renewal was late
        (a database outage) answers it again (worker.proto)."""
        self.pending: dict[int, _Lease] = {}
        """Leases whose report waits for its ReportResult, by report id."""

    def send(self, message: worker_pb2.ConnectRequest) -> None:
        if not self._writes_closed:
            self._outbox.put(message)

    def close_writes(self) -> None:
        """Half-closes the stream once the queued messages are written."""
        if not self._writes_closed:
            self._writes_closed = True
            self._outbox.put(None)

    def requests(self) -> Iterator[worker_pb2.ConnectRequest]:
        """What gRPC writes: the outbox until close_writes()."""
        while (message := self._outbox.get()) is not None:
            yield message


def another_address(addresses: Sequence[str], index: int, rand: Callable[[], float] = random.random) -> int:
    """The index of the address to try after the one at ``index`` (taken modulo): one of the other
    addresses, each as likely; ``index`` itself (modulo) when there is no other.

    An entry naming the same address as the current one is the same server, not another. Going to
    the next one in order would move every agent of a server that went away onto one server, and a
    rolling restart of them all would leave the whole fleet on one.
    """
    here = index % len(addresses)
    others = [i for i, address in enumerate(addresses) if address != addresses[here]]
    if not others:
        return here
    return others[min(int(rand() * len(others)), len(others) - 1)]


_NAME = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def hello_problem(cluster: str, worker_id: str, labels: Mapping[str, str]) -> str:
    """What a server would refuse in every hello (worker.proto, Hello), or "".

    An agent sending such a hello would be refused and retry forever.
    """
    rule = "must be 1-128 letters, digits, '.', '_', '-' or ':'"
    if not _NAME.fullmatch(worker_id):
        return f"worker_id {worker_id!r} {rule}"
    if not _NAME.fullmatch(cluster):
        return f"cluster {cluster!r} {rule}"
    if len(labels) > 64:
        return f"labels must have at most 64 entries, not {len(labels)}"
    for key in sorted(labels):
        if not _NAME.fullmatch(key):
            return f"labels key {key!r} {rule}"
        if len(labels[key]) > 256:
            return f"labels[{key!r}] must be at most 256 characters"
    return ""


class Agent:
    """A worker of one cluster: connects, runs granted actions with ``handler``, reports them.

    Use as a context manager, or call :meth:`start` and later :meth:`close`::

        with Agent("127.0.0.1:7070", "east", "worker-1", handler, capacity=4) as agent:
            stop.wait()
    """

    def __init__(
        self,
        address: str | Sequence[str],
        cluster: str,
        worker_id: str,
        handler: Handler,
        *,
        capacity: int = 1,
        labels: Mapping[str, str] | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        self_fence_margin: float = 0.5,
        initial_backoff: float = 0.2,
        agent_version: str = "leasehold-python/0.1.0",
        on_event: Callable[[AgentEvent], None] | None = None,
    ) -> None:
        """Creates an agent; nothing connects before :meth:`start`.

        Args:
            address: The server's host:port, or several: the agent starts at a
                random one and moves to another one, at random, whenever its
                stream ends (or to the first, after the current one, whose
                health answers SERVING, when it leaves a server that cannot
                reach its database). Before a welcome, it leaves a server that
                answers no health check on the stream's channel within 1.5
                heartbeat intervals.
            cluster: The cluster the worker belongs to.
            worker_id: The worker's stable id, unique across all clusters.
            handler: Runs one action (see :data:`Handler`).
            capacity: Actions run at once (1-10000): the size of the handler thread pool.
            labels: Matched against actions' label selectors.
            credentials: Channel credentials (TLS, a token); insecure when None.
                The health checks of the other addresses use them too.
            self_fence_margin: Seconds subtracted from each ack's guarantee: the
                time the work needs to stop before the server may hand it to
                another worker.
            initial_backoff: Ceiling, in seconds, of the first reconnect delay; it
                doubles with each attempt that gets no welcome, up to an eighth
                of the grace period.
            agent_version: Free-form name and version sent in the hello.
            on_event: Called with each :data:`AgentEvent`, in order, on a thread of its own.
        """
        addresses = [address] if isinstance(address, str) else list(address)
        if not addresses:
            raise ValueError("address must name at least one server")
        if not 1 <= capacity <= 10_000:
            raise ValueError(f"capacity must be between 1 and 10000, got {capacity}")
        if not cluster or not worker_id:
            raise ValueError("cluster and worker_id are required")
        problem = hello_problem(cluster, worker_id, dict(labels or {}))
        if problem:
            raise ValueError(problem)
        self._addresses = addresses
        self._cluster = cluster
        self._worker_id = worker_id
        self._handler = handler
        self._capacity = capacity
        self._labels = dict(labels or {})
        self._credentials = credentials
        self._margin = self_fence_margin
        self._initial_backoff = initial_backoff
        self._agent_version = agent_version
        # Hello.instance_id: this agent's own, so that a second process with its worker id is refused.
        self._instance_id = uuid.uuid4().hex
        self._on_event = on_event

        self._lock = threading.RLock()
        self._deadline_changed = threading.Condition(self._lock)
        self._leases: dict[str, _Lease] = {}
        """Held leases by action id: the ones the hello and heartbeats list."""
        self._stream: _Stream | None = None
        self._session_id: str | None = None
        self._next_report_id = 0
        self._address_index = random.randrange(len(addresses))
        self._attempts_without_welcome = 0
        self._refusals = 0
        self._grace: float | None = None
        """The grace period of the last welcome, in seconds: bounds the reconnect delay."""
        self._heartbeat_interval = 0.0
        self._health_round_at = -math.inf
        """When the agent's last round of health checks started (monotonic), on whichever stream."""
        self._deadline = -math.inf
        """Monotonic time until which held leases are guaranteed: the latest of
        (send time of an acknowledged heartbeat + its remaining - margin). Every
        ack is a lower bound of the session's persisted deadline, which only
        grows, so a late ack never shortens it; a new stream does not extend it.
        Minus infinity until the first ack: grants wait for one."""
        self._last_ack_at = time.monotonic()
        self._last_ack_unreachable = False
        """Whether the last heartbeat ack said its server could not reach its database."""
        self._closing = False
        self._closed = threading.Event()
        self._goodbye_done = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=capacity, thread_name_prefix=f"leasehold-{worker_id}")
        self._events: queue.SimpleQueue[AgentEvent | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []

    @property
    def session_id(self) -> str | None:
        """The current session id, once welcomed."""
        return self._session_id

    @property
    def running(self) -> int:
        """Leases held now (running, waiting to start, or waiting for the answer to their report)."""
        with self._lock:
            return len(self._leases)

    def start(self) -> Agent:
        """Connects and starts taking work."""
        targets = [self._run_streams, self._watch_deadline]
        if self._on_event is not None:
            targets.append(self._deliver_events)
        for target in targets:
            thread = threading.Thread(target=target, name=f"leasehold{target.__name__}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def __enter__(self) -> Agent:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self, timeout: float = 30.0) -> None:
        """Drains and says goodbye.

        Takes no more work, waits up to ``timeout`` seconds for running handlers
        and reports their outcomes, cancels the handlers still running (their
        leases are released), sends a goodbye once the server answered every
        report, and closes the stream. A second call returns at once.

        No more work: it first asks the server for no more grants (StopGrants,
        if the welcome said the server takes it), and gives back at once the
        grants that wait unstarted (for a guarantee, or for a thread) and any
        that arrive after, so that they run on other workers while the handlers
        finish.
        """
        with self._lock:
            if self._closing:
                return
            self._closing = True
            # StopGrants first: a report the server read before it would have the slot it frees
            # filled again.
            if self._stream is not None:
                self._stop_grants(self._stream)
            for lease in list(self._leases.values()):
                if lease.waiting:
                    self._cancel(lease, "closing")
                elif lease.started and not lease.began and lease.report is None and lease.cancel_reason is None:
                    # Queued in the pool (behind a handler still stopping): given back now, not once
                    # a thread frees; its thread then finds it cancelled and settled.
                    self._cancel(lease, "closing")
                    self._settle(lease, _released(_RELEASE_REASONS["closing"]))
        self._wait_for_handlers(timeout)
        with self._lock:
            for lease in list(self._leases.values()):
                if lease.report is None:
                    self._cancel(lease, "closing")
        self._wait_for_handlers(_HANDLER_STOP_WAIT)
        with self._lock:
            # Handlers that ignore their cancellation do not hold the agent hostage.
            for lease in list(self._leases.values()):
                if lease.report is None:
                    ignored = "the agent shut down while the handler ignored its cancellation"
                    # A lease the server ended, or another process holds, is not this agent's to release.
                    self._settle(lease, None if lease.gone else _released(ignored))
            if self._stream is not None:
                self._finish_close(self._stream)
        self._goodbye_done.wait(_GOODBYE_WAIT)
        with self._lock:
            self._closed.set()
            self._deadline_changed.notify_all()
            stream = self._stream
        if stream is not None:
            stream.close_writes()
            stream.channel.close()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._emit("closed")
        self._events.put(None)
        for thread in self._threads:
            thread.join(_GOODBYE_WAIT)

    def _wait_for_handlers(self, timeout: float) -> None:
        with self._lock:
            futures = [lease.future for lease in self._leases.values() if lease.future and lease.report is None]
        wait_for_futures(futures, timeout)

    # --- the stream --------------------------------------------------------------------------

    def _run_streams(self) -> None:
        """Opens streams one after another until the agent closes or said goodbye."""
        while not self._closed.is_set():
            index = self._address_index % len(self._addresses)
            address = self._addresses[index]
            stream = _Stream(index, address, open_channel(address, self._credentials))
            with self._lock:
                if self._closed.is_set():
                    stream.channel.close()
                    return
                self._stream = stream
                # A stream opened while closing takes no work from its start (worker.proto, Hello).
                stream.hello_stopped_grants = self._closing
                hello = worker_pb2.Hello(
                    worker_id=self._worker_id,
                    cluster=self._cluster,
                    capacity=self._capacity,
                    labels=self._labels,
                    held_leases=[lease.held() for lease in self._leases.values() if not lease.gone],
                    agent_version=self._agent_version,
                    instance_id=self._instance_id,
                    stop_grants=stream.hello_stopped_grants,
                )
                stream.send(worker_pb2.ConnectRequest(hello=hello))
            if len(set(self._addresses)) > 1:
                probe = threading.Thread(target=self._probe_until_welcome, args=(stream,), daemon=True)
                probe.start()
            error: grpc.RpcError | None = None
            try:
                for response in worker_pb2_grpc.WorkerServiceStub(stream.channel).Connect(stream.requests()):
                    self._handle(stream, response)
            except grpc.RpcError as failure:
                error = failure
            finally:
                stream.channel.close()
            delay = self._stream_ended(stream, error)
            if delay is None:
                return
            self._closed.wait(delay)

    def _stream_ended(self, stream: _Stream, error: grpc.RpcError | None) -> float | None:
        """Bookkeeping after a stream ended: the delay before the next one, or None to stop."""
        with self._lock:
            stream.ended.set()
            stream.close_writes()
            if not stream.welcomed:
                self._attempts_without_welcome += 1
            if stream.said_goodbye:
                self._goodbye_done.set()
            if self._closed.is_set() or stream.said_goodbye:
                return None
            # The fence deadline still applies: only a fresh ack extends it.
            if stream.next_index is not None:
                self._address_index = stream.next_index
            else:
                self._address_index = another_address(self._addresses, stream.index)
            code = error.code() if isinstance(error, grpc.Call) else None
            reason = LeaseholdError.from_rpc_error(error).reason if isinstance(error, grpc.Call) else None
            taken_over = (code, reason) == (grpc.StatusCode.ABORTED, "SESSION_TAKEN_OVER")
            # A hello refused because another process holds the session changed nothing there: try
            # again at the pace of refused credentials, soon at first (the other may be a predecessor
            # whose lost stream the server has not yet marked), then less and less often.
            in_use = (code, reason) == (grpc.StatusCode.ALREADY_EXISTS, "WORKER_ID_IN_USE")
            refused = in_use or code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
            self._refusals = self._refusals + 1 if refused else 0
            if refused:
                delay = refused_delay(self._refusals)
            else:
                delay = reconnect_delay(self._attempts_without_welcome, self._initial_backoff, self._grace)
            if taken_over or in_use:
                # This agent never opens a second stream, so another process connected with this
                # worker id and took the session, its leases and its grants (or holds it, and this
                # agent's hello was refused): stop every handler at once and drop every lease,
                # reports included (worker.proto). After a takeover, let that process keep the
                # session for a grace period before trying again.
                grace = self._grace if self._grace is not None else 10.0
                if taken_over:
                    delay = max(delay, grace * (1 + random.random()))
                self._drop_all("superseded", revoked_events=False)
                self._emit("taken_over", retry_in_ms=round(delay * 1000))
            if (code, reason) == (grpc.StatusCode.ABORTED, "SESSION_REAPED"):
                self._drop_all("expired", revoked_events=True)
            if stream.abandoned is not None:
                why = stream.abandoned
            else:
                why = f"{code.name}: {error.details()}" if code and isinstance(error, grpc.Call) else "stream ended"
            self._emit("disconnected", error=why, retry_in_ms=round(delay * 1000))
            return delay

    def _drop_all(self, reason: str, revoked_events: bool) -> None:
        """Drops every lease at once, as worker.proto asks of a worker whose stream ended ABORTED,
        reason SESSION_REAPED (its leases expired and may run elsewhere already), or that another
        process holds the session of (SESSION_TAKEN_OVER, WORKER_ID_IN_USE: the leases are that
        process's).

        Running handlers are cancelled with ``reason`` (each keeps its thread until it returns, and
        reports nothing when it does), and reports not answered yet (a self-fence's release, a
        completion) are dropped: sent on the next stream, they could only be fenced, or would end
        the other process's lease. None of them is listed in a later hello or heartbeat. With
        ``revoked_events``, a revoked event tells of each handler cancelled here that the server had
        not ended already (a takeover has its own event, taken_over).
        """
        for lease in list(self._leases.values()):
            was_gone = lease.gone
            lease.gone = True
            if lease.report is not None:
                self._forget(lease)
                continue
            if revoked_events and not was_gone:
                self._emit("revoked", action_id=lease.action_id, epoch=lease.epoch, reason=reason)
            self._cancel(lease, reason)

    def _handle(self, stream: _Stream, response: worker_pb2.ConnectResponse) -> None:
        """Handles one server message (the hello did not ask for batches, so none come)."""
        kind = response.WhichOneof("message")
        with self._lock:
            if kind == "welcome":
                self._on_welcome(stream, response.welcome)
            elif kind == "heartbeat_ack":
                self._on_heartbeat_ack(stream, response.heartbeat_ack)
            elif kind == "grant":
                self._on_grant(stream, response.grant)
            elif kind == "revoke":
                self._on_revoke(response.revoke)
            elif kind == "report_result":
                self._on_report_result(stream, response.report_result)
            elif kind == "drain":
                self._emit("drain", reason=response.drain.reason)

    def _on_welcome(self, stream: _Stream, welcome: worker_pb2.Welcome) -> None:
        stream.welcomed = True
        stream.takes_stop_grants = welcome.accepts_stop_grants
        # A server that ignores Hello.stop_grants (an older one) leaves it false: it keeps granting.
        stream.grants_stopped = stream.hello_stopped_grants and stream.takes_stop_grants
        # Closing since the hello went out: asked now, ahead of the reports sent again below.
        self._stop_grants(stream)
        self._attempts_without_welcome = 0
        self._refusals = 0
        self._session_id = welcome.session_id
        if welcome.HasField("grace_period"):
            self._grace = welcome.grace_period.ToTimedelta().total_seconds()
        interval = 2.0
        if welcome.HasField("heartbeat_interval"):
            interval = welcome.heartbeat_interval.ToTimedelta().total_seconds()
        self._heartbeat_interval = interval
        for held in welcome.revoked:
            lease = self._leases.get(held.action_id)
            # A lease whose report is waiting keeps it: the server accepts it or fences it.
            if lease is not None and lease.epoch == held.epoch and lease.report is None:
                lease.gone = True
                self._cancel(lease, "superseded")
        self._emit(
            "welcome",
            session_id=welcome.session_id,
            session_resumed=welcome.session_resumed,
            resumed=[held.action_id for held in welcome.resumed],
            revoked=[held.action_id for held in welcome.revoked],
            address=stream.address,
        )
        # The first heartbeat goes at once: its ack renews a guarantee that may have run low.
        self._beat(stream)
        beats = threading.Thread(target=self._send_heartbeats, args=(stream, interval), daemon=True)
        beats.start()
        for lease in list(self._leases.values()):
            self._send_report(stream, lease)
        if self._closing:
            self._finish_close(stream)

    def _send_heartbeats(self, stream: _Stream, interval: float) -> None:
        next_beat = time.monotonic() + interval
        while True:
            # Wakes at the next beat, or when the oldest heartbeat has waited the bound if that
            # comes first: looked at only at the next beat, it came half an interval late, and
            # with a grace of three intervals the leases with it.
            with self._lock:
                oldest = min(stream.sent.values(), default=None)
            wake = next_beat
            if oldest is not None:
                wake = min(wake, oldest + _UNANSWERED_HEARTBEATS * self._heartbeat_interval + 0.001)
            if stream.ended.wait(max(0.0, wake - time.monotonic())):
                return
            with self._lock:
                unanswered = self._unanswered(stream)
                now = time.monotonic()
                if unanswered is None and now >= next_beat:
                    # After a pause of this process, one beat, not one for every interval missed.
                    next_beat = max(next_beat + interval, now + interval / 2)
                    self._beat(stream)
            # A server that stopped answering (hung, frozen, or a connection dead one way) never
            # ends the stream: leave it once the oldest heartbeat is unanswered for 1.5 intervals,
            # while the session and its leases can still be resumed through another address.
            # Looked at again a moment later: after a pause of this process, this thread may run
            # before the one reading the answer that is already waiting.
            if unanswered is not None and not stream.ended.wait(0.2):
                with self._lock:
                    unanswered = self._unanswered(stream)
                    if unanswered is not None:
                        stream.abandoned = f"the server answered no heartbeat for {round(unanswered * 1000)}ms"
                        stream.channel.close()
                        return

    def _probe_until_welcome(self, stream: _Stream) -> None:
        """Asks the server of ``stream`` for its health, on the stream's own channel (so the same
        connection), right after the hello and then every heartbeat interval until the welcome
        (or the end of the stream); leaves the stream when a check goes unanswered for 1.5
        intervals.

        Before the welcome the rule on unanswered heartbeats does not apply yet, and a server may
        rightly hold the hello for long (starting, or waiting for its database). A hung one holds
        it forever, and HTTP/2 keepalive notices only after 15 s, past a 10 s grace: with other
        addresses to go to, leave it while the leases can still be resumed elsewhere. Any answer,
        NOT_SERVING or an error status too, means the server is alive and merely holds the hello.
        """
        while True:
            with self._lock:
                if stream.ended.is_set() or stream.welcomed or stream.abandoned is not None:
                    return
                interval = self._heartbeat_interval or _DEFAULT_HEARTBEAT_INTERVAL
            sent_at = time.monotonic()
            # The check waits on this thread, not the one reading the stream; closing the channel
            # (the stream ends) cancels it.
            try:
                check = check_health(stream.channel, _HEALTH_SERVICE, _UNANSWERED_HEARTBEATS * interval)
            except ValueError:
                return  # the channel is closed already: the stream is ending
            answered = answered_in_time(check)
            waited = time.monotonic() - sent_at
            with self._lock:
                if stream.ended.is_set() or stream.welcomed or stream.abandoned is not None:
                    return
                if not answered:
                    stream.abandoned = (
                        f"the server answered no health check for {round(waited * 1000)}ms before welcoming the agent"
                    )
                    stream.channel.close()
                    return
            if stream.ended.wait(max(0.0, interval - waited)):
                return

    def _health_round_due(self, stream: _Stream, interval: float) -> list[tuple[int, str]]:
        """The other addresses (index, address), in order after the stream's, when a round of health
        checks is due now (it is then marked started); else none."""
        now = time.monotonic()
        since = stream.unreachable_since
        if (
            len(self._addresses) < 2
            or stream.ended.is_set()
            or not stream.welcomed
            or stream.said_goodbye
            or stream.abandoned is not None
            or stream.asking_health
            or since is None
            or now - since < _UNREACHABLE_HEARTBEATS * interval
            or now - self._health_round_at < _HEALTH_ROUND_HEARTBEATS * interval
        ):
            return []
        count = len(self._addresses)
        after = [(stream.index + step) % count for step in range(1, count)]
        # The same address listed twice is the same server, not another one.
        others = [(index, self._addresses[index]) for index in after if self._addresses[index] != stream.address]
        if others:
            stream.asking_health = True
            self._health_round_at = now
        return others

    def _ask_health(self, stream: _Stream, interval: float, others: list[tuple[int, str]]) -> None:
        """One round: asks every other address at once, then leaves for the first, in order, that
        answers SERVING; when none does, stays (an ack that still says the database is unreachable
        starts another round, 4 intervals after this one started). It stays too when an ack said
        the database is back while the others were asked."""
        channels: list[grpc.Channel] = []
        serving: tuple[int, str] | None = None
        try:
            for _, address in others:
                channels.append(open_channel(address, self._credentials))
            checks = [check_health(channel, _HEALTH_SERVICE, interval) for channel in channels]
            for target, check in zip(others, checks):
                if answered_serving(check):
                    serving = target
                    break
        finally:
            for channel in channels:
                channel.close()  # cancels the checks not waited for
            # Whatever went wrong, the stream may ask again (a round left out would never end).
            with self._lock:
                stream.asking_health = False
        with self._lock:
            if stream.ended.is_set() or stream.said_goodbye or stream.abandoned is not None:
                return  # the stream ended meanwhile: the answers concern no stream
            if serving is None:
                return  # the database is down for every server: moving would gain nothing
            if stream.unreachable_since is None:
                return  # an ack said the database is back while the others were asked: nothing to leave
            stream.next_index, address = serving
            stream.abandoned = f"the server cannot reach its database; {address} serves"
            stream.channel.close()

    def _unanswered(self, stream: _Stream) -> float | None:
        """How long the oldest heartbeat has gone unanswered, when that is over the bound; else None."""
        oldest = min(stream.sent.values(), default=None)
        if oldest is None:
            return None
        silent = time.monotonic() - oldest
        return silent if silent > _UNANSWERED_HEARTBEATS * self._heartbeat_interval else None

    def _beat(self, stream: _Stream) -> None:
        if stream.ended.is_set() or not stream.welcomed or stream.said_goodbye:
            return
        stream.sequence += 1
        stream.sent[stream.sequence] = time.monotonic()
        heartbeat = worker_pb2.Heartbeat(
            sequence=stream.sequence,
            held_leases=[lease.held() for lease in self._leases.values() if not lease.gone],
        )
        stream.send(worker_pb2.ConnectRequest(heartbeat=heartbeat))

    def _on_heartbeat_ack(self, stream: _Stream, ack: worker_pb2.HeartbeatAck) -> None:
        sent_at = stream.sent.get(ack.sequence)
        if sent_at is None and stream.last_acked is not None and stream.last_acked[0] == ack.sequence:
            sent_at = stream.last_acked[1]
        if sent_at is None:
            return
        for sequence in [s for s in stream.sent if s <= ack.sequence]:
            del stream.sent[sequence]
        stream.last_acked = (ack.sequence, sent_at)
        self._last_ack_at = time.monotonic()
        self._last_ack_unreachable = ack.database_unreachable
        candidate = sent_at + ack.remaining.ToTimedelta().total_seconds() - self._margin
        if candidate > self._deadline:
            self._deadline = candidate
            self._deadline_changed.notify_all()
        self._start_waiting()
        if not ack.database_unreachable:
            stream.unreachable_since = None
        else:
            if stream.unreachable_since is None:
                stream.unreachable_since = time.monotonic()
            # This server cannot write its renewals: its acks only count down. Given other
            # addresses, once its acks have said so for an interval (the others may notice an
            # outage up to an interval later), ask their health and resume the session through
            # one that serves while the leases still hold. The checks may wait up to an interval:
            # on a thread of their own, not this one, which reads the stream.
            interval = self._heartbeat_interval
            others = self._health_round_due(stream, interval)
            if others:
                asking = threading.Thread(target=self._ask_health, args=(stream, interval, others), daemon=True)
                asking.start()

    def _on_grant(self, stream: _Stream, grant: worker_pb2.Grant) -> None:
        existing = self._leases.get(grant.action_id)
        if existing is not None and existing.epoch == grant.epoch and not existing.gone:
            return  # sent again after a reconnect
        if existing is not None:
            # A newer grant, or the same one sent again after the agent stopped it for a takeover
            # (the server held it on): either way it runs anew, once the old handler has stopped.
            self._cancel(existing, "superseded")
        lease = _Lease(self, grant)
        if existing is not None and existing.started and existing.report is None:
            lease.after = existing.future
        self._leases[lease.action_id] = lease
        self._emit("grant", action_id=lease.action_id, epoch=lease.epoch, attempt=grant.attempt)
        self._next_report_id += 1
        ack = worker_pb2.GrantAck(report_id=self._next_report_id, action_id=lease.action_id, epoch=lease.epoch)
        stream.send(worker_pb2.ConnectRequest(grant_ack=ack))
        # The grants the server counts against this worker. One whose lease the server ended
        # (gone) is not: the server freed its slot at once and may grant it again while the
        # handler still stops. That grant then waits in the pool for the handler's thread,
        # instead of going back, which would bring it straight back (worker.proto, Revoke).
        busy = sum(
            1
            for other in self._leases.values()
            if other is not lease and other.report is None and not other.gone
        )
        if self._closing or busy >= self._capacity:
            # Closing (a grant the server sent before it read StopGrants, or any grant from a server
            # that does not take it), or more grants than slots (the server should never do that):
            # give it back, so that it runs elsewhere now.
            self._settle(lease, _released("the agent is shutting down" if self._closing else "no free slot"))
        elif self._may_start():
            self._run(lease)
        else:
            # The guarantee has run out, or will before the next ack: running now would run
            # unfenced. Hold the grant (heartbeats list it) and ask for a fresh guarantee.
            lease.waiting = True
            self._beat(stream)

    def _on_revoke(self, revoke: worker_pb2.Revoke) -> None:
        lease = self._leases.get(revoke.action_id)
        if lease is None or lease.epoch != revoke.epoch:
            return
        reason = _REVOKE_REASONS.get(revoke.reason, "revoked")
        self._emit("revoked", action_id=lease.action_id, epoch=lease.epoch, reason=reason)
        if reason in _GONE:
            lease.gone = True
        if reason == "collect_outputs":
            lease.context.stop_requested.set()
        elif lease.report is None:
            self._cancel(lease, reason)
        elif reason in _GONE:
            self._forget(lease)  # its waiting report would only be fenced

    def _on_report_result(self, stream: _Stream, result: worker_pb2.ReportResult) -> None:
        lease = stream.pending.pop(result.report_id, None)
        if lease is None:
            return  # a grant ack's or a progress report's answer
        report = lease.report
        if result.reject_reason == worker_pb2.REJECT_REASON_UNAVAILABLE:
            retry = threading.Timer(_UNAVAILABLE_RETRY, self._resend, (stream, lease))
            retry.daemon = True
            retry.start()
            return
        if (
            result.reject_reason == worker_pb2.REJECT_REASON_INVALID
            and report is not None
            and report.kind in ("succeeded", "failed")
            and not report.refused
            and self._leases.get(lease.action_id) is lease
        ):
            # The server's limits differ from the ones this agent fitted the report to (another
            # version): the lease is still held, and the same report would be refused again. The
            # action fails with the server's reason instead; nothing re-runs it.
            what = "output" if report.kind == "succeeded" else "failure report"
            lease.report = _Report(
                "failed",
                message=_clip(f"the server refused this action's {what}: {result.message}", _MAX_FAILURE_MESSAGE),
                retryable=False,
                refused=True,
            )
            self._send_report(stream, lease)
            return
        # Accepted, fenced, invalid or not found: nothing more to say about this grant.
        self._forget(lease)
        if report is not None:
            self._emit(
                "completed",
                action_id=lease.action_id,
                epoch=lease.epoch,
                outcome=report.kind,
                accepted=result.accepted,
                message=result.message,
            )
        if self._closing:
            self._finish_close(stream)

    def _resend(self, stream: _Stream, lease: _Lease) -> None:
        with self._lock:
            if (
                stream is self._stream
                and self._leases.get(lease.action_id) is lease
                and lease not in stream.pending.values()
            ):
                self._send_report(stream, lease)

    def _stop_grants(self, stream: _Stream) -> None:
        """Asks the server, once, for no more grants on ``stream`` while the agent closes (StopGrants).

        The slots that free while the running handlers finish are then not filled again, so the
        work queued meanwhile goes to other workers instead of being granted here and given back.
        Only to a server whose welcome set accepts_stop_grants (an older one answers it INVALID and
        keeps granting); a stream whose hello set stop_grants needs none. The grants that do not
        run are given back at once either way (see close and _on_grant).
        """
        if (
            not self._closing
            or stream.ended.is_set()
            or not stream.welcomed
            or stream.said_goodbye
            or stream.grants_stopped
            or not stream.takes_stop_grants
        ):
            return
        stream.send(worker_pb2.ConnectRequest(stop_grants=worker_pb2.StopGrants(reason="agent shutting down")))
        stream.grants_stopped = True

    def _finish_close(self, stream: _Stream) -> None:
        """Says goodbye once every report was answered."""
        if stream.ended.is_set() or not stream.welcomed or stream.said_goodbye or self._leases:
            return
        stream.send(worker_pb2.ConnectRequest(goodbye=worker_pb2.Goodbye(reason="agent shutting down")))
        stream.said_goodbye = True
        stream.close_writes()

    # --- leases ------------------------------------------------------------------------------

    def _guaranteed(self) -> bool:
        return time.monotonic() < self._deadline

    def _may_start(self) -> bool:
        """The guarantee outlasts the next heartbeat, so an ack renews it before the fence could stop new work."""
        return time.monotonic() + self._heartbeat_interval < self._deadline

    def _run(self, lease: _Lease) -> None:
        lease.waiting = False
        lease.started = True
        lease.future = self._pool.submit(self._run_handler, lease)

    def _start_waiting(self) -> None:
        if self._closing or not self._may_start():
            return
        for lease in list(self._leases.values()):
            if lease.waiting and lease.cancel_reason is None:
                self._run(lease)

    def _run_handler(self, lease: _Lease) -> None:
        if lease.after is not None:
            # Never beside the stopping handler of the same action, whatever threads are free.
            wait_for_futures([lease.after])
        with self._lock:
            # Queued in the pool behind a handler that was still stopping: what held when it was
            # queued may not hold now.
            if lease.cancel_reason is None and lease.report is None:
                if self._closing:
                    self._settle(lease, _released("the agent is shutting down"))
                    return
                if not self._may_start():
                    lease.started = False
                    lease.waiting = True
                    if self._stream is not None:
                        self._beat(self._stream)
                    return
                lease.began = True
        report: _Report | None = None
        if not lease.context.cancelled.is_set():
            try:
                report = _succeeded(self._handler(lease.context))
            except ActionFailure as failure:
                report = _failed(failure.message, failure.retryable, failure.details)
            except Exception as error:  # a handler's bug fails the action (retryable), like any error
                _log.warning("the handler of action %s raised", lease.action_id, exc_info=True)
                report = _failed(f"{type(error).__name__}: {error}", retryable=True)
        with self._lock:
            if not self._guaranteed():
                self._fence()  # finished past the deadline: not reported as done
            if lease.report is not None:
                return  # close() released it while the handler ignored its cancellation
            if lease.cancel_reason is not None:
                self._settle(lease, None if lease.gone else self._after_cancel(lease.cancel_reason, lease))
            elif report is not None:
                self._settle(lease, report)

    def _after_cancel(self, reason: str, lease: _Lease) -> _Report | None:
        """What to report on a cancelled grant: nothing when the lease is gone, else a release."""
        if reason in _GONE:
            return None
        key = "self_fenced_unreachable" if reason == "self_fenced" and lease.fenced_unreachable else reason
        return _released(
            _RELEASE_REASONS.get(key, f"stopped after a revoke ({reason})"), self_fenced=reason == "self_fenced"
        )

    def _cancel(self, lease: _Lease, reason: str) -> None:
        if lease.cancel_reason is not None:
            return
        lease.cancel_reason = reason
        lease.context.cancelled.set()
        if lease.waiting:
            lease.waiting = False
            self._settle(lease, self._after_cancel(reason, lease))

    def _settle(self, lease: _Lease, report: _Report | None) -> None:
        """Records how a grant ended and reports it, or forgets it when it is no longer the worker's."""
        if report is None:
            self._forget(lease)
            return
        lease.report = report
        if self._stream is not None:
            self._send_report(self._stream, lease)

    def _send_report(self, stream: _Stream, lease: _Lease) -> None:
        if lease.report is None or stream.ended.is_set() or not stream.welcomed:
            return
        self._next_report_id += 1
        stream.pending[self._next_report_id] = lease
        stream.send(lease.report.request(self._next_report_id, lease))

    def _forget(self, lease: _Lease) -> None:
        """Stops listing ``lease``, unless a newer grant of the action replaced it."""
        if self._leases.get(lease.action_id) is lease:
            del self._leases[lease.action_id]

    def _progress(
        self,
        lease: _Lease,
        phase: str,
        details: Mapping[str, Any] | None,
        checkpoint: Mapping[str, Any] | None,
    ) -> None:
        report = worker_pb2.ProgressReport(
            action_id=lease.action_id, epoch=lease.epoch, phase=_clip(phase, _MAX_SHORT_TEXT)
        )
        for name, value in (("details", details), ("checkpoint", checkpoint)):
            if value is not None:
                struct, problem = _struct_of(value, f"progress {name}")
                if problem is not None:
                    raise ValueError(problem)
                getattr(report, name).CopyFrom(struct)
        with self._lock:
            stream = self._stream
            if lease.cancel_reason is not None or stream is None or stream.ended.is_set() or not stream.welcomed:
                return
            self._next_report_id += 1
            report.report_id = self._next_report_id
            stream.send(worker_pb2.ConnectRequest(progress=report))

    # --- self-fencing ------------------------------------------------------------------------

    def _watch_deadline(self) -> None:
        """Fences whenever the deadline passes; waits for the next one after that."""
        with self._deadline_changed:
            while not self._closed.is_set():
                left = self._deadline - time.monotonic()
                if left > 0:
                    self._deadline_changed.wait(left)
                    continue
                self._fence()
                self._deadline_changed.wait()

    def _fence(self) -> None:
        """Cancels every running handler once the guarantee has run out."""
        if self._guaranteed():
            return
        affected = [
            lease
            for lease in self._leases.values()
            if lease.started and lease.report is None and lease.cancel_reason is None
        ]
        for lease in affected:
            lease.fenced_unreachable = self._last_ack_unreachable
            self._cancel(lease, "self_fenced")
        if affected:
            silent_ms = round((time.monotonic() - self._last_ack_at) * 1000)
            self._emit(
                "self_fenced",
                action_ids=[lease.action_id for lease in affected],
                silent_ms=silent_ms,
                database_unreachable=self._last_ack_unreachable,
            )

    # --- events ------------------------------------------------------------------------------

    def _emit(self, event: str, **fields: Any) -> None:
        if self._on_event is not None:
            self._events.put({"event": event, **fields})

    def _deliver_events(self) -> None:
        assert self._on_event is not None
        while (event := self._events.get()) is not None:
            try:
                self._on_event(event)
            except Exception:  # an observer's bug must not stop the agent
                _log.exception("on_event raised")
