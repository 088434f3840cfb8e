"""Reconnect delays: doubling, bounded by an eighth of the grace period, full jitter."""

import unittest

from leasehold.backoff import reconnect_ceiling, reconnect_delay, refused_delay


class BackoffTest(unittest.TestCase):
    def test_the_ceiling_doubles_per_attempt_up_to_an_eighth_of_the_grace(self) -> None:
        ceilings = [reconnect_ceiling(attempt, 0.2, 10.0) for attempt in range(5)]
        self.assertEqual(ceilings, [0.2, 0.4, 0.8, 1.25, 1.25])

    def test_before_any_welcome_the_ceiling_is_one_second(self) -> None:
        self.assertEqual(reconnect_ceiling(10, 0.2, None), 1.0)

    def test_the_delay_is_drawn_between_zero_and_the_ceiling(self) -> None:
        self.assertEqual(reconnect_delay(2, 0.2, 2.0, draw=lambda: 0.0), 0.0)
        self.assertAlmostEqual(reconnect_delay(2, 0.2, 2.0, draw=lambda: 0.5), 0.125)

    def test_refusals_wait_longer_and_never_above_thirty_seconds(self) -> None:
        self.assertEqual(refused_delay(1, draw=lambda: 0.0), 1.0)
        self.assertEqual(refused_delay(2, draw=lambda: 1.0), 4.0)
        self.assertEqual(refused_delay(40, draw=lambda: 1.0), 30.0)


if __name__ == "__main__":
    unittest.main()
