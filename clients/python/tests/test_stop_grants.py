"""close() asks for no more grants (StopGrants) and gives back at once the grants that arrive meanwhile."""

import queue
import threading
import unittest

from leasehold.agent import Agent
from leasehold.v1 import worker_pb2
from tests.scripted_server import ScriptedWorkerService, grant, serve


class StopGrantsTest(unittest.TestCase):
    def test_close_asks_for_no_more_grants_and_gives_back_those_that_arrive(self) -> None:
        # Close first asks a server that takes StopGrants for no more grants, so the slots that free
        # while its handlers finish are not filled again; a server that does not take them (an older
        # one) is sent none. Either way a grant that arrives while the agent closes (one the server
        # sent before it read the StopGrants), with a thread free, is given back at once, while the
        # other handler still runs: it runs on another worker now, not after the goodbye.
        for accepts in (True, False):
            with self.subTest(accepts_stop_grants=accepts):
                service = self._start_stopping(accepts)
                service.send(grant("a2", 1))
                got = self._until(service, "release a2")
                self._let_return.set()
                got += self._until(service, "goodbye")
                self._closer.join(30)
                want = ["hello", "release a2", "release a1", "goodbye"]
                if accepts:
                    want.insert(1, "stop_grants")
                self.assertEqual(got, want)
                self.assertEqual(self._ran, ["a1"])

    def test_a_stream_opened_while_closing_says_so_in_its_hello(self) -> None:
        # It takes no grants from the start, and the agent sends no StopGrants on it.
        service = self._start_stopping(True)
        self._until(service, "stop_grants")
        service.break_stream()
        self.assertEqual(self._until(service, "hello stop_grants"), ["hello stop_grants"])
        self._let_return.set()
        self.assertEqual(self._until(service, "goodbye"), ["release a1", "goodbye"])
        self._closer.join(30)
        self.assertEqual(self._ran, ["a1"])

    def test_a_grant_queued_for_a_thread_is_given_back_at_once(self) -> None:
        # Its only thread is taken by a handler still stopping after the server ended its lease:
        # the grant waits for that thread, and close gives it back at once, not once the thread frees.
        service, address = serve(self)
        service.accepts_stop_grants = True
        started = threading.Event()
        stopping = threading.Event()
        let_return = threading.Event()
        self.addCleanup(let_return.set)
        granted: queue.SimpleQueue[str] = queue.SimpleQueue()
        ran: list[str] = []

        def handler(ctx):
            ran.append(ctx.action_id)
            started.set()
            ctx.cancelled.wait()
            stopping.set()
            let_return.wait()

        def on_event(event: dict) -> None:
            if event["event"] == "grant":
                granted.put(event["action_id"])

        agent = Agent(address, "east", "w1", handler, capacity=1, on_event=on_event).start()
        self.addCleanup(agent.close, 1.0)
        self.assertTrue(service.acked.wait(30))
        service.send(grant("a1", 1))
        self.assertTrue(started.wait(30), "a1 never ran")
        revoke = worker_pb2.Revoke(action_id="a1", epoch=1, reason=worker_pb2.REVOKE_REASON_EXPIRED)
        service.send(worker_pb2.ConnectResponse(revoke=revoke))
        self.assertTrue(stopping.wait(30))
        service.send(grant("b1", 1))
        self.assertEqual([granted.get(timeout=30), granted.get(timeout=30)], ["a1", "b1"])
        closer = threading.Thread(target=agent.close, args=(0,), daemon=True)
        closer.start()
        self.assertEqual(self._until(service, "release b1"), ["hello", "stop_grants", "release b1"])
        let_return.set()
        self.assertEqual(self._until(service, "goodbye"), ["goodbye"])
        closer.join(30)
        self.assertEqual(ran, ["a1"])

    def _start_stopping(self, accepts_stop_grants: bool) -> ScriptedWorkerService:
        """An agent with two threads that runs a1 and has begun to close while a1's handler runs.

        close(0) cancels the handler at once (which holds on until ``_let_return``): its
        cancellation says close has begun.
        """
        service, address = serve(self)
        service.accepts_stop_grants = accepts_stop_grants
        started = threading.Event()
        cancelled: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._let_return = threading.Event()
        self.addCleanup(self._let_return.set)
        # The actions whose handler ran: only a1, since the agent closes.
        self._ran: list[str] = []

        def handler(ctx):
            self._ran.append(ctx.action_id)
            started.set()
            ctx.cancelled.wait()
            cancelled.put(ctx.cancel_reason)
            self._let_return.wait()

        agent = Agent(address, "east", "w1", handler, capacity=2).start()
        self.addCleanup(agent.close, 1.0)
        self.assertTrue(service.acked.wait(30))
        service.send(grant("a1", 1))
        self.assertTrue(started.wait(30), "a1 never ran")
        self._closer = threading.Thread(target=agent.close, args=(0,), daemon=True)
        self._closer.start()
        self.assertEqual(cancelled.get(timeout=30), "closing")
        return service

    def _until(self, service: ScriptedWorkerService, want: str) -> list[str]:
        """What the server got up to and including ``want``."""
        got: list[str] = []
        while True:
            try:
                got.append(service.got.get(timeout=30))
            except queue.Empty:
                self.fail(f"the server never got {want!r}, only {got}")
            if got[-1] == want:
                return got


if __name__ == "__main__":
    unittest.main()
