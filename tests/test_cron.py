"""Section 8, cron schedules: Vixie cron's five fields in an IANA time zone, and their daylight-saving rules.

Covered:

- A table of known next firing times, worked out by hand from the calendar and the zones' published rules (not
  by running the code under test): every field syntax, month and weekday names, Sunday as 0 and 7, the
  day-of-month/day-of-week OR rule and its `*` exceptions (Vixie's "starts with *" quirk included), month ends,
  leap years (2100 is not one), the @shorthands, UTC, Asia/Kolkata (+05:30), and the 2026 daylight-saving
  changes of America/New_York (03-08, 11-01) and Europe/Berlin (03-29, 10-25) for fixed-time jobs
  (`30 2 * * *`) and wildcard jobs (`*/30 * * * *`, `0 * * * *`, `* 2 * * *`).
- The machine's local time zone (tz=None), through the TZ environment variable.
- Bad input, each refused with InvalidInput and a one-line message that names the field and the problem.
- Random expressions at random instants (many near daylight-saving changes, in zones with half-hour offsets
  and a half-hour DST shift too): the next time is after the instant, fires by an independent model of the
  rules, and for short gaps no minute strictly between fires (checked minute by minute).
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import os
import random
import time
import unittest
import zoneinfo

import nodeflow

NY = "America/New_York"
BERLIN = "Europe/Berlin"
KOLKATA = "Asia/Kolkata"

# (expression, tz, from, expected next firing time). Weekdays used: 2026-01-01 is a Thursday, so January's
# Mondays are the 5th, 12th, 19th and 26th; 2026-02-01 and 2026-03-01 are Sundays.
KNOWN_FIRING_TIMES: tuple[tuple[str, str, str, str], ...] = (
    # Every field syntax, in UTC.
    ("* * * * *", "UTC", "2026-01-01T00:00:00+00:00", "2026-01-01T00:01:00+00:00"),  # strictly after
    ("* * * * *", "UTC", "2026-01-01T00:00:59.999000+00:00", "2026-01-01T00:01:00+00:00"),
    ("*/15 * * * *", "UTC", "2026-01-01T10:07:00+00:00", "2026-01-01T10:15:00+00:00"),
    ("*/15 * * * *", "UTC", "2026-01-01T10:45:00+00:00", "2026-01-01T11:00:00+00:00"),
    ("10-50/20 * * * *", "UTC", "2026-01-01T10:30:00+00:00", "2026-01-01T10:50:00+00:00"),  # 10, 30, 50
    ("10-50/20 * * * *", "UTC", "2026-01-01T10:50:00+00:00", "2026-01-01T11:10:00+00:00"),
    ("1,5,9 * * * *", "UTC", "2026-01-01T10:05:00+00:00", "2026-01-01T10:09:00+00:00"),
    ("1,5,9 * * * *", "UTC", "2026-01-01T10:09:00+00:00", "2026-01-01T11:01:00+00:00"),
    ("0 9-17 * * *", "UTC", "2026-01-01T17:00:00+00:00", "2026-01-02T09:00:00+00:00"),
    ("23 0-20/2 * * *", "UTC", "2026-01-01T20:23:00+00:00", "2026-01-02T00:23:00+00:00"),  # man 5 crontab
    ("0,30 8-9,17 * * *", "UTC", "2026-01-01T09:30:00+00:00", "2026-01-01T17:00:00+00:00"),
    ("0 0 1 */3 *", "UTC", "2026-02-01T00:00:00+00:00", "2026-04-01T00:00:00+00:00"),  # months 1, 4, 7, 10
    # Month and weekday names, any case, in lists and ranges.
    ("0 12 1 jul *", "UTC", "2026-01-01T00:00:00+00:00", "2026-07-01T12:00:00+00:00"),
    ("0 0 1 JAN-MAR/2 *", "UTC", "2026-01-01T00:00:00+00:00", "2026-03-01T00:00:00+00:00"),  # jan, mar
    ("0 9 * * mon-fri", "UTC", "2026-01-02T09:00:00+00:00", "2026-01-05T09:00:00+00:00"),  # Friday to Monday
    ("0 22 * * 1-5", "UTC", "2026-01-02T22:00:00+00:00", "2026-01-05T22:00:00+00:00"),  # man 5 crontab
    ("0 0 * * SAT,Sun", "UTC", "2026-01-04T00:00:00+00:00", "2026-01-10T00:00:00+00:00"),
    ("0 8 * * Tue", "UTC", "2026-01-06T08:00:00+00:00", "2026-01-13T08:00:00+00:00"),
    # Sunday is 0, 7 and sun.
    ("5 4 * * sun", "UTC", "2026-01-01T00:00:00+00:00", "2026-01-04T04:05:00+00:00"),  # man 5 crontab
    ("0 0 * * 0", "UTC", "2026-01-01T00:00:00+00:00", "2026-01-04T00:00:00+00:00"),
    ("0 0 * * 7", "UTC", "2026-01-01T00:00:00+00:00", "2026-01-04T00:00:00+00:00"),
    ("0 0 * * 5-7", "UTC", "2026-01-03T00:00:00+00:00", "2026-01-04T00:00:00+00:00"),  # Saturday to Sunday
    ("0 0 * * 5-7", "UTC", "2026-01-04T00:00:00+00:00", "2026-01-09T00:00:00+00:00"),  # Sunday to Friday
    # Both day fields restricted: either may match.
    ("0 0 13 * fri", "UTC", "2026-01-03T00:00:00+00:00", "2026-01-09T00:00:00+00:00"),  # a Friday
    ("0 0 13 * fri", "UTC", "2026-01-10T00:00:00+00:00", "2026-01-13T00:00:00+00:00"),  # a Tuesday the 13th
    ("0 0 1 * mon", "UTC", "2026-01-01T00:00:00+00:00", "2026-01-05T00:00:00+00:00"),
    ("0 0 30 2 mon", "UTC", "2026-01-01T00:00:00+00:00", "2026-02-02T00:00:00+00:00"),  # no Feb 30; Mondays
    ("0 0 29 2 0", "UTC", "2026-01-01T00:00:00+00:00", "2026-02-01T00:00:00+00:00"),  # Sundays in February
    # One day field `*`: only the other counts.
    ("0 0 15 * *", "UTC", "2026-01-01T00:00:00+00:00", "2026-01-15T00:00:00+00:00"),
    ("0 0 * * mon", "UTC", "2026-01-01T00:00:00+00:00", "2026-01-05T00:00:00+00:00"),
    # Vixie's quirk: a day field starting with * makes a day match both fields.
    ("0 0 */2 * mon", "UTC", "2026-01-06T00:00:00+00:00", "2026-01-19T00:00:00+00:00"),  # odd-day Mondays
    ("0 0 13 * */2", "UTC", "2026-01-14T00:00:00+00:00", "2026-06-13T00:00:00+00:00"),  # a 13th on Sun/Tue/Thu/Sat
    ("0 0 29 2 */7", "UTC", "2026-01-01T00:00:00+00:00", "2032-02-29T00:00:00+00:00"),  # Feb 29 on a Sunday
    # Month ends and leap years.
    ("0 0 1 * *", "UTC", "2026-01-31T12:00:00+00:00", "2026-02-01T00:00:00+00:00"),
    ("0 0 31 * *", "UTC", "2026-01-31T00:00:00+00:00", "2026-03-31T00:00:00+00:00"),
    ("0 0 31 * *", "UTC", "2026-03-31T00:00:00+00:00", "2026-05-31T00:00:00+00:00"),
    ("0 0 30 * *", "UTC", "2026-01-30T00:00:00+00:00", "2026-03-30T00:00:00+00:00"),
    ("0 0 29 * *", "UTC", "2027-01-29T00:00:00+00:00", "2027-03-29T00:00:00+00:00"),
    ("0 0 29 2 *", "UTC", "2026-01-01T00:00:00+00:00", "2028-02-29T00:00:00+00:00"),
    ("0 0 29 2 *", "UTC", "2028-02-29T00:00:00+00:00", "2032-02-29T00:00:00+00:00"),
    ("0 0 29 2 *", "UTC", "2096-03-01T00:00:00+00:00", "2104-02-29T00:00:00+00:00"),  # 2100 is no leap year
    ("59 23 31 12 *", "UTC", "2026-12-31T23:59:00+00:00", "2027-12-31T23:59:00+00:00"),
    ("0 0 1 1 *", "UTC", "2026-12-31T23:59:59+00:00", "2027-01-01T00:00:00+00:00"),
    # Shorthands.
    ("@yearly", "UTC", "2026-06-15T12:00:00+00:00", "2027-01-01T00:00:00+00:00"),
    ("@annually", "UTC", "2026-01-01T00:00:00+00:00", "2027-01-01T00:00:00+00:00"),
    ("@monthly", "UTC", "2026-01-31T23:59:00+00:00", "2026-02-01T00:00:00+00:00"),
    ("@weekly", "UTC", "2026-01-01T00:00:00+00:00", "2026-01-04T00:00:00+00:00"),  # Sunday midnight
    ("@daily", "UTC", "2026-01-01T00:00:00+00:00", "2026-01-02T00:00:00+00:00"),
    ("@midnight", "UTC", "2026-02-28T23:00:00+00:00", "2026-03-01T00:00:00+00:00"),
    ("@hourly", "UTC", "2026-01-01T10:59:59+00:00", "2026-01-01T11:00:00+00:00"),
    ("@Hourly", "UTC", "2026-01-01T11:00:00+00:00", "2026-01-01T12:00:00+00:00"),
    # Fields read on the zone's wall clock.
    ("0 9 * * *", KOLKATA, "2026-01-01T00:00:00+00:00", "2026-01-01T09:00:00+05:30"),  # from 05:30 IST
    ("0 * * * *", KOLKATA, "2026-01-01T10:00:00+00:00", "2026-01-01T16:00:00+05:30"),  # from 15:30 IST
    ("*/45 * * * *", KOLKATA, "2026-01-01T15:50:00+05:30", "2026-01-01T16:00:00+05:30"),
    ("30 23 31 12 *", KOLKATA, "2026-12-31T18:00:00+00:00", "2027-12-31T23:30:00+05:30"),  # from 23:30 IST
    ("0 0 * * *", BERLIN, "2026-01-01T00:00:00+00:00", "2026-01-02T00:00:00+01:00"),  # from 01:00 CET
    ("@yearly", BERLIN, "2026-12-31T23:30:00+00:00", "2028-01-01T00:00:00+01:00"),  # from 2027-01-01 00:30 CET
    ("0 8 * * mon", NY, "2026-01-05T12:00:00+00:00", "2026-01-05T08:00:00-05:00"),  # from Monday 07:00 EST
    # New York springs forward on 2026-03-08: 02:00 EST becomes 03:00 EDT, 02:00-02:59 never happens.
    ("30 2 * * *", NY, "2026-03-07T02:30:00-05:00", "2026-03-08T03:00:00-04:00"),  # first instant after the gap
    ("30 2 * * *", NY, "2026-03-08T01:00:00-05:00", "2026-03-08T03:00:00-04:00"),
    ("30 2 * * *", NY, "2026-03-08T03:00:00-04:00", "2026-03-09T02:30:00-04:00"),  # once only
    ("0 2,3 * * *", NY, "2026-03-08T03:00:00-04:00", "2026-03-09T02:00:00-04:00"),  # 02:00 and 03:00 fire once
    ("0 * * * *", NY, "2026-03-08T01:00:00-05:00", "2026-03-08T03:00:00-04:00"),  # one real hour later
    ("*/30 * * * *", NY, "2026-03-08T01:30:00-05:00", "2026-03-08T03:00:00-04:00"),
    ("*/30 * * * *", NY, "2026-03-08T03:00:00-04:00", "2026-03-08T03:30:00-04:00"),
    ("* 2 * * *", NY, "2026-03-08T01:59:00-05:00", "2026-03-09T02:00:00-04:00"),  # wildcard: no 02:xx that day
    # New York falls back on 2026-11-01: 02:00 EDT becomes 01:00 EST, 01:00-01:59 happens twice.
    ("30 1 * * *", NY, "2026-11-01T00:00:00-04:00", "2026-11-01T01:30:00-04:00"),
    ("30 1 * * *", NY, "2026-11-01T01:30:00-04:00", "2026-11-02T01:30:00-05:00"),  # not again at 01:30 EST
    ("30 1 * * *", NY, "2026-11-01T01:10:00-05:00", "2026-11-02T01:30:00-05:00"),
    ("30 2 * * *", NY, "2026-11-01T00:00:00-04:00", "2026-11-01T02:30:00-05:00"),
    ("*/30 * * * *", NY, "2026-11-01T01:30:00-04:00", "2026-11-01T01:00:00-05:00"),  # real time: 30 min later
    ("*/30 * * * *", NY, "2026-11-01T01:00:00-05:00", "2026-11-01T01:30:00-05:00"),
    ("0 * * * *", NY, "2026-11-01T01:00:00-04:00", "2026-11-01T01:00:00-05:00"),  # one real hour later
    ("0 * * * *", NY, "2026-11-01T01:00:00-05:00", "2026-11-01T02:00:00-05:00"),
    # Berlin springs forward on 2026-03-29: 02:00 CET becomes 03:00 CEST.
    ("30 2 * * *", BERLIN, "2026-03-29T00:00:00+01:00", "2026-03-29T03:00:00+02:00"),
    ("30 2 * * *", BERLIN, "2026-03-29T03:00:00+02:00", "2026-03-30T02:30:00+02:00"),
    ("15,45 2 * * *", BERLIN, "2026-03-29T01:59:00+01:00", "2026-03-29T03:00:00+02:00"),  # two skipped, one run
    ("15,45 2 * * *", BERLIN, "2026-03-29T03:00:00+02:00", "2026-03-30T02:15:00+02:00"),
    ("*/30 * * * *", BERLIN, "2026-03-29T01:30:00+01:00", "2026-03-29T03:00:00+02:00"),
    ("0 * * * *", BERLIN, "2026-03-29T01:00:00+01:00", "2026-03-29T03:00:00+02:00"),
    # Berlin falls back on 2026-10-25: 03:00 CEST becomes 02:00 CET, 02:00-02:59 happens twice.
    ("30 2 * * *", BERLIN, "2026-10-25T00:00:00+02:00", "2026-10-25T02:30:00+02:00"),
    ("30 2 * * *", BERLIN, "2026-10-25T02:30:00+02:00", "2026-10-26T02:30:00+01:00"),
    ("30 2 * * *", BERLIN, "2026-10-25T02:10:00+01:00", "2026-10-26T02:30:00+01:00"),
    ("0 2 * * *", BERLIN, "2026-10-25T02:00:00+02:00", "2026-10-26T02:00:00+01:00"),
    ("0 3 * * *", BERLIN, "2026-10-25T02:59:00+02:00", "2026-10-25T03:00:00+01:00"),
    ("*/30 * * * *", BERLIN, "2026-10-25T02:30:00+02:00", "2026-10-25T02:00:00+01:00"),
    ("*/30 * * * *", BERLIN, "2026-10-25T02:45:00+02:00", "2026-10-25T02:00:00+01:00"),
    ("0 * * * *", BERLIN, "2026-10-25T02:00:00+02:00", "2026-10-25T02:00:00+01:00"),
    ("0 * * * *", BERLIN, "2026-10-25T02:00:00+01:00", "2026-10-25T03:00:00+01:00"),
    ("*/15 2 * * *", BERLIN, "2026-10-25T02:45:00+02:00", "2026-10-25T02:00:00+01:00"),  # wildcard: both passes
)

# (expression, tz, words the message must contain). Each message must also be one line.
REFUSED: tuple[tuple[object, object, tuple[str, ...]], ...] = (
    ("* * * *", None, ("4 fields", "expected 5")),
    ("* * * * * *", None, ("6 fields", "expected 5")),
    ("", None, ("empty",)),
    ("   ", None, ("empty",)),
    ("61 * * * *", None, ("minute 61 is out of range 0-59",)),
    ("* 24 * * *", None, ("hour 24 is out of range 0-23",)),
    ("* * 0 * *", None, ("day-of-month 0 is out of range 1-31",)),
    ("* * 32 * *", None, ("day-of-month 32 is out of range 1-31",)),
    ("* * * 13 *", None, ("month 13 is out of range 1-12",)),
    ("* * * 0 *", None, ("month 0 is out of range 1-12",)),
    ("* * * * 8", None, ("day-of-week 8 is out of range 0-7",)),
    ("0-60 * * * *", None, ("minute 60 is out of range 0-59",)),
    ("*/0 * * * *", None, ("minute", "step 0", "at least 1")),
    ("*/61 * * * *", None, ("minute", "step 61", "out of range 1-60")),
    ("* */x * * *", None, ("hour", 'step "x"', "not a number")),
    ("*/ * * * *", None, ("minute", "step", "not a number")),
    ("5-1 * * * *", None, ("minute", '"5-1"', "reversed", "5-59,0-1")),
    ("* * * * fri-mon", None, ("day-of-week", '"fri-mon"', "reversed")),
    ("5/10 * * * *", None, ("minute", '"5/10"', "*/10", "5-59/10")),
    ("1-2-3 * * * *", None, ("minute", '"1-2-3"')),
    ("* * * * mon-", None, ("day-of-week", '"mon-"', "missing a number")),
    ("* * * foo *", None, ("unknown month name", '"foo"', "jan..dec")),
    ("* * * * funday", None, ("unknown day-of-week name", '"funday"', "sun..sat")),
    ("* * * * monday", None, ("unknown day-of-week name", '"monday"')),
    ("jan * * * *", None, ("minute", '"jan"', "not a number")),
    ("a * * * *", None, ("minute", '"a"', "not a number")),
    ("1,,2 * * * *", None, ("minute", "empty list item")),
    ("1, * * * *", None, ("minute", "empty list item")),
    ("* * L * *", None, ("day-of-month", '"L"', "Quartz")),
    ("0 0 ? * MON", None, ("day-of-month", '"?"', "Quartz")),
    ("0 0 * * 5#3", None, ("day-of-week", '"5#3"', "Quartz")),
    ("0 0 30 2 *", None, ("never", "February", "30")),
    ("0 0 31 4,6,9,11 *", None, ("never", "April", "November", "31")),
    ("0 0 30 2 */1", None, ("never", "February", "starts with *")),
    ("@reboot", None, ("@reboot",)),
    ("@fortnightly", None, ("unknown shorthand", "@daily")),
    ("@daily 5", None, ("unknown shorthand",)),
    ("* * * * *", "Mars/Base", ('unknown time zone "Mars/Base"; use an IANA name such as Europe/Paris',)),
    ("* * * * *", "", ("unknown time zone",)),
    ("* * * * *", "../../etc/passwd", ("unknown time zone",)),
    ("* * * * *", "europe/paris", ("unknown time zone",)),
    ("* * * * *", 1, ("time zone", "int")),
    (None, None, ("cron expression", "NoneType")),
    (b"* * * * *", None, ("cron expression", "bytes")),
)


def at(text: str) -> float:
    return datetime.datetime.fromisoformat(text).timestamp()


def shown(moment: float, tz: str) -> str:
    return datetime.datetime.fromtimestamp(moment, zoneinfo.ZoneInfo(tz)).isoformat()


class KnownFiringTimes(unittest.TestCase):
    def test_table(self) -> None:
        self.assertGreaterEqual(len(KNOWN_FIRING_TIMES), 40)
        for expression, tz, start, expected in KNOWN_FIRING_TIMES:
            with self.subTest(expression=expression, tz=tz, start=start):
                result = nodeflow.CronSchedule.parse(expression, tz).next_after(at(start))
                self.assertIsInstance(result, float)
                self.assertEqual(shown(result, tz), expected)  # the same instant and the same offset
                self.assertEqual(result, at(expected))

    def test_local_time_zone_when_tz_is_none(self) -> None:
        if not hasattr(time, "tzset"):
            self.skipTest("time.tzset() is needed to change the local time zone")
        saved = os.environ.get("TZ")
        os.environ["TZ"] = NY
        time.tzset()
        try:
            for expression, start, expected in (
                ("30 2 * * *", "2026-03-08T01:00:00-05:00", "2026-03-08T03:00:00-04:00"),
                ("*/30 * * * *", "2026-11-01T01:30:00-04:00", "2026-11-01T01:00:00-05:00"),
                ("30 1 * * *", "2026-11-01T01:30:00-04:00", "2026-11-02T01:30:00-05:00"),
                ("0 8 * * mon", "2026-01-05T12:00:00+00:00", "2026-01-05T08:00:00-05:00"),
            ):
                with self.subTest(expression=expression, start=start):
                    schedule = nodeflow.CronSchedule.parse(expression)
                    self.assertIsNone(schedule.tz)
                    self.assertEqual(schedule.next_after(at(start)), at(expected))
        finally:
            if saved is None:
                del os.environ["TZ"]
            else:
                os.environ["TZ"] = saved
            time.tzset()

    def test_whole_numbers_and_chaining(self) -> None:
        schedule = nodeflow.CronSchedule.parse("*/20 * * * *", "UTC")
        moment: float = int(at("2026-01-01T00:00:00+00:00"))
        seen = []
        for _ in range(4):
            moment = schedule.next_after(moment)
            seen.append(shown(moment, "UTC"))
        self.assertEqual(
            seen,
            ["2026-01-01T00:20:00+00:00", "2026-01-01T00:40:00+00:00", "2026-01-01T01:00:00+00:00",
             "2026-01-01T01:20:00+00:00"],
        )  # fmt: skip

    def test_sparse_schedules_are_found_by_jumping_not_scanning(self) -> None:
        # A minute-by-minute scan would need about 3 million steps to find the next February 29 on a Sunday.
        schedule = nodeflow.CronSchedule.parse("0 0 29 2 */7", "UTC")
        started = time.perf_counter()
        moment = at("2026-01-01T00:00:00+00:00")
        for _ in range(50):
            moment = schedule.next_after(moment)
        self.assertLess(time.perf_counter() - started, 2.0)
        self.assertEqual(datetime.datetime.fromtimestamp(moment, datetime.UTC).strftime("%m-%d %a"), "02-29 Sun")


class ParsedFields(unittest.TestCase):
    def test_fields_and_flags(self) -> None:
        schedule = nodeflow.CronSchedule.parse(" 10-50/20 */6 1,15 jan-mar/2 5-7 ", "Europe/Berlin")
        self.assertEqual(schedule.expression, "10-50/20 */6 1,15 jan-mar/2 5-7")
        self.assertEqual(schedule.tz, "Europe/Berlin")
        self.assertEqual(tuple(schedule.minutes), (10, 30, 50))
        self.assertEqual(tuple(schedule.hours), (0, 6, 12, 18))
        self.assertEqual(tuple(schedule.days_of_month), (1, 15))
        self.assertEqual(tuple(schedule.months), (1, 3))
        self.assertEqual(sorted(schedule.days_of_week), [0, 5, 6])  # 7 is Sunday, stored as 0
        self.assertFalse(schedule.day_of_month_starred)
        self.assertFalse(schedule.day_of_week_starred)
        self.assertTrue(schedule.minute_or_hour_starred)

    def test_shorthands_expand(self) -> None:
        for shorthand, fields in (("@yearly", "0 0 1 1 *"), ("@annually", "0 0 1 1 *"), ("@monthly", "0 0 1 * *"),
                                  ("@weekly", "0 0 * * 0"), ("@daily", "0 0 * * *"), ("@midnight", "0 0 * * *"),
                                  ("@hourly", "0 * * * *")):  # fmt: skip
            with self.subTest(shorthand=shorthand):
                short = nodeflow.CronSchedule.parse(shorthand, "UTC")
                long = nodeflow.CronSchedule.parse(fields, "UTC")
                self.assertEqual(short.expression, shorthand)
                self.assertEqual(dataclasses.replace(short, expression=fields), long)

    def test_sunday_is_0_7_and_sun(self) -> None:
        for text in ("0", "7", "sun", "SUN", "0,7", "7-7", "*/7"):
            with self.subTest(text=text):
                self.assertEqual(tuple(nodeflow.CronSchedule.parse(f"0 0 * * {text}").days_of_week), (0,))

    def test_schedules_are_frozen_and_compare_by_value(self) -> None:
        schedule = nodeflow.CronSchedule.parse("0 3 * * *", "UTC")
        self.assertEqual(schedule, nodeflow.CronSchedule.parse("0 3 * * *", "UTC"))
        self.assertNotEqual(schedule, nodeflow.CronSchedule.parse("0 3 * * *", "Europe/Berlin"))
        with self.assertRaises(dataclasses.FrozenInstanceError):
            schedule.tz = "Europe/Berlin"  # type: ignore[misc]


class RefusedInput(unittest.TestCase):
    def test_bad_expressions_and_zones(self) -> None:
        self.assertGreaterEqual(len(REFUSED), 15)
        for expression, tz, words in REFUSED:
            with self.subTest(expression=expression, tz=tz):
                with self.assertRaises(nodeflow.InvalidInput) as caught:
                    nodeflow.CronSchedule.parse(expression, tz)  # type: ignore[arg-type]
                message = str(caught.exception)
                self.assertNotIn("\n", message)
                for word in words:
                    self.assertIn(word, message)
                if isinstance(expression, str) and expression.strip() and tz is None:
                    self.assertIn(f'"{expression.strip()}"', message, "the message quotes the expression")

    def test_bad_moments(self) -> None:
        schedule = nodeflow.CronSchedule.parse("* * * * *", "UTC")
        for moment in (float("nan"), float("inf"), float("-inf"), True, "2026-01-01", None, 1e300):
            with self.subTest(moment=moment), self.assertRaises(nodeflow.InvalidInput):
                schedule.next_after(moment)  # type: ignore[arg-type]

    def test_the_end_of_the_calendar(self) -> None:
        schedule = nodeflow.CronSchedule.parse("0 0 1 1 *", "UTC")
        with self.assertRaises(nodeflow.InvalidInput):
            schedule.next_after(at("9999-06-01T00:00:00+00:00"))


# ── Random expressions against an independent model of the rules ────────────────────────────────────────────


@dataclasses.dataclass(frozen=True)
class Model:
    """What an expression means, built alongside its text by the generator below (not by parsing it)."""

    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 is Sunday
    days_starred: bool
    weekdays_starred: bool
    wildcard: bool  # the minute or the hour field starts with *

    def matches(self, wall: datetime.datetime) -> bool:
        if wall.minute not in self.minutes or wall.hour not in self.hours or wall.month not in self.months:
            return False
        in_days = wall.day in self.days
        in_weekdays = wall.isoweekday() % 7 in self.weekdays
        if self.days_starred or self.weekdays_starred:
            return in_days and in_weekdays
        return in_days or in_weekdays

    def can_fire(self) -> bool:
        if not (self.days_starred or self.weekdays_starred):
            return True
        return any(_exists(2000, month, day) for month in self.months for day in self.days)  # 2000 is a leap year

    def fires(self, moment: int, zone: zoneinfo.ZoneInfo) -> bool:
        """Whether the job fires at this whole-minute instant, by the rules stated in the module's docstring."""
        local = datetime.datetime.fromtimestamp(moment, zone)
        wall = local.replace(tzinfo=None, fold=0)
        if self.wildcard:
            return self.matches(wall)  # every real instant whose wall clock matches
        if self.matches(wall) and local.fold == 0:  # a repeated wall time: its first occurrence only
            return True
        # Right after a spring-forward gap: fire if any skipped wall-clock minute matches.
        minute_before = datetime.datetime.fromtimestamp(moment - 60, zone).replace(tzinfo=None, fold=0)
        skipped = minute_before + datetime.timedelta(minutes=1)
        while skipped < wall:
            if self.matches(skipped):
                return True
            skipped += datetime.timedelta(minutes=1)
        return False


