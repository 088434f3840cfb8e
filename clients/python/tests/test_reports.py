"""Reports are fitted to the server's limits before they are sent (a refused one fails the action)."""

import unittest
from types import SimpleNamespace

from leasehold.agent import Agent, _clip, _failed, _succeeded
from leasehold.structs import struct_to_python


class ReportTest(unittest.TestCase):
    def test_an_output_is_reported_as_a_struct(self) -> None:
        report = _succeeded({"doubled": 4})
        self.assertEqual(report.kind, "succeeded")
        assert report.output is not None
        self.assertEqual(struct_to_python(report.output), {"doubled": 4})

    def test_an_output_over_the_limits_fails_the_action_without_retries(self) -> None:
        report = _succeeded({"x": float("inf")})
        self.assertEqual((report.kind, report.retryable), ("failed", False))
        self.assertIn("breaks a server limit", report.message)

    def test_an_output_that_is_not_a_mapping_fails_the_action(self) -> None:
        report = _succeeded([1, 2])  # type: ignore[arg-type]
        self.assertEqual((report.kind, report.retryable), ("failed", False))

    def test_failure_messages_are_cut_to_the_limit_in_characters(self) -> None:
        self.assertEqual(len(_failed("x" * 70_000, True).message), 65_536)
        # An emoji is one character, as the server counts them (code points, not UTF-16 units).
        self.assertEqual(_clip("a\U0001f600b", 2), "a\U0001f600")
        self.assertEqual(_clip("a\0b", 10), "a\ufffdb")


if __name__ == "__main__":
    unittest.main()


class SelfFenceReleaseTest(unittest.TestCase):
    def test_only_a_release_made_on_the_self_fence_is_marked_so(self) -> None:
        lease = SimpleNamespace(action_id="a", epoch=3, fenced_unreachable=False)
        fenced = Agent._after_cancel(None, "self_fenced", lease)  # type: ignore[arg-type]
        drained = Agent._after_cancel(None, "drained", lease)  # type: ignore[arg-type]
        assert fenced is not None and drained is not None
        self.assertTrue(fenced.request(1, lease).release.self_fenced)  # type: ignore[arg-type]
        self.assertFalse(drained.request(2, lease).release.self_fenced)  # type: ignore[arg-type]
        self.assertIn("no heartbeat ack", fenced.request(1, lease).release.reason)  # type: ignore[arg-type]

    def test_a_self_fence_while_the_server_lost_its_database_says_so(self) -> None:
        lease = SimpleNamespace(action_id="a", epoch=3, fenced_unreachable=True)
        fenced = Agent._after_cancel(None, "self_fenced", lease)  # type: ignore[arg-type]
        assert fenced is not None
        release = fenced.request(1, lease).release  # type: ignore[arg-type]
        self.assertTrue(release.self_fenced)
        self.assertIn("could not reach its database", release.reason)
        self.assertNotIn("no heartbeat ack", release.reason)
