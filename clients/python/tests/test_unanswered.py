"""A server that stops answering heartbeats (hung) never ends the stream: the agent leaves it."""

import queue
import unittest

from leasehold.agent import Agent
from tests.scripted_server import serve


class UnansweredHeartbeatsTest(unittest.TestCase):
    def test_the_agent_leaves_the_stream_and_says_hello_again(self) -> None:
        service, address = serve(self)
        events: queue.SimpleQueue[dict] = queue.SimpleQueue()
        agent = Agent(address, "east", "w1", lambda ctx: None, on_event=events.put).start()
        self.addCleanup(agent.close, 1.0)
        self.assertTrue(service.hellos.acquire(timeout=30))
        self.assertTrue(service.acked.wait(30))
        service.acking.clear()
        # The heartbeat interval is 1 s: after 1.5 s without an answer the agent connects again.
        self.assertTrue(service.hellos.acquire(timeout=30), "the agent stayed on a server that answers nothing")
        while True:
            event = events.get(timeout=30)
            if event["event"] == "disconnected":
                self.assertRegex(event["error"], r"^the server answered no heartbeat for \d+ms$")
                return


if __name__ == "__main__":
    unittest.main()