def _exists(year: int, month: int, day: int) -> bool:
    try:
        datetime.date(year, month, day)
    except ValueError:
        return False
    return True


MONTH_NAMES = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
WEEKDAY_NAMES = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")


def random_field(
    rng: random.Random, low: int, high: int, star_weight: float, names: dict[int, str]
) -> tuple[str, set[int]]:
    """A random field's text and the values it stands for."""

    def value_text(value: int) -> str:
        if value in names and rng.random() < 0.5:
            name = names[value]
            return name.upper() if rng.random() < 0.3 else name
        return str(value)

    def item() -> tuple[str, set[int]]:
        kind = rng.choice(("single", "single", "range", "range-step", "star-step"))
        if kind == "single":
            value = rng.randint(low, high)
            return value_text(value), {value}
        if kind == "star-step":
            step = rng.randint(1, min(high - low + 1, 20))
            return f"*/{step}", set(range(low, high + 1, step))
        first, last = sorted((rng.randint(low, high), rng.randint(low, high)))
        if kind == "range":
            return f"{value_text(first)}-{value_text(last)}", set(range(first, last + 1))
        step = rng.randint(1, max(1, last - first))
        return f"{value_text(first)}-{value_text(last)}/{step}", set(range(first, last + 1, step))

    if rng.random() < star_weight:
        return "*", set(range(low, high + 1))
    pieces = [item() for _ in range(rng.choice((1, 1, 2, 3)))]
    return ",".join(text for text, _ in pieces), set().union(*(values for _, values in pieces))


