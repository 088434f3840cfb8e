"""A server that stops answering heartbeats (hung) never ends the stream: the agent leaves it."""

import queue
import unittest

from leasehold.agent import Agent
from tests.scripted_server import serve


class UnansweredHeartbeatsTest(unittest.TestCase):
    def test_the_agent_leaves_the_stream_and_says_hello_again(self) -> None:
        service, address = serve(self, heartbeat_interval=3.0)
        events: queue.SimpleQueue[dict] = queue.SimpleQueue()
        agent = Agent(address, "east", "w1", lambda ctx: None, on_event=events.put).start()
        self.addCleanup(agent.close, 1.0)
        self.assertTrue(service.hellos.acquire(timeout=30))
        self.assertTrue(service.acked.wait(30))
        service.acking.clear()
        # The heartbeat interval is 3 s: after 4.5 s without an answer the agent connects again.
        self.assertTrue(service.hellos.acquire(timeout=30), "the agent stayed on a server that answers nothing")
        while True:
            event = events.get(timeout=30)
            if event["event"] == "disconnected":
                self.assertRegex(event["error"], r"^the server answered no heartbeat for \d+ms$")
                # When the heartbeat has waited the bound (and the look again 0.2 s later), not at
                # the next beat after that (6 s).
                silent_ms = int(event["error"].split(" for ")[1].removesuffix("ms"))
                self.assertGreater(silent_ms, 4500)
                self.assertLess(silent_ms, 5800)
                return


if __name__ == "__main__":
    unittest.main()
