"""A grant of an action the server ended while its handler still stops waits for that handler."""

import queue
import threading
import unittest

from leasehold.agent import Agent
from leasehold.v1 import worker_pb2
from tests.scripted_server import grant, serve


class RegrantTest(unittest.TestCase):
    def test_the_new_grant_waits_for_the_old_handler_whatever_threads_are_free(self) -> None:
        for capacity in (1, 2):
            with self.subTest(capacity=capacity):
                self._regrant(capacity)

    def _regrant(self, capacity: int) -> None:
        service, address = serve(self)
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

        agent = Agent(address, "east", "w1", handler, capacity=capacity, on_event=on_event).start()
        self.addCleanup(agent.close, 1.0)
        self.assertTrue(service.acked.wait(30))
        service.send(grant("a1", 1))
        self.assertEqual(granted.get(timeout=30), 1)
        # Started, not only granted: a revoke would take back a grant still waiting for a guarantee.
        self.assertTrue(first_started.wait(30))
        revoke = worker_pb2.Revoke(action_id="a1", epoch=1, reason=worker_pb2.REVOKE_REASON_EXPIRED)
        service.send(worker_pb2.ConnectResponse(revoke=revoke))
        self.assertTrue(stopping.wait(30))
        service.send(grant("a1", 2))
        self.assertEqual(granted.get(timeout=30), 2)
        # The second handler would start within moments if it could; it must wait for the first.
        self.assertFalse(second_started.wait(0.3))
        self.assertEqual(log, ["start 1"])
        let_first_return.set()
        self.assertTrue(second_started.wait(30))
        self.assertEqual(log, ["start 1", "end 1", "start 2"])


if __name__ == "__main__":
    unittest.main()