def random_expression(rng: random.Random) -> tuple[str, Model]:
    minute_text, minutes = random_field(rng, 0, 59, 0.3, {})
    hour_text, hours = random_field(rng, 0, 23, 0.6, {})
    day_text, days = random_field(rng, 1, 31, 0.6, {})
    month_text, months = random_field(rng, 1, 12, 0.75, dict(enumerate(MONTH_NAMES, start=1)))
    if rng.random() < 0.1:  # month ends, February 29 and dates that never exist
        day_text, days = rng.choice((("29", {29}), ("30", {30}), ("31", {31}), ("30-31", {30, 31})))
        month_text, months = rng.choice(
            (("2", {2}), ("feb", {2}), ("4,jun", {4, 6}), ("9-11/2", {9, 11}), ("*", set(range(1, 13))))
        )
    weekday_text, weekdays = random_field(rng, 0, 7, 0.6, dict(enumerate(WEEKDAY_NAMES)))
    if 7 in weekdays:
        weekdays = (weekdays - {7}) | {0}
    model = Model(
        minutes=frozenset(minutes),
        hours=frozenset(hours),
        days=frozenset(days),
        months=frozenset(months),
        weekdays=frozenset(weekdays),
        days_starred=day_text.startswith("*"),
        weekdays_starred=weekday_text.startswith("*"),
        wildcard=minute_text.startswith("*") or hour_text.startswith("*"),
    )
    return f"{minute_text} {hour_text} {day_text} {month_text} {weekday_text}", model


