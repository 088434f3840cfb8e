"""A server whose acks say database_unreachable is left for an address whose health answers
SERVING, and kept when none does, or when its acks say the database is back before one does."""

import queue
import re
import unittest

from leasehold.agent import Agent
from leasehold.v1 import worker_pb2
from tests.scripted_server import HEALTH_NOT_SERVING, HEALTH_SERVING, ScriptedHealth, grant, serve_with_health

INTERVAL = 0.5
"""The scripted servers' heartbeat interval, in seconds: rounds of checks start 4 of them apart."""


def round_checks(health: ScriptedHealth) -> list[float]:
    """The deadlines of the checks ``health`` got, less those the agent sends before its first welcome
    to the server it connected to (whose deadline is 1.5 times the 2 s interval assumed before one):
    those of rounds have a deadline of one interval."""
    return [remaining for remaining in health.deadlines if remaining < 2.0]


class DatabaseUnreachableTest(unittest.TestCase):
    def setUp(self) -> None:
        self.events: queue.SimpleQueue[dict] = queue.SimpleQueue()

    def _start(self, handler, interval: float = INTERVAL) -> tuple:
        """Starts two servers and an agent given both addresses; returns the server it connected to,
        then the other."""
        self.servers = [serve_with_health(self, interval) for _ in range(2)]
        agent = Agent([address for _, _, address in self.servers], "east", "w1", handler, on_event=self.events.put)
        agent.start()
        self.addCleanup(agent.close, 1.0)
        # It starts at a random one of the two.
        welcome = self._next_event("welcome")
        first, second = self.servers if welcome["address"] == self.servers[0][2] else self.servers[::-1]
        return first, second

    def _next_event(self, kind: str) -> dict:
        while True:
            event = self.events.get(timeout=30)
            if event["event"] == kind:
                return event

    def test_the_agent_resumes_its_session_through_an_address_that_serves(self) -> None:
        started: queue.SimpleQueue = queue.SimpleQueue()

        def handler(ctx):
            started.put(ctx)
            ctx.cancelled.wait()

        (a, a_health, _), (b, b_health, b_address) = self._start(handler)
        self.assertTrue(a.acked.wait(30))
        a.send(grant("a1", 1))
        ctx = started.get(timeout=30)
        a_health.status = HEALTH_NOT_SERVING
        b_health.status = HEALTH_SERVING
        # A still answers every heartbeat, but its acks say it cannot reach its database.
        a.lose_database()
        self.assertTrue(b.hellos.acquire(timeout=30), "the agent stayed on a server that cannot reach its database")
        self.assertEqual(b.hello_leases, [[("a1", 1)]])
        disconnected = self._next_event("disconnected")
        self.assertRegex(
            disconnected["error"],
            rf"^the server cannot reach its database; {re.escape(b_address)} serves$",
        )
        self.assertEqual(b_health.checks.get(timeout=1)[0], "leasehold.v1.WorkerService")
        self.assertEqual(round_checks(a_health), [], "the agent asked the health of the server it was leaving")
        self.assertEqual(self._next_event("welcome")["address"], b_address)
        self.assertTrue(b.acked.wait(30))
        self.assertFalse(ctx.cancelled.is_set(), "the move stopped the handler")

    def test_the_agent_stays_when_no_other_address_serves_and_asks_again_later(self) -> None:
        (a, a_health, _), (b, b_health, _) = self._start(lambda ctx: None)
        self.assertTrue(a.acked.wait(30))
        a_health.status = HEALTH_NOT_SERVING
        b_health.status = HEALTH_NOT_SERVING
        a.lose_database()
        service, first_check = b_health.checks.get(timeout=30)
        self.assertEqual(service, "leasehold.v1.WorkerService")
        _, second_check = b_health.checks.get(timeout=30)
        # Asked again no sooner than 4 intervals after the first round started, from the same
        # stream (the slack: the first check also connected to B).
        self.assertGreaterEqual(second_check - first_check, 4 * INTERVAL - INTERVAL / 4)
        self.assertEqual((a.connects, b.connects), (1, 0))
        self.assertEqual(round_checks(a_health), [])
        while not self.events.empty():
            self.assertNotEqual(self.events.get()["event"], "disconnected")

    def test_the_agent_stays_when_the_database_is_back_before_another_address_serves(self) -> None:
        # Long enough that each step below fits in an interval with a margin of over a second.
        interval = 2.0
        (a, _, _), (b, b_health, _) = self._start(lambda ctx: None, interval)
        self.assertTrue(a.acked.wait(30))
        b_health.hold_answers()
        # From here on every ack is written by the test.
        a.hold_acks()
        a.held.get(timeout=30)
        a.lose_database()
        a.answer_oldest()
        # The next ack, the one that sends the agent asking, comes late: after the heartbeat that
        # follows it (the agent leaves a stream only when a heartbeat is due and the oldest is
        # unanswered for 1.5 intervals). That following heartbeat is then answered while the agent
        # waits, up to an interval, for the other server.
        a.held.get(timeout=30)
        a.held.get(timeout=30)
        a.answer_oldest()
        b_health.checks.get(timeout=30)
        # The database is back before the other server answers.
        a.regain_database()
        a.answer_oldest()
        # The agent handles a stream's messages one at a time, in order, and only tells a drain: its
        # event comes once the ack before it was handled.
        a.send(worker_pb2.ConnectResponse(drain=worker_pb2.Drain(reason="marks the ack before it")))
        self._next_event("drain")
        b_health.answer_held()
        self.assertTrue(b_health.answered.get(timeout=30), "the agent no longer waited for the answer")
        # Leaving would close the stream at once: its next heartbeat shows it was kept.
        try:
            a.held.get(timeout=30)
        except queue.Empty:
            self.fail("no more heartbeats on the stream: the agent left it")
        self.assertEqual((a.connects, b.connects), (1, 0))
        while not self.events.empty():
            self.assertNotEqual(self.events.get()["event"], "disconnected")


if __name__ == "__main__":
    unittest.main()
