"""A scripted WorkerService for the agent's tests, on a free loopback port."""

import queue
import socket
import threading
import time
import unittest
from concurrent import futures

import grpc
from google.protobuf import any_pb2, duration_pb2, wrappers_pb2

from google.rpc import error_details_pb2, status_pb2
from leasehold.v1 import worker_pb2, worker_pb2_grpc

GRACE_SECONDS = 60
HEALTH_SERVING = 1
HEALTH_NOT_SERVING = 2


class ScriptedWorkerService(worker_pb2_grpc.WorkerServiceServicer):
    """Welcomes the agent (a grace period of ``grace``, GRACE_SECONDS by default), acks its heartbeats
    with a guarantee of ``remaining`` (GRACE_SECONDS by default; until ``lose_database()``), accepts
    every report (completion or release), and writes what the test sends, in one order: ``acked``
    is set once the first ack is queued, so a grant sent after it always follows that ack.
    ``break_stream()`` ends the current stream with UNAVAILABLE, as a server that restarts does.
    ``take_over()`` ends the current stream once as the server does when another stream takes the
    session (or, with ``in_use``, as it refuses a hello while another process holds it); ``reap()`` ends the
    current stream once as the server does when the session passed its deadline (ABORTED,
    SESSION_REAPED); while ``answering`` is cleared, grant acks and reports go unanswered;
    ``instance_ids`` lists
    the hellos' instance ids, ``hello_leases`` their held leases as (action_id, epoch) pairs.
    After ``hold_acks()``, heartbeats wait for ``answer_oldest()``, as on a slow server.
    The welcome sets accepts_stop_grants as ``accepts_stop_grants`` says; ``got`` receives, in
    order, a line for each hello, StopGrants, report and goodbye (see ``described``)."""

    def __init__(
        self, heartbeat_interval: float = 1.0, grace: float = GRACE_SECONDS, remaining: float = GRACE_SECONDS
    ) -> None:
        self._heartbeat_interval = heartbeat_interval
        self._grace = grace
        self._guarantee = remaining
        self._outbox: queue.SimpleQueue[worker_pb2.ConnectResponse | None] = queue.SimpleQueue()
        self._taken_over = threading.Event()
        self._breaking = threading.Event()
        self._reaping = threading.Event()
        self.answering = threading.Event()
        self.answering.set()
        self._ending = (grpc.StatusCode.ABORTED, "SESSION_TAKEN_OVER", "a newer stream of this worker took the session over")
        self.acked = threading.Event()
        self.instance_ids: list[str] = []
        self.hello_leases: list[list[tuple[str, int]]] = []
        self.hellos = threading.Semaphore(0)
        self.connects = 0
        """Connect streams opened."""
        self.accepts_stop_grants = False
        self.got: queue.SimpleQueue[str] = queue.SimpleQueue()
        # Set: acks say database_unreachable and count down to the deadline the last one gave, as
        # on a server that can no longer write its renewals, instead of guaranteeing ``remaining``.
        self.frozen_deadline: float | None = None
        self._last_deadline = 0.0
        # Cleared: heartbeats go unanswered, as on a hung server that keeps the stream open.
        self.acking = threading.Event()
        self.acking.set()
        # Cleared: hellos wait for it to be set before their welcome, as on a server that is starting
        # or waiting for its database.
        self.welcoming = threading.Event()
        self.welcoming.set()
        self._holding = False
        self._held: list[tuple[queue.SimpleQueue, int]] = []
        """Held heartbeats, oldest first: their stream's outbox and sequence."""
        self._held_lock = threading.Lock()
        self.held: queue.SimpleQueue[int] = queue.SimpleQueue()
        """The sequence of each heartbeat held back, as it arrives."""
        self.refuse_first_completion: str | None = None
        """Set: the next completion is answered INVALID with this message (a server with other limits)."""
        self.completions: queue.SimpleQueue[worker_pb2.CompletionReport] = queue.SimpleQueue()
        """Every completion, as it arrives."""

    def send(self, response: worker_pb2.ConnectResponse) -> None:
        self._outbox.put(response)

    def break_stream(self) -> None:
        self._breaking.set()
        self._outbox.put(worker_pb2.ConnectResponse())  # wakes the writer

    def reap(self) -> None:
        self._reaping.set()
        self._outbox.put(worker_pb2.ConnectResponse())  # wakes the writer

    def take_over(self, in_use: bool = False) -> None:
        if in_use:
            self._ending = (grpc.StatusCode.ALREADY_EXISTS, "WORKER_ID_IN_USE", "connected from another process")
        self._taken_over.set()
        self._outbox.put(worker_pb2.ConnectResponse())  # wakes the writer

    def Connect(self, request_iterator, context):  # noqa: N802 (the generated servicer's name)
        # One outbox per stream: what the test sends goes to the newest stream.
        outbox: queue.SimpleQueue[worker_pb2.ConnectResponse | None] = queue.SimpleQueue()
        self._outbox = outbox
        self.connects += 1

        def read() -> None:
            try:
                for request in request_iterator:
                    kind = request.WhichOneof("message")
                    line = described(request)
                    if line:
                        self.got.put(line)
                    if kind == "hello":
                        self.instance_ids.append(request.hello.instance_id)
                        self.hello_leases.append([(held.action_id, held.epoch) for held in request.hello.held_leases])
                        self.hellos.release()
                        self.welcoming.wait()
                        interval = duration_pb2.Duration()
                        interval.FromNanoseconds(round(self._heartbeat_interval * 1e9))
                        grace = duration_pb2.Duration()
                        grace.FromNanoseconds(round(self._grace * 1e9))
                        welcome = worker_pb2.Welcome(
                            session_id="s1",
                            heartbeat_interval=interval,
                            grace_period=grace,
                            accepts_stop_grants=self.accepts_stop_grants,
                        )
                        outbox.put(worker_pb2.ConnectResponse(welcome=welcome))
                    elif kind == "heartbeat":
                        if not self.acking.is_set():
                            continue
                        with self._held_lock:
                            if self._holding:
                                self._held.append((outbox, request.heartbeat.sequence))
                                self.held.put(request.heartbeat.sequence)
                                continue
                        self._ack(outbox, request.heartbeat.sequence)
                    elif kind in ("grant_ack", "completion", "release"):
                        if not self.answering.is_set():
                            continue
                        report = getattr(request, kind)
                        result = worker_pb2.ReportResult(
                            report_id=report.report_id, action_id=report.action_id, epoch=report.epoch, accepted=True
                        )
                        if kind == "completion":
                            self.completions.put(report)
                            if self.refuse_first_completion is not None:
                                result.accepted = False
                                result.reject_reason = worker_pb2.REJECT_REASON_INVALID
                                result.message = self.refuse_first_completion
                                self.refuse_first_completion = None
                        outbox.put(worker_pb2.ConnectResponse(report_result=result))
            except grpc.RpcError:
                pass  # the client cancelled the stream (an agent leaving a server that does not answer)
            finally:
                outbox.put(None)

        threading.Thread(target=read, daemon=True).start()
        while True:
            reply = outbox.get()
            if reply is None:
                return
            reaped = self._reaping.is_set()
            if reaped:
                self._reaping.clear()
            taken_over = self._taken_over.is_set()
            if taken_over:
                self._taken_over.clear()
            if taken_over or reaped:
                code, reason, message = (
                    (grpc.StatusCode.ABORTED, "SESSION_REAPED", "this session passed its deadline and was reaped")
                    if reaped
                    else self._ending
                )
                info = error_details_pb2.ErrorInfo(reason=reason, domain="leasehold.dev")
                detail = any_pb2.Any()
                detail.Pack(info)
                status = status_pb2.Status(code=code.value[0], message=message, details=[detail])
                context.set_trailing_metadata((("grpc-status-details-bin", status.SerializeToString()),))
                context.abort(code, message)
            if self._breaking.is_set():
                self._breaking.clear()
                context.abort(grpc.StatusCode.UNAVAILABLE, "the server restarts")
            yield reply

    def _ack(self, outbox: queue.SimpleQueue, sequence: int) -> None:
        remaining = duration_pb2.Duration()
        remaining.FromNanoseconds(round(self._remaining() * 1e9))
        ack = worker_pb2.HeartbeatAck(
            sequence=sequence, remaining=remaining, database_unreachable=self.frozen_deadline is not None
        )
        outbox.put(worker_pb2.ConnectResponse(heartbeat_ack=ack))
        self.acked.set()

    def hold_acks(self) -> None:
        """From now on, heartbeats wait for ``answer_oldest()``; ``held`` gets each one's sequence."""
        with self._held_lock:
            self._holding = True

    def answer_oldest(self) -> None:
        """Answers the oldest held heartbeat, if any, with what acks say now; what the test sends
        after this follows that ack."""
        with self._held_lock:
            if self._held:
                outbox, sequence = self._held.pop(0)
                self._ack(outbox, sequence)

    def lose_database(self) -> None:
        """From now on, acks say database_unreachable and count down to the deadline the last one gave."""
        self.frozen_deadline = self._last_deadline

    def regain_database(self) -> None:
        """From now on, acks guarantee ``remaining`` again and no longer say database_unreachable."""
        self.frozen_deadline = None

    def _remaining(self) -> float:
        now = time.monotonic()
        if self.frozen_deadline is not None:
            return max(0.0, self.frozen_deadline - now)
        self._last_deadline = now + self._guarantee
        return self._guarantee


