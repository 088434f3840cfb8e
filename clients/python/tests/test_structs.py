"""Struct conversion and the payload limits the server enforces."""

import unittest
from typing import Any

from leasehold.structs import payload_violation, python_to_struct, scrub_nul, struct_to_python


def nested(levels: int) -> dict[str, Any]:
    """A payload whose innermost object is at level ``levels`` (the payload itself is level 1)."""
    payload: dict[str, Any] = {}
    inner = payload
    for _ in range(levels - 1):
        inner["x"] = {}
        inner = inner["x"]
    return payload


class StructTest(unittest.TestCase):
    def test_integral_numbers_come_back_as_int(self) -> None:
        struct = python_to_struct({"n": 3, "half": 2.5, "list": [1, 2.0, {"none": None, "yes": True}], "s": "a"})
        plain = struct_to_python(struct)
        self.assertEqual(plain, {"n": 3, "half": 2.5, "list": [1, 2, {"none": None, "yes": True}], "s": "a"})
        self.assertIs(type(plain["n"]), int)
        self.assertIs(type(plain["list"][1]), int)
        self.assertIs(type(plain["list"][2]["yes"]), bool)

    def test_values_that_are_not_json_are_refused(self) -> None:
        with self.assertRaises(TypeError):
            python_to_struct({"when": object()})
        with self.assertRaises(TypeError):
            python_to_struct({"nested": {1: "key is not a string"}})

    def test_nul_is_replaced_in_strings_and_keys(self) -> None:
        self.assertEqual(scrub_nul({"a\0": ["b\0", 1]}), {"a\ufffd": ["b\ufffd", 1]})


class PayloadLimitTest(unittest.TestCase):
    def test_a_payload_within_the_limits_fits(self) -> None:
        self.assertIsNone(payload_violation({"n": 1, "list": [1, "two", None, True]}))
        self.assertIsNone(payload_violation(nested(32)))

    def test_non_finite_numbers_and_nul_are_refused(self) -> None:
        self.assertEqual(payload_violation({"a": float("nan")}), "must be a finite number (got nan)")
        self.assertEqual(payload_violation({"a": "x\0"}), "must not contain NUL (\\u0000) characters")
        self.assertEqual(payload_violation({"a\0": 1}), "keys must not contain NUL (\\u0000) characters")

    def test_depth_count_and_size_are_bounded(self) -> None:
        self.assertEqual(payload_violation(nested(33)), "must be nested at most 32 levels deep")
        self.assertEqual(payload_violation({"l": list(range(10_000))}), "must have at most 10000 values and keys")
        self.assertEqual(payload_violation({"s": "x" * (1024 * 1024)}), "must be at most 1 MiB as JSON")


if __name__ == "__main__":
    unittest.main()
