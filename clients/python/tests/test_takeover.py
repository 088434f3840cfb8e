"""Another process taking the worker id's session: every handler stops, and the agent stays away a grace period."""

import queue
import threading
import unittest

from leasehold.agent import Agent
from tests.scripted_server import GRACE_SECONDS, grant, serve


class TakeOverTest(unittest.TestCase):
    def test_every_handler_stops_and_the_agent_waits_a_grace_period(self) -> None:
        self._taken_over(in_use=False)

    def test_a_hello_refused_as_in_use_is_met_the_same_way(self) -> None:
        self._taken_over(in_use=True)

    def _taken_over(self, in_use: bool) -> None:
        service, address = serve(self)
        started = threading.Event()
        stopped: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        events: queue.SimpleQueue[dict] = queue.SimpleQueue()

        def handler(ctx):
            started.set()
            ctx.cancelled.wait()
            stopped.put(ctx.cancel_reason)

        agent = Agent(address, "east", "twin", handler, on_event=events.put).start()
        self.addCleanup(agent.close, 1.0)
        self.assertTrue(service.acked.wait(30))
        service.send(grant("a1", 1))
        self.assertTrue(started.wait(30), "the grant never ran")
        # Every hello names this process by a random instance id.
        self.assertRegex(service.instance_ids[0], r"^[0-9a-f]{32}$")
        service.take_over(in_use=in_use)
        self.assertEqual(stopped.get(timeout=30), "superseded")
        while True:
            event = events.get(timeout=30)
            if event["event"] == "taken_over":
                if in_use:
                    # The refusal disturbed nothing: it tries again soon.
                    self.assertGreaterEqual(event["retry_in_ms"], 1000)
                    self.assertLessEqual(event["retry_in_ms"], 2000)
                else:
                    self.assertGreaterEqual(event["retry_in_ms"], GRACE_SECONDS * 1000)
                return


if __name__ == "__main__":
    unittest.main()
