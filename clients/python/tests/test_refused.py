"""A completion the server refuses as INVALID fails the action instead of leaving its lease held."""

import queue
import unittest

from leasehold.agent import Agent
from tests.scripted_server import grant, serve


class RefusedCompletionTest(unittest.TestCase):
    def test_the_action_fails_with_the_servers_reason(self) -> None:
        service, address = serve(self)
        refusal = "completion.succeeded.output: must be at most 1 MiB as JSON"
        service.refuse_first_completion = refusal
        finished: queue.SimpleQueue[dict] = queue.SimpleQueue()

        def on_event(event: dict) -> None:
            if event["event"] == "completed":
                finished.put(event)

        agent = Agent(address, "east", "w1", lambda ctx: {"rows": 3}, on_event=on_event).start()
        self.addCleanup(agent.close, 1.0)
        self.assertTrue(service.acked.wait(30))
        service.send(grant("a1", 1))
        first = service.completions.get(timeout=30)
        self.assertEqual(first.WhichOneof("outcome"), "succeeded")
        second = service.completions.get(timeout=30)
        self.assertEqual((second.action_id, second.epoch), ("a1", 1))
        self.assertEqual(second.WhichOneof("outcome"), "failed")
        self.assertEqual(second.failed.message, f"the server refused this action's output: {refusal}")
        self.assertFalse(second.failed.retryable)
        event = finished.get(timeout=30)
        self.assertEqual((event["outcome"], event["accepted"]), ("failed", True))
        self.assertTrue(finished.empty())


if __name__ == "__main__":
    unittest.main()
