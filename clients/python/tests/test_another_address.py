"""The address an agent goes to after a stream ends: one of the others, at random."""

import queue
import unittest

from leasehold.agent import Agent, another_address
from tests.scripted_server import serve


class AnotherAddressTest(unittest.TestCase):
    def test_is_one_of_the_others_each_as_likely(self) -> None:
        three = ["a:1", "b:1", "c:1"]
        picked = [another_address(three, 0, lambda r=r: r) for r in (0.0, 0.49, 0.5, 0.99)]
        self.assertEqual(picked, [1, 1, 2, 2])
        self.assertEqual(another_address(three, 2, lambda: 0.0), 0)
        # The index is taken modulo the list.
        self.assertEqual(another_address(three, 4, lambda: 0.99), 2)

    def test_spreads_the_agents_of_a_server_that_went_away_over_the_rest(self) -> None:
        four = ["a:1", "b:1", "c:1", "d:1"]
        counts = [0] * 4
        for _ in range(3000):
            counts[another_address(four, 0)] += 1
        self.assertEqual(counts[0], 0)
        for at in (1, 2, 3):
            self.assertGreater(counts[at], 800)

    def test_skips_entries_naming_the_same_address_and_stays_when_there_is_no_other(self) -> None:
        self.assertEqual(another_address(["a:1", "a:1", "b:1"], 0, lambda: 0.0), 2)
        self.assertEqual(another_address(["a:1"], 5), 0)
        self.assertEqual(another_address(["a:1", "a:1"], 1), 1)


class ReconnectTest(unittest.TestCase):
    def test_a_stream_that_ends_is_followed_by_one_to_another_server(self) -> None:
        a, a_address = serve(self)
        _, b_address = serve(self)
        events: queue.SimpleQueue[dict] = queue.SimpleQueue()
        # A is listed twice, first and next: the next entry names the same server.
        agent = Agent([a_address, a_address, b_address], "east", "w1", lambda ctx: None, on_event=events.put)
        agent._address_index = 0  # the start is random; this test needs it on A's first entry
        agent.start()
        self.addCleanup(agent.close, 1.0)
        self.assertEqual(self._next_welcome(events), a_address)
        a.break_stream()
        self.assertEqual(self._next_welcome(events), b_address, "the agent went back to the server it left")

    def _next_welcome(self, events: queue.SimpleQueue) -> str:
        while True:
            event = events.get(timeout=30)
            if event["event"] == "welcome":
                return event["address"]


if __name__ == "__main__":
    unittest.main()