class ScriptedHealth:
    """grpc.health.v1 Health/Check, for any service name: ``status`` (SERVING at first), or the error
    ``error`` when it is set. Each check
    puts the service it asked about and its local time in ``checks``, and the seconds its deadline
    left when it came in ``deadlines`` (the agent's checks of other addresses have one of an
    interval, its checks of a server that has not welcomed it 1.5 intervals). After ``hold_answers()``, a
    check answers only once ``answer_held()`` is called (or its deadline passed), and then puts in
    ``answered`` whether its caller still waited (the call neither cancelled nor past its deadline)."""

    def __init__(self) -> None:
        self.status = HEALTH_SERVING
        self.error: grpc.StatusCode | None = None
        self.checks: queue.SimpleQueue[tuple[str, float]] = queue.SimpleQueue()
        self.deadlines: list[float] = []
        self.answered: queue.SimpleQueue[bool] = queue.SimpleQueue()
        self._release = threading.Event()
        self._release.set()

    def hold_answers(self) -> None:
        self._release.clear()

    def answer_held(self) -> None:
        self._release.set()

    def handler(self) -> grpc.GenericRpcHandler:
        # The messages are StringValue and Int32Value on the wire (see leasehold/health.py).
        def check(request: wrappers_pb2.StringValue, context) -> wrappers_pb2.Int32Value:
            self.deadlines.append(context.time_remaining())
            self.checks.put((request.value, time.monotonic()))
            if not self._release.is_set():
                # Until the deadline (the agent always sets one): a held check never outlives its call.
                released = self._release.wait(context.time_remaining())
                self.answered.put(released and context.is_active() and context.time_remaining() > 0)
            if self.error is not None:
                context.abort(self.error, "scripted health error")
            return wrappers_pb2.Int32Value(value=self.status)

        method = grpc.unary_unary_rpc_method_handler(
            check,
            request_deserializer=wrappers_pb2.StringValue.FromString,
            response_serializer=wrappers_pb2.Int32Value.SerializeToString,
        )
        return grpc.method_handlers_generic_handler("grpc.health.v1.Health", {"Check": method})


