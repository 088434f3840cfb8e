"""A server that holds the hello without answering a health check (stopped, or hung) is left
before the leases the agent holds expire, when the agent has another address to go to."""

import queue
import unittest

import grpc

from leasehold.agent import Agent
from tests.scripted_server import HEALTH_NOT_SERVING, SilentListener, grant, serve, serve_with_health

# Acks guarantee 8 s, and the grace is as long: HTTP/2 keepalive would notice the hung server only
# after 15 s, and gRPC gives up connecting to it only after 20 s.
GUARANTEE = 8.0


class HungBeforeWelcomeTest(unittest.TestCase):
    def test_the_agent_leaves_a_server_that_answers_no_health_check_and_keeps_its_lease(self) -> None:
        service, address = serve(self, heartbeat_interval=1.0, grace=GUARANTEE, remaining=GUARANTEE)
        hung = SilentListener(self)
        events: queue.SimpleQueue[dict] = queue.SimpleQueue()
        started: queue.SimpleQueue = queue.SimpleQueue()

        def handler(ctx):
            started.put(ctx)
            ctx.cancelled.wait()

        agent = Agent([address, hung.address], "east", "w1", handler, on_event=events.put).start()
        self.addCleanup(agent.close, 1.0)
        # Wherever the agent went first, it ends up welcomed here (leaving the silent one).
        self.assertTrue(service.acked.wait(30))
        service.send(grant("a1", 1))
        ctx = started.get(timeout=30)
        while events.get(timeout=30)["event"] != "grant":
            pass  # the events of the first stream (and of the silent server, when it went there first)
        hellos = len(service.hello_leases)
        accepted = hung.accepted
        # This server goes away: the only other address is the silent one.
        service.break_stream()
        self.assertTrue(hung.wait_for_accepted(accepted + 1, 30), "the agent never went to the silent server")
        while len(service.hello_leases) == hellos:
            self.assertTrue(service.hellos.acquire(timeout=30), "the agent stayed on the silent server")
        self.assertEqual(service.hello_leases[-1], [("a1", 1)])
        # The events from the break to the welcome that follows: the silent server left, and no lease
        # lost meanwhile.
        seen: list[dict] = []
        while not seen or seen[-1]["event"] != "welcome":
            seen.append(events.get(timeout=30))
        self.assertEqual([e for e in seen if e["event"] == "self_fenced"], [])
        left = [e["error"] for e in seen if e["event"] == "disconnected"][-1]
        self.assertRegex(left, r"^the server answered no health check for \d+ms before welcoming the agent$")
        # The check's deadline was 1.5 times the interval of the last welcome (1 s), not of the 2 s
        # assumed before any welcome.
        silent_ms = int(left.split(" for ")[1].split("ms")[0])
        self.assertGreaterEqual(silent_ms, 1500)
        self.assertLess(silent_ms, 2500)
        self.assertFalse(ctx.cancelled.is_set(), "the move stopped the handler")

    def test_a_server_that_holds_the_hello_but_answers_its_health_checks_is_waited_for(self) -> None:
        interval = 0.5
        a, a_address = serve(self, heartbeat_interval=interval)
        b, b_health, b_address = serve_with_health(self, heartbeat_interval=interval)
        events: queue.SimpleQueue[dict] = queue.SimpleQueue()
        agent = Agent([a_address, b_address], "east", "w1", lambda ctx: None, on_event=events.put)
        agent._address_index = 0  # the start is random; this test needs A's welcome (its interval) first
        agent.start()
        self.addCleanup(agent.close, 1.0)
        self.assertTrue(a.acked.wait(30))
        # B holds the hello (starting, or waiting for its database) and says so when asked.
        b.welcoming.clear()
        self.addCleanup(b.welcoming.set)
        b_health.status = HEALTH_NOT_SERVING
        a.break_stream()
        self.assertTrue(b.hellos.acquire(timeout=30))
        _, first = b_health.checks.get(timeout=30)
        # An error status is an answer too.
        b_health.error = grpc.StatusCode.UNAVAILABLE
        b_health.checks.get(timeout=30)
        # Asked every interval of the last welcome: the third check shows the error was taken as an answer.
        _, third = b_health.checks.get(timeout=30)
        # Not a tight loop: two intervals between the first and the third, measured on arrival (a
        # check that reached the server late on a busy machine shortens the gap after it).
        self.assertGreater(third - first, interval * 1.2)
        b.welcoming.set()
        seen: list[dict] = []
        while not seen or seen[-1]["event"] != "welcome" or seen[-1]["address"] != b_address:
            seen.append(events.get(timeout=30))
        self.assertEqual(b.connects, 1, "the agent left the server that held its hello")
        # The only stream that ended is A's.
        self.assertEqual([e["error"] for e in seen if e["event"] == "disconnected"], ["UNAVAILABLE: the server restarts"])


if __name__ == "__main__":
    unittest.main()
