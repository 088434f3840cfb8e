"""Another process taking the worker id's session: every handler stops, and the agent stays away a grace period."""

import queue
import threading
import unittest
from concurrent import futures

import grpc
from google.protobuf import any_pb2, duration_pb2

from google.rpc import error_details_pb2, status_pb2
from leasehold.agent import Agent
from leasehold.v1 import worker_pb2, worker_pb2_grpc

_GRACE_SECONDS = 60


class _ScriptedWorkerService(worker_pb2_grpc.WorkerServiceServicer):
    """Welcomes the agent, acks its heartbeats with a long guarantee, sends one grant, then ends
    the stream as the server does when another stream of the worker takes the session over."""

    def __init__(self) -> None:
        self.take_over = threading.Event()

    def Connect(self, request_iterator, context):  # noqa: N802 (the generated servicer's name)
        replies: queue.SimpleQueue[worker_pb2.ConnectResponse | None] = queue.SimpleQueue()

        def read() -> None:
            granted = False
            for request in request_iterator:
                kind = request.WhichOneof("message")
                if kind == "hello":
                    welcome = worker_pb2.Welcome(
                        session_id="s1",
                        heartbeat_interval=duration_pb2.Duration(seconds=1),
                        grace_period=duration_pb2.Duration(seconds=_GRACE_SECONDS),
                    )
                    replies.put(worker_pb2.ConnectResponse(welcome=welcome))
                elif kind == "heartbeat":
                    ack = worker_pb2.HeartbeatAck(
                        sequence=request.heartbeat.sequence, remaining=duration_pb2.Duration(seconds=_GRACE_SECONDS)
                    )
                    replies.put(worker_pb2.ConnectResponse(heartbeat_ack=ack))
                    if not granted:
                        granted = True
                        grant = worker_pb2.Grant(action_id="a1", epoch=1, attempt=1)
                        replies.put(worker_pb2.ConnectResponse(grant=grant))
                elif kind == "grant_ack":
                    result = worker_pb2.ReportResult(
                        report_id=request.grant_ack.report_id, action_id="a1", epoch=1, accepted=True
                    )
                    replies.put(worker_pb2.ConnectResponse(report_result=result))
            replies.put(None)

        threading.Thread(target=read, daemon=True).start()
        while True:
            try:
                reply = replies.get(timeout=0.05)
            except queue.Empty:
                reply = False
            if reply is None:
                return
            if reply:
                yield reply
            if self.take_over.is_set():
                info = error_details_pb2.ErrorInfo(reason="SESSION_TAKEN_OVER", domain="leasehold.dev")
                detail = any_pb2.Any()
                detail.Pack(info)
                message = "a newer stream of this worker took the session over"
                status = status_pb2.Status(code=grpc.StatusCode.ABORTED.value[0], message=message, details=[detail])
                context.set_trailing_metadata((("grpc-status-details-bin", status.SerializeToString()),))
                context.abort(grpc.StatusCode.ABORTED, message)


class TakeOverTest(unittest.TestCase):
    def test_every_handler_stops_and_the_agent_waits_a_grace_period(self) -> None:
        service = _ScriptedWorkerService()
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        worker_pb2_grpc.add_WorkerServiceServicer_to_server(service, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        self.addCleanup(server.stop, None)
        started = threading.Event()
        stopped: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        events: queue.SimpleQueue[dict] = queue.SimpleQueue()

        def handler(ctx):
            started.set()
            ctx.cancelled.wait()
            stopped.put(ctx.cancel_reason)

        agent = Agent(f"127.0.0.1:{port}", "east", "twin", handler, on_event=events.put).start()
        self.addCleanup(agent.close, 1.0)
        self.assertTrue(started.wait(30), "the grant never ran")
        service.take_over.set()
        self.assertEqual(stopped.get(timeout=30), "superseded")
        while True:
            event = events.get(timeout=30)
            if event["event"] == "taken_over":
                self.assertGreaterEqual(event["retry_in_ms"], _GRACE_SECONDS * 1000)
                return


if __name__ == "__main__":
    unittest.main()
