"""Sessions whose leases the agent drops, as worker.proto says: nothing more reported on them, and none
listed in a later hello. A session the server reaped (a process paused past its deadline: its leases
expired), and one another process holds (SESSION_TAKEN_OVER, WORKER_ID_IN_USE: the leases are its)."""

import queue
import threading
import unittest

from leasehold.agent import Agent
from tests.scripted_server import ScriptedWorkerService, grant, serve


class DroppedTest(unittest.TestCase):
    def test_a_reaped_session_s_handlers_stop_and_nothing_more_is_reported_or_listed(self) -> None:
        service, address = serve(self)
        agent, stopped, events = self._running_and_an_unanswered_completion(service, address)
        service.reap()
        self.assertEqual(stopped.get(timeout=30), "expired")
        self._next_hello_lists_nothing_and_nothing_is_reported(service, agent)
        revoked = [(event["action_id"], event["reason"]) for event in events if event["event"] == "revoked"]
        self.assertEqual(revoked, [("running", "expired")])

    def test_a_takeover_drops_unanswered_reports_and_stopping_handlers(self) -> None:
        self._taken_over(in_use=False)

    def test_a_hello_refused_as_in_use_drops_them_the_same_way(self) -> None:
        self._taken_over(in_use=True)

    def _taken_over(self, in_use: bool) -> None:
        # A grace period of 1 s: the agent comes back 1 to 2 s after a takeover.
        service, address = serve(self, grace=1.0)
        winding_down = threading.Event()
        self.addCleanup(winding_down.set)
        agent, stopped, events = self._running_and_an_unanswered_completion(service, address, winding_down)
        service.take_over(in_use=in_use)
        self.assertEqual(stopped.get(timeout=30), "superseded")
        # The handler of "running" is still stopping: its lease is the other process's all the same.
        self._next_hello_lists_nothing_and_nothing_is_reported(service, agent, winding_down)
        kinds = [event["event"] for event in events]
        self.assertIn("taken_over", kinds)
        self.assertNotIn("completed", kinds)

    def _running_and_an_unanswered_completion(
        self, service: ScriptedWorkerService, address: str, winding_down: threading.Event | None = None
    ) -> tuple[Agent, queue.SimpleQueue, list[dict]]:
        """An agent running "running" until cancelled (and then, given ``winding_down``, until it is
        set: a command waiting for its process group), whose "done" completion went out unanswered.
        Returns the agent, the queue of the cancel reasons of "running", and the agent's events."""
        started = threading.Event()
        stopped: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        events: list[dict] = []

        def handler(ctx):
            if ctx.action_id == "done":
                return {"ok": True}
            started.set()
            ctx.cancelled.wait()
            stopped.put(ctx.cancel_reason)
            if winding_down is not None:
                winding_down.wait(30)
            return {"stopped": True}

        agent = Agent(address, "east", "twin", handler, capacity=2, on_event=events.append).start()
        self.addCleanup(agent.close, 1.0)
        self.assertTrue(service.acked.wait(30))
        service.answering.clear()
        service.send(grant("running", 1))
        service.send(grant("done", 1))
        self.assertTrue(started.wait(30), "the grant never ran")
        self.assertEqual(service.got.get(timeout=30), "hello")
        self.assertEqual(service.got.get(timeout=30), "completion done")
        service.answering.set()
        return agent, stopped, events

    def _next_hello_lists_nothing_and_nothing_is_reported(
        self, service: ScriptedWorkerService, agent: Agent, winding_down: threading.Event | None = None
    ) -> None:
        """The agent's next hello lists no lease; then (``winding_down`` set, if given) it says goodbye
        on closing with no report before it: reports waiting would go out right after the welcome, and
        a handler's result once it returns."""
        self.assertTrue(service.hellos.acquire(timeout=30))  # the first hello
        self.assertTrue(service.hellos.acquire(timeout=30), "the agent never said hello again")
        self.assertEqual(service.hello_leases[1], [])
        self.assertEqual(service.got.get(timeout=30), "hello")
        if winding_down is not None:
            winding_down.set()
        agent.close(5.0)
        self.assertEqual(service.got.get(timeout=30), "goodbye")

    def test_close_does_not_release_the_lease_of_a_handler_that_ignored_the_takeover(self) -> None:
        service, address = serve(self, grace=1.0)
        started = threading.Event()
        let_go = threading.Event()
        self.addCleanup(let_go.set)

        def handler(ctx):
            started.set()
            let_go.wait(30)  # ignores its cancellation

        agent = Agent(address, "east", "twin", handler).start()
        self.addCleanup(agent.close, 1.0)
        self.assertTrue(service.acked.wait(30))
        service.send(grant("stubborn", 1))
        self.assertTrue(started.wait(30), "the grant never ran")
        service.take_over()
        self.assertTrue(service.hellos.acquire(timeout=30))  # the first hello
        self.assertTrue(service.hellos.acquire(timeout=30), "the agent never said hello again")
        self.assertEqual(service.got.get(timeout=30), "hello")
        self.assertEqual(service.got.get(timeout=30), "hello")
        # Close waits 5 s for the handler, which never returns, and then says goodbye.
        agent.close(0.1)
        self.assertEqual(service.got.get(timeout=30), "goodbye")


if __name__ == "__main__":
    unittest.main()
