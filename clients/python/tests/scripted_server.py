"""A scripted WorkerService for the agent's tests, on a free loopback port."""

import queue
import threading
import unittest
from concurrent import futures

import grpc
from google.protobuf import any_pb2, duration_pb2

from google.rpc import error_details_pb2, status_pb2
from leasehold.v1 import worker_pb2, worker_pb2_grpc

GRACE_SECONDS = 60


class ScriptedWorkerService(worker_pb2_grpc.WorkerServiceServicer):
    """Welcomes the agent (a grace period of GRACE_SECONDS), acks its heartbeats with as long a
    guarantee, accepts every report, and writes what the test sends, in one order: ``acked`` is
    set once the first ack is queued, so a grant sent after it always follows that ack.
    ``take_over()`` ends the stream as the server does when another stream takes the session (or,
    with ``in_use``, as it refuses a hello while another process holds it); ``instance_ids`` lists
    the hellos' instance ids."""

    def __init__(self) -> None:
        self._outbox: queue.SimpleQueue[worker_pb2.ConnectResponse | None] = queue.SimpleQueue()
        self._taken_over = threading.Event()
        self._ending = (grpc.StatusCode.ABORTED, "SESSION_TAKEN_OVER", "a newer stream of this worker took the session over")
        self.acked = threading.Event()
        self.instance_ids: list[str] = []
        self.hellos = threading.Semaphore(0)
        # Cleared: heartbeats go unanswered, as on a hung server that keeps the stream open.
        self.acking = threading.Event()
        self.acking.set()

    def send(self, response: worker_pb2.ConnectResponse) -> None:
        self._outbox.put(response)

    def take_over(self, in_use: bool = False) -> None:
        if in_use:
            self._ending = (grpc.StatusCode.ALREADY_EXISTS, "WORKER_ID_IN_USE", "connected from another process")
        self._taken_over.set()
        self._outbox.put(worker_pb2.ConnectResponse())  # wakes the writer

    def Connect(self, request_iterator, context):  # noqa: N802 (the generated servicer's name)
        # One outbox per stream: what the test sends goes to the newest stream.
        outbox: queue.SimpleQueue[worker_pb2.ConnectResponse | None] = queue.SimpleQueue()
        self._outbox = outbox

        def read() -> None:
            try:
                for request in request_iterator:
                    kind = request.WhichOneof("message")
                    if kind == "hello":
                        self.instance_ids.append(request.hello.instance_id)
                        self.hellos.release()
                        welcome = worker_pb2.Welcome(
                            session_id="s1",
                            heartbeat_interval=duration_pb2.Duration(seconds=1),
                            grace_period=duration_pb2.Duration(seconds=GRACE_SECONDS),
                        )
                        outbox.put(worker_pb2.ConnectResponse(welcome=welcome))
                    elif kind == "heartbeat":
                        if not self.acking.is_set():
                            continue
                        ack = worker_pb2.HeartbeatAck(
                            sequence=request.heartbeat.sequence, remaining=duration_pb2.Duration(seconds=GRACE_SECONDS)
                        )
                        outbox.put(worker_pb2.ConnectResponse(heartbeat_ack=ack))
                        self.acked.set()
                    elif kind in ("grant_ack", "completion"):
                        report = getattr(request, kind)
                        result = worker_pb2.ReportResult(
                            report_id=report.report_id, action_id=report.action_id, epoch=report.epoch, accepted=True
                        )
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
            if self._taken_over.is_set():
                code, reason, message = self._ending
                info = error_details_pb2.ErrorInfo(reason=reason, domain="leasehold.dev")
                detail = any_pb2.Any()
                detail.Pack(info)
                status = status_pb2.Status(code=code.value[0], message=message, details=[detail])
                context.set_trailing_metadata((("grpc-status-details-bin", status.SerializeToString()),))
                context.abort(code, message)
            yield reply


def serve(test: unittest.TestCase) -> tuple[ScriptedWorkerService, str]:
    """Starts a ScriptedWorkerService, stopped when ``test`` ends; returns it and its address."""
    service = ScriptedWorkerService()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    worker_pb2_grpc.add_WorkerServiceServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    test.addCleanup(server.stop, None)
    return service, f"127.0.0.1:{port}"


def grant(action_id: str, epoch: int) -> worker_pb2.ConnectResponse:
    return worker_pb2.ConnectResponse(grant=worker_pb2.Grant(action_id=action_id, epoch=epoch, attempt=epoch))
