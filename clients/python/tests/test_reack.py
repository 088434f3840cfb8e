"""A server whose renewal was late (a database outage) answers the last heartbeat again with the
deadline it stored: the agent takes it, as it takes any ack, from that heartbeat's send time."""

import time
import unittest

from google.protobuf import duration_pb2

from leasehold.agent import Agent
from leasehold.v1 import worker_pb2
from tests.scripted_server import GRACE_SECONDS, serve


def ack(sequence: int, seconds: int) -> worker_pb2.ConnectResponse:
    remaining = duration_pb2.Duration(seconds=seconds)
    return worker_pb2.ConnectResponse(heartbeat_ack=worker_pb2.HeartbeatAck(sequence=sequence, remaining=remaining))


class ReackTest(unittest.TestCase):
    def test_a_second_ack_of_the_last_heartbeat_moves_the_guarantee(self) -> None:
        # No heartbeat after the first for a minute: a later guarantee can only come from the ack
        # sent again.
        service, address = serve(self, heartbeat_interval=60.0)
        agent = Agent(address, "east", "w1", lambda ctx: None).start()
        self.addCleanup(agent.close, 1.0)
        self.assertTrue(service.acked.wait(30))
        until = time.monotonic() + 30
        while agent._deadline < 0 and time.monotonic() < until:
            time.sleep(0.01)
        first = agent._deadline
        self.assertGreater(first, 0)
        # An ack of a heartbeat never sent is no news; the one acked is.
        service.send(ack(7, 10 * GRACE_SECONDS))
        service.send(ack(1, 2 * GRACE_SECONDS))
        while agent._deadline == first and time.monotonic() < until:
            time.sleep(0.01)
        self.assertGreater(agent._deadline - first, GRACE_SECONDS - 5)
        self.assertLess(agent._deadline - first, GRACE_SECONDS + 1)


if __name__ == "__main__":
    unittest.main()
