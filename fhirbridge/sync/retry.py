"""Retries as values: backoff with jitter, Retry-After, and what to do after a failed delivery.

Pure: no I/O, no clock (`now` and the random source are passed in).

`attempts` counts the sends made so far, the failed one included, so the delay before the second
send is `delay(1)`. A TransientError is retried until `max_attempts` sends were made. A write whose
outcome is unknown is never re-sent blind: the decision is to resolve it by a search first.
"""

from __future__ import annotations

import email.utils
import math
import random
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

from fhirbridge.ehr.errors import (
    EMPTY_OUTCOME,
    EhrError,
    OutcomeSummary,
    OutcomeUnknownError,
    TransientError,
)

Jitter = Literal["full", "equal", "none"]
_JITTERS = ("full", "equal", "none")
_DELTA_SECONDS = re.compile(r"[0-9]+")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff, capped, with jitter; a server's Retry-After is a floor.

    The backoff before send n+1 is min(max_delay, base_delay * factor ** (n - 1)). "full" jitter
    draws uniformly from [0, backoff], "equal" from [backoff / 2, backoff], "none" uses it as is.
    Retry-After is honoured up to max_retry_after, which may exceed max_delay.
    """

    base_delay: float = 1.0
    factor: float = 2.0
    max_delay: float = 300.0
    max_attempts: int = 8
    jitter: Jitter = "full"
    max_retry_after: float = 3600.0

    def __post_init__(self) -> None:
        if not 0 < self.base_delay <= self.max_delay:
            raise ValueError("need 0 < base_delay <= max_delay")
        if self.factor < 1:
            raise ValueError("factor must be >= 1")
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        if self.jitter not in _JITTERS:
            raise ValueError(f"jitter must be one of {', '.join(_JITTERS)}")
        if self.max_retry_after < 0:
            raise ValueError("max_retry_after must be >= 0")

    def backoff(self, attempt: int) -> float:
        """The capped exponential delay after `attempt` sends, before jitter."""
        if attempt < 1:
            raise ValueError("attempt counts sends made and starts at 1")
        try:
            raw = self.base_delay * self.factor ** (attempt - 1)
        except OverflowError:
            raw = math.inf
        return min(self.max_delay, raw)

    def delay(self, attempt: int, *, retry_after: float | None = None, rng: random.Random) -> float:
        """Seconds to wait after `attempt` sends; never less than the server's Retry-After."""
        cap = self.backoff(attempt)
        if self.jitter == "full":
            wait = rng.uniform(0.0, cap)
        elif self.jitter == "equal":
            wait = cap / 2 + rng.uniform(0.0, cap / 2)
        else:
            wait = cap
        if retry_after is not None and retry_after > 0:  # also skips NaN
            wait = max(wait, min(retry_after, self.max_retry_after))
        return wait

    def exhausted(self, attempts: int) -> bool:
        """True once `attempts` sends were made and no more are allowed."""
        return attempts >= self.max_attempts


DEFAULT_POLICY = RetryPolicy()


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds or an HTTP-date.

    A date in the past gives 0.0 (retry now); a missing, negative, fractional or garbled value
    gives None. `now` must be timezone-aware.
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    if value is None:
        return None
    value = value.strip()
    if _DELTA_SECONDS.fullmatch(value):
        return float(value)
    if not value:
        return None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # "-0000" parses naive; HTTP-dates are GMT
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - now).total_seconds())


@dataclass(frozen=True, slots=True)
class RetryAt:
    """Send again at `at` (`delay` seconds after the failure)."""

    at: datetime
    delay: float


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """Stop: sending again will not help. `reason` and `summary` are PHI-free."""

    reason: str
    code: str
    status: int | None = None
    summary: OutcomeSummary = EMPTY_OUTCOME


@dataclass(frozen=True, slots=True)
class ResolveUnknown:
    """A write may have landed: at `at`, search for it before anything else.

    If the search finds it, the delivery succeeded. If not, send again only when `may_resend`;
    otherwise dead-letter it (the attempts are used up).
    """

    at: datetime
    reason: str
    may_resend: bool


Decision = RetryAt | DeadLetter | ResolveUnknown


def decide(
    error: BaseException,
    attempts: int,
    now: datetime,
    rng: random.Random,
    *,
    policy: RetryPolicy = DEFAULT_POLICY,
) -> Decision:
    """What to do after the `attempts`-th send failed with `error`."""
    if isinstance(error, OutcomeUnknownError):
        wait = policy.delay(attempts, rng=rng)
        return ResolveUnknown(
            at=now + timedelta(seconds=wait),
            reason=str(error),
            may_resend=not policy.exhausted(attempts),
        )
    if isinstance(error, TransientError):
        if policy.exhausted(attempts):
            return DeadLetter(
                reason=f"gave up after {attempts} attempts: {error}",
                code="retries_exhausted",
                status=error.status,
                summary=error.summary,
            )
        wait = policy.delay(attempts, retry_after=error.retry_after, rng=rng)
        return RetryAt(at=now + timedelta(seconds=wait), delay=wait)
    if isinstance(error, EhrError):
        return DeadLetter(
            reason=str(error), code=error.code, status=error.status, summary=error.summary
        )
    # Not an error of the delivery: its text may quote data, so keep only its type.
    return DeadLetter(reason=f"unexpected {type(error).__name__}", code="internal")
