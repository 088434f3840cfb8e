"""A grant of an action the server ended while its handler still stops waits for that handler."""

import queue
import threading
import unittest
from concurrent import futures

import grpc
from google.protobuf import duration_pb2

from leasehold.agent import Agent
from leasehold.v1 import worker_pb2, worker_pb2_grpc


class _ScriptedWorkerService(worker_pb2_grpc.WorkerServiceServicer):
    """Welcomes the agent, acks its heartbeats, accepts its reports, and sends what the test puts on ``send``."""

    def __init__(self) -> None:
        self.send: queue.SimpleQueue[worker_pb2.ConnectResponse] = queue.SimpleQueue()
        self.acked = threading.Event()

    def Connect(self, request_iterator, context):  # noqa: N802 (the generated servicer's name)
        replies: queue.SimpleQueue[worker_pb2.ConnectResponse | None] = queue.SimpleQueue()

        def read() -> None:
            for request in request_iterator:
                kind = request.WhichOneof("message")
                if kind == "hello":
                    welcome = worker_pb2.Welcome(
                        session_id="s1",
                        heartbeat_interval=duration_pb2.Duration(seconds=1),
                        grace_period=duration_pb2.Duration(seconds=60),
                    )
                    replies.put(worker_pb2.ConnectResponse(welcome=welcome))
                elif kind == "heartbeat":
                    ack = worker_pb2.HeartbeatAck(
                        sequence=request.heartbeat.sequence, remaining=duration_pb2.Duration(seconds=60)
                    )
                    replies.put(worker_pb2.ConnectResponse(heartbeat_ack=ack))
                    self.acked.set()
                elif kind in ("grant_ack", "completion"):
                    report = getattr(request, kind)
                    result = worker_pb2.ReportResult(
                        report_id=report.report_id, action_id=report.action_id, epoch=report.epoch, accepted=True
                    )
                    replies.put(worker_pb2.ConnectResponse(report_result=result))
            replies.put(None)

        threading.Thread(target=read, daemon=True).start()
        while context.is_active():
            try:
                reply = replies.get(timeout=0.02)
                if reply is None:
                    return
                yield reply
            except queue.Empty:
                pass
            while not self.send.empty():
                yield self.send.get()


def _grant(epoch: int) -> worker_pb2.ConnectResponse:
    return worker_pb2.ConnectResponse(grant=worker_pb2.Grant(action_id="a1", epoch=epoch, attempt=epoch))


class RegrantTest(unittest.TestCase):
    def test_the_new_grant_waits_for_the_old_handler_whatever_threads_are_free(self) -> None:
        for capacity in (1, 2):
            with self.subTest(capacity=capacity):
                self._regrant(capacity)

    def _regrant(self, capacity: int) -> None:
        service = _ScriptedWorkerService()
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        worker_pb2_grpc.add_WorkerServiceServicer_to_server(service, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        self.addCleanup(server.stop, None)
        log: list[str] = []
        first_started = threading.Event()
        stopping = threading.Event()
        let_first_return = threading.Event()
        second_started = threading.Event()
        granted: queue.SimpleQueue[int] = queue.SimpleQueue()

        def handler(ctx):
            log.append(f"start {ctx.epoch}")
            if ctx.epoch == 2:
                second_started.set()
                return {}
            first_started.set()
            ctx.cancelled.wait()
            stopping.set()
            let_first_return.wait()
            log.append("end 1")
            return {}

        def on_event(event: dict) -> None:
            if event["event"] == "grant":
                granted.put(event["epoch"])

        agent = Agent(f"127.0.0.1:{port}", "east", "w1", handler, capacity=capacity, on_event=on_event).start()
        self.addCleanup(agent.close, 1.0)
        self.assertTrue(service.acked.wait(30))
        service.send.put(_grant(1))
        self.assertEqual(granted.get(timeout=30), 1)
        # Started, not only granted: this scripted server may send the grant before the ack that
        # gives it a guarantee, and a revoke would then take back a grant that never ran.
        self.assertTrue(first_started.wait(30))
        revoke = worker_pb2.Revoke(action_id="a1", epoch=1, reason=worker_pb2.REVOKE_REASON_EXPIRED)
        service.send.put(worker_pb2.ConnectResponse(revoke=revoke))
        self.assertTrue(stopping.wait(30))
        service.send.put(_grant(2))
        self.assertEqual(granted.get(timeout=30), 2)
        # The second handler would start within moments if it could; it must wait for the first.
        self.assertFalse(second_started.wait(0.3))
        self.assertEqual(log, ["start 1"])
        let_first_return.set()
        self.assertTrue(second_started.wait(30))
        self.assertEqual(log, ["start 1", "end 1", "start 2"])


if __name__ == "__main__":
    unittest.main()
