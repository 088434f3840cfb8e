"""The agent refuses, before connecting, names a server would refuse in every hello."""

import unittest

from leasehold.agent import Agent, hello_problem


def handler(_action: object) -> None:
    return None


class NamesTest(unittest.TestCase):
    def test_names_the_server_would_refuse_are_refused_at_once(self) -> None:
        cases = {
            "cluster": dict(cluster="bad cluster", worker_id="w"),
            "worker_id": dict(cluster="east", worker_id="w" * 129),
            "labels key": dict(cluster="east", worker_id="w", labels={"bad key": "v"}),
            "labels[": dict(cluster="east", worker_id="w", labels={"k": "v" * 257}),
        }
        for what, names in cases.items():
            with self.subTest(what), self.assertRaisesRegex(ValueError, what.replace("[", r"\[")):
                Agent("127.0.0.1:1", handler=handler, **names)  # type: ignore[arg-type]

    def test_good_names_pass(self) -> None:
        self.assertEqual(hello_problem("east", "w-1.a:b", {"gpu": "yes"}), "")


if __name__ == "__main__":
    unittest.main()
