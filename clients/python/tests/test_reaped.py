"""A session the server reaped (a process paused past its deadline): its leases are dropped."""

import queue
import threading
import unittest

from leasehold.agent import Agent
from tests.scripted_server import grant, serve


class ReapedTest(unittest.TestCase):
    def test_handlers_stop_and_nothing_more_is_reported_or_listed(self) -> None:
        service, address = serve(self)
        started = threading.Event()
        stopped: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        events: queue.SimpleQueue[dict] = queue.SimpleQueue()

        def handler(ctx):
            if ctx.action_id == "done":
                return {"ok": True}
            started.set()
            ctx.cancelled.wait()
            stopped.put(ctx.cancel_reason)
            return None

        agent = Agent(address, "east", "w1", handler, capacity=2, on_event=events.put).start()
        self.addCleanup(agent.close, 1.0)
        self.assertTrue(service.acked.wait(30))
        # The completion goes out and is not answered before the session is reaped.
        service.answering.clear()
        service.send(grant("running", 1))
        service.send(grant("done", 1))
        self.assertTrue(started.wait(30), "the grant never ran")
        self.assertEqual(service.got.get(timeout=30), "hello")
        self.assertEqual(service.got.get(timeout=30), "completion done")
        service.answering.set()
        service.reap()
        self.assertEqual(stopped.get(timeout=30), "expired")
        self.assertTrue(service.hellos.acquire(timeout=30))  # the first hello
        self.assertTrue(service.hellos.acquire(timeout=30), "the agent never said hello again")
        self.assertEqual(service.hello_leases[1], [])
        self.assertEqual(service.got.get(timeout=30), "hello")
        # Reports waiting would go out right after the welcome, before the goodbye.
        agent.close(5.0)
        self.assertEqual(service.got.get(timeout=30), "goodbye")
        revoked = []
        while not events.empty():
            event = events.get()
            if event["event"] == "revoked":
                revoked.append((event["action_id"], event["reason"]))
        self.assertEqual(revoked, [("running", "expired")])


if __name__ == "__main__":
    unittest.main()