def random_expression_near_dst_changes(rng: random.Random) -> tuple[str, Model]:
    """Expressions that fire every day in the small hours, where the changes happen, fixed-time and wildcard
    alike."""
    minute_text, minutes = random_field(rng, 0, 59, 0.2, {})
    if rng.random() < 0.3:
        step = rng.choice((1, 2, 3))
        hour_text, hours = ("*", set(range(24))) if step == 1 else (f"*/{step}", set(range(0, 24, step)))
    else:
        hour_text, hours = random_field(rng, 0, 4, 0.0, {})  # "2", "1-3", "0-4/2", "2,3", ...
        if "*" in hour_text:  # a */step item over 0-4 would not mean what the model says
            hour_text, hours = "1-3", {1, 2, 3}
    model = Model(
        minutes=frozenset(minutes),
        hours=frozenset(hours),
        days=frozenset(range(1, 32)),
        months=frozenset(range(1, 13)),
        weekdays=frozenset(range(7)),
        days_starred=True,
        weekdays_starred=True,
        wildcard=minute_text.startswith("*") or hour_text.startswith("*"),
    )
    return f"{minute_text} {hour_text} * * *", model


def offset_changes(zone: zoneinfo.ZoneInfo, year: int) -> list[int]:
    """The instants in `year` at which the zone's UTC offset changes (found hour by hour, then to the minute)."""

    def offset(moment: int) -> datetime.timedelta | None:
        return datetime.datetime.fromtimestamp(moment, zone).utcoffset()

    start = int(datetime.datetime(year, 1, 1, tzinfo=datetime.UTC).timestamp())
    changes = []
    for hour_start in range(start, start + 366 * 86400, 3600):
        if offset(hour_start) != offset(hour_start + 3600):
            low, high = hour_start, hour_start + 3600
            while high - low > 60:
                middle = (low + high) // 120 * 60
                low, high = (middle, high) if offset(middle) == offset(low) else (low, middle)
            changes.append(high)
    return changes


