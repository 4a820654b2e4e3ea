"""Section 1, errors and settings: durations, Settings validation, and that settings take effect."""

from __future__ import annotations

import math
import unittest

import nodeflow
from tests.support import ClusterTestCase


class ParseDurationAccepts(unittest.TestCase):
    def test_units_combinations_and_bare_numbers(self) -> None:
        cases = {
            "5": 5.0,
            "0": 0.0,
            "1.5s": 1.5,
            "250ms": 0.25,
            "1m30s": 90.0,
            "1.5m": 90.0,
            "2h": 7200.0,
            "1d": 86400.0,
            "1h30m15s500ms": 5415.5,
            "1d2h3m4s5ms": 86400 + 7200 + 180 + 4 + 0.005,
            ".5s": 0.5,
            "0.25": 0.25,
            " 1m30s ": 90.0,  # surrounding blanks, as from a command line or a file
        }
        for text, seconds in cases.items():
            with self.subTest(text=text):
                result = nodeflow.parse_duration(text)
                self.assertIsInstance(result, float)
                self.assertAlmostEqual(result, seconds, places=9)

    def test_numbers_are_seconds(self) -> None:
        for value, seconds in ((0, 0.0), (7, 7.0), (2.5, 2.5), (0.001, 0.001)):
            with self.subTest(value=value):
                result = nodeflow.parse_duration(value)
                self.assertIsInstance(result, float)
                self.assertEqual(result, seconds)


class ParseDurationRefuses(unittest.TestCase):
    def assertRefused(self, value: object, shown: str) -> nodeflow.InvalidInput:
        with self.assertRaises(nodeflow.InvalidInput) as caught:
            nodeflow.parse_duration(value)  # type: ignore[arg-type]
        self.assertIn(shown, str(caught.exception), "the message must name the bad value")
        self.assertIsInstance(caught.exception, nodeflow.NodeflowError)
        self.assertIsInstance(caught.exception, ValueError)
        self.assertEqual(caught.exception.exit_code, 2)
        return caught.exception

    def test_bad_text(self) -> None:
        for text in ("", "   ", "abc", "-1", "-1s", "1x", "s", "1 s", "1.2.3s", "5sec", "1e3", "nan", "inf", "NaN",
                     "Infinity", "30s1m", "1s1s", "1m1m", "500ms1s", "1h2d", "1m30", "1s 2ms"):  # fmt: skip
            with self.subTest(text=text):
                self.assertRefused(text, repr(text))

    def test_wrong_order_and_repeats_explain_the_rule(self) -> None:
        for text in ("30s1m", "1s1s"):
            with self.subTest(text=text):
                message = str(self.assertRefused(text, repr(text)))
                self.assertIn("largest first", message)

    def test_bad_numbers(self) -> None:
        for value in (-1, -0.5, float("nan"), float("inf"), float("-inf")):
            with self.subTest(value=value):
                self.assertRefused(value, repr(value))

    def test_booleans_are_not_durations(self) -> None:
        for value in (True, False):
            with self.subTest(value=value):
                self.assertRefused(value, repr(value))

    def test_other_types_are_named(self) -> None:
        for value, name in ((None, "NoneType"), ([1], "list"), ({"s": 1}, "dict"), (b"5s", "bytes")):
            with self.subTest(value=value):
                self.assertRefused(value, name)

    def test_what_is_named_in_the_message(self) -> None:
        with self.assertRaises(nodeflow.InvalidInput) as caught:
            nodeflow.parse_duration("soon", "lock timeout")
        self.assertTrue(str(caught.exception).startswith("lock timeout"), str(caught.exception))

    def test_never_returns_infinity_for_long_digit_strings(self) -> None:
        # float("9" * 400) is inf: a duration must be finite or refused, as "inf" itself is.
        for text in ("9" * 400, "9" * 400 + "s", "1" + "0" * 400 + "ms"):
            with self.subTest(text=text[:12] + "..."):
                try:
                    result = nodeflow.parse_duration(text)
                except nodeflow.InvalidInput:
                    continue
                self.assertTrue(math.isfinite(result), f"parse_duration returned {result} for a 400-digit number")

    def test_huge_integer_is_refused_cleanly(self) -> None:
        # math.isfinite(10**400) raises OverflowError, which is not a NodeflowError.
        with self.assertRaises(nodeflow.InvalidInput):
            nodeflow.parse_duration(10**400)


class SettingsValidation(unittest.TestCase):
    def test_defaults_are_the_safe_ones(self) -> None:
        settings = nodeflow.Settings()
        self.assertEqual(settings.synchronous, "FULL")
        self.assertGreater(settings.busy_timeout, 0)

    def test_bad_synchronous_is_refused(self) -> None:
        for value in ("BAD", "OFF", "EXTRA", "", "full ", None):
            with self.subTest(value=value):
                with self.assertRaises(nodeflow.InvalidInput) as caught:
                    nodeflow.Settings(synchronous=value)  # type: ignore[arg-type]
                self.assertIn(repr(value), str(caught.exception))
                self.assertIn("FULL", str(caught.exception))

    def test_bad_busy_timeout_is_refused(self) -> None:
        for value in (-1, float("nan"), float("inf"), True, "soon", None):
            with self.subTest(value=value):
                with self.assertRaises(nodeflow.InvalidInput) as caught:
                    nodeflow.Settings(busy_timeout=value)  # type: ignore[arg-type]
                self.assertIn("busy_timeout", str(caught.exception))

    def test_settings_are_frozen(self) -> None:
        settings = nodeflow.Settings()
        with self.assertRaises(AttributeError):
            settings.synchronous = "NORMAL"  # type: ignore[misc]


class SettingsTakeEffect(ClusterTestCase):
    def synchronous_of(self, nf: nodeflow.Cluster) -> int:
        return int(nf.store.read(lambda conn: conn.execute("PRAGMA synchronous").fetchone()[0]))

    def test_full_is_the_default_and_applies(self) -> None:
        with nodeflow.connect(self.db) as nf:  # creates the database
            self.assertEqual(self.synchronous_of(nf), 2)
        with nodeflow.connect(self.db) as nf:  # opens the existing one
            self.assertEqual(self.synchronous_of(nf), 2)
        with nodeflow.connect(self.db, settings=nodeflow.Settings(synchronous="FULL")) as nf:
            self.assertEqual(self.synchronous_of(nf), 2)

    def test_normal_applies_on_create_and_on_open(self) -> None:
        normal = nodeflow.Settings(synchronous="NORMAL")
        with nodeflow.connect(self.db, settings=normal) as nf:
            self.assertEqual(self.synchronous_of(nf), 1)
            self.assertIsNotNone(nf.lock("x").fence)  # the handle works for writes too
        with nodeflow.connect(self.db, settings=normal) as nf:
            self.assertEqual(self.synchronous_of(nf), 1)
        with nodeflow.connect(self.db) as nf:  # a setting of one handle is not stored in the file
            self.assertEqual(self.synchronous_of(nf), 2)

    def test_busy_timeout_given_as_duration_text_works_or_is_refused(self) -> None:
        # Settings validates busy_timeout with parse_duration, so "250ms" passes validation; it must then
        # behave as 0.25 s, not fail later with a TypeError from sqlite3.connect or time arithmetic.
        try:
            settings = nodeflow.Settings(busy_timeout="250ms")  # type: ignore[arg-type]
        except nodeflow.InvalidInput:
            return
        with nodeflow.connect(self.db, settings=settings) as nf, nf.lock("x") as held:
            self.assertEqual(held.fence, 1)


if __name__ == "__main__":
    unittest.main()