def serve(
    test: unittest.TestCase,
    heartbeat_interval: float = 1.0,
    grace: float = GRACE_SECONDS,
    remaining: float = GRACE_SECONDS,
) -> tuple[ScriptedWorkerService, str]:
    """Starts a ScriptedWorkerService, stopped when ``test`` ends; returns it and its address."""
    service, _, address = serve_with_health(test, heartbeat_interval, grace, remaining)
    return service, address


def serve_with_health(
    test: unittest.TestCase,
    heartbeat_interval: float = 1.0,
    grace: float = GRACE_SECONDS,
    remaining: float = GRACE_SECONDS,
) -> tuple[ScriptedWorkerService, ScriptedHealth, str]:
    """Starts a ScriptedWorkerService and a ScriptedHealth on one port, stopped when ``test`` ends."""
    service = ScriptedWorkerService(heartbeat_interval, grace, remaining)
    health = ScriptedHealth()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    worker_pb2_grpc.add_WorkerServiceServicer_to_server(service, server)
    server.add_generic_rpc_handlers((health.handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    test.addCleanup(server.stop, None)
    return service, health, f"127.0.0.1:{port}"


class SilentListener:
    """A TCP listener on a free loopback port that takes connections and never writes a byte: a
    stopped (or hung) server process. ``accepted`` counts the connections taken."""

    def __init__(self, test: unittest.TestCase) -> None:
        self._socket = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._socket.getsockname()[1]}"
        self.accepted = 0
        self._changed = threading.Condition()
        self._connections: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()
        test.addCleanup(self.close)

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self._socket.accept()
            except OSError:
                return  # closed
            with self._changed:
                self._connections.append(connection)
                self.accepted += 1
                self._changed.notify_all()

    def wait_for_accepted(self, count: int, timeout: float) -> bool:
        """Waits until ``count`` connections were taken in all."""
        with self._changed:
            return self._changed.wait_for(lambda: self.accepted >= count, timeout)

    def close(self) -> None:
        # Wakes the accepting thread (closing alone does not, on Linux).
        try:
            self._socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._socket.close()
        with self._changed:
            for connection in self._connections:
                connection.close()


def described(request: worker_pb2.ConnectRequest) -> str:
    """A line for ``got``: "hello" (with " stop_grants" when it sets that), "stop_grants",
    "release <action id>", "completion <action id>" or "goodbye"; "" for the messages left out."""
    kind = request.WhichOneof("message")
    if kind == "hello":
        return "hello stop_grants" if request.hello.stop_grants else "hello"
    if kind in ("release", "completion"):
        return f"{kind} {getattr(request, kind).action_id}"
    if kind in ("stop_grants", "goodbye"):
        return kind
    return ""


def grant(action_id: str, epoch: int) -> worker_pb2.ConnectResponse:
    return worker_pb2.ConnectResponse(grant=worker_pb2.Grant(action_id=action_id, epoch=epoch, attempt=epoch))