# Zones with DST (one with a half-hour offset, one with a half-hour DST shift) and without.
RANDOM_ZONES = ("UTC", NY, BERLIN, KOLKATA, "America/St_Johns", "Australia/Lord_Howe")
DST_ZONES = (NY, BERLIN, "America/St_Johns", "Australia/Lord_Howe")
BRUTE_FORCE_LIMIT = 36 * 3600  # seconds of gap checked minute by minute


class RandomExpressions(unittest.TestCase):
    """next_after() from random instants: after the instant, firing by the model, and nothing fires between."""

    def setUp(self) -> None:
        self.zones = {name: zoneinfo.ZoneInfo(name) for name in RANDOM_ZONES}
        self.changes = {name: offset_changes(zone, 2026) for name, zone in self.zones.items()}
        self.seen: collections.Counter[str] = collections.Counter()

    def check_from(self, expression: str, model: Model, tz: str, moment: float, steps: int) -> None:
        """next_after() from `moment`, then from each result again (strictly after: never the same time twice)."""
        schedule = nodeflow.CronSchedule.parse(expression, tz)
        zone = self.zones[tz]
        for _ in range(steps):
            result = schedule.next_after(moment)
            context = f"{expression!r} in {tz} after {shown(moment, tz)}: {shown(result, tz)}"
            self.assertGreater(result, moment, context)
            self.assertEqual(result % 60, 0, context)
            self.assertTrue(model.fires(int(result), zone), context)
            if result - moment <= BRUTE_FORCE_LIMIT:
                first_minute = int(moment) // 60 * 60 + 60
                for minute in range(first_minute, int(result), 60):
                    self.assertFalse(model.fires(minute, zone), f"{context}, but {shown(minute, tz)} fires")
                self.seen["brute-forced"] += 1
            local = datetime.datetime.fromtimestamp(result, zone)
            if not model.matches(local.replace(tzinfo=None, fold=0)):
                self.seen["after a gap"] += 1
            if local.fold:
                self.seen["in a repeated hour's second pass"] += 1
            if any(moment < change <= result for change in self.changes[tz]):
                self.seen["across a change"] += 1
            moment = result

    def random_moment(self, rng: random.Random, tz: str, near_changes: float) -> float:
        if self.changes[tz] and rng.random() < near_changes:
            moment = rng.choice(self.changes[tz]) + rng.uniform(-2 * 3600, 2 * 3600)
        else:
            moment = rng.uniform(at("2025-06-01T00:00:00+00:00"), at("2027-06-01T00:00:00+00:00"))
        if rng.random() < 0.5:
            moment = float(int(moment) // 60 * 60)  # whole minutes, which may themselves be firing times
        return moment

    def test_random_expressions(self) -> None:
        rng = random.Random(20260308)
        self.assertEqual(len(self.changes[NY]), 2)
        self.assertEqual(len(self.changes["Australia/Lord_Howe"]), 2)
        for _ in range(200):
            expression, model = random_expression(rng)
            tz = rng.choice(RANDOM_ZONES)
            if not model.can_fire():
                with self.assertRaises(nodeflow.InvalidInput, msg=expression):
                    nodeflow.CronSchedule.parse(expression, tz)
                self.seen["refused"] += 1
                continue
            self.check_from(expression, model, tz, self.random_moment(rng, tz, 0.5), 3)
        self.assertGreater(self.seen["brute-forced"], 300, self.seen)
        self.assertGreater(self.seen["refused"], 0, self.seen)

    def test_random_expressions_near_dst_changes(self) -> None:
        rng = random.Random(20261025)
        for _ in range(400):
            expression, model = random_expression_near_dst_changes(rng)
            tz = rng.choice(DST_ZONES)
            self.check_from(expression, model, tz, self.random_moment(rng, tz, 1.0), 3)
        for what in ("after a gap", "in a repeated hour's second pass", "across a change"):
            self.assertGreater(self.seen[what], 20, self.seen)


if __name__ == "__main__":
    unittest.main()
