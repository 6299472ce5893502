"""FHIR date, dateTime and instant values as inclusive ranges of UTC microseconds (pure).

Every FHIR date value denotes a range fixed by its precision: "2026" is the whole year,
"2026-03-01T10:15:00+01:00" the whole second 09:15:00Z. `parse_range` returns that range as
(lo, hi), both inclusive, in microseconds since 1970-01-01T00:00:00Z, so values written with
different offsets compare correctly. Values without an offset (dates, and times that lack one)
are taken as UTC, the server's timezone.
"""

from __future__ import annotations

import calendar
import re
from datetime import UTC, date, datetime, timedelta

__all__ = [
    "MAX_US",
    "MIN_US",
    "format_instant",
    "micros",
    "micros_to_datetime",
    "parse_range",
]

SECOND = 1_000_000
MINUTE = 60 * SECOND
HOUR = 60 * MINUTE
DAY = 24 * HOUR
# Open ends of a Period (a missing start or end): beyond any representable FHIR date.
MIN_US = -(2**62)
MAX_US = 2**62 - 1

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()
_ONE_US = timedelta(microseconds=1)

_DATE_RE = re.compile(
    r"(?P<y>\d{4})"
    r"(?:-(?P<m>\d{2})"
    r"(?:-(?P<d>\d{2})"
    r"(?:T(?P<H>\d{2}):(?P<M>\d{2})(?::(?P<S>\d{2})(?:\.(?P<f>\d{1,9}))?)?"
    r"(?P<tz>Z|[+-]\d{2}:\d{2})?"
    r")?)?)?",
    re.ASCII,
)


def _day_start(y: int, m: int, d: int) -> int:
    return (date(y, m, d).toordinal() - _EPOCH_ORDINAL) * DAY


def _offset_us(tz: str | None) -> int:
    if tz is None or tz == "Z":
        return 0
    hours, minutes = int(tz[1:3]), int(tz[4:6])
    if hours > 14 or minutes > 59:
        raise ValueError("timezone offset out of range")
    value = hours * HOUR + minutes * MINUTE
    return -value if tz[0] == "-" else value


def parse_range(text: str) -> tuple[int, int]:
    """The inclusive UTC range, in µs, that a FHIR date/dateTime/instant denotes.

    Accepts YYYY, YYYY-MM, YYYY-MM-DD and YYYY-MM-DDThh:mm[:ss[.fff…]][Z|±hh:mm] (minute
    precision is allowed for search values). Raises ValueError (without quoting the input).
    """
    match = _DATE_RE.fullmatch(text)
    if match is None:
        raise ValueError("not a FHIR date, dateTime or instant")
    year = int(match["y"])
    if year < 1:
        raise ValueError("year out of range")
    if match["m"] is None:
        lo = _day_start(year, 1, 1)
        return lo, lo + (366 if calendar.isleap(year) else 365) * DAY - 1
    month = int(match["m"])
    if not 1 <= month <= 12:
        raise ValueError("month out of range")
    if match["d"] is None:
        lo = _day_start(year, month, 1)
        return lo, lo + calendar.monthrange(year, month)[1] * DAY - 1
    day = int(match["d"])
    if not 1 <= day <= calendar.monthrange(year, month)[1]:
        raise ValueError("day out of range")
    lo = _day_start(year, month, day)
    if match["H"] is None:
        return lo, lo + DAY - 1
    hour, minute = int(match["H"]), int(match["M"])
    if hour > 23 or minute > 59:
        raise ValueError("time out of range")
    lo += hour * HOUR + minute * MINUTE
    unit = MINUTE
    if match["S"] is not None:
        second = int(match["S"])
        if second > 59:
            raise ValueError("time out of range")
        lo += second * SECOND
        unit = SECOND
        fraction = match["f"]
        if fraction is not None:
            digits = fraction[:6]
            lo += int(digits) * 10 ** (6 - len(digits))
            unit = 10 ** (6 - len(digits))
    lo -= _offset_us(match["tz"])
    return lo, lo + unit - 1


def micros(value: datetime) -> int:
    """µs since the epoch of a timezone-aware datetime."""
    if value.tzinfo is None:
        raise ValueError("naive datetime: pass a timezone-aware value")
    return (value - _EPOCH) // _ONE_US


def micros_to_datetime(us: int) -> datetime:
    """The aware UTC datetime for µs since the epoch."""
    return _EPOCH + timedelta(microseconds=us)


def format_instant(us: int) -> str:
    """A FHIR instant with millisecond precision and an explicit offset, e.g.
    2026-11-25T04:40:12.123+00:00 (sub-millisecond digits are truncated)."""
    return micros_to_datetime(us - us % 1000).isoformat(timespec="milliseconds")
