"""Backoff sequences, jitter bounds, Retry-After parsing and the retry decision (all pure)."""

from __future__ import annotations

import math
import random
from datetime import UTC, datetime, timedelta

import pytest

from fhirbridge.ehr.errors import (
    ConflictError,
    InvalidResponseError,
    IssueSummary,
    OutcomeSummary,
    OutcomeUnknownError,
    RejectedError,
    TransientError,
)
from fhirbridge.sync.retry import (
    DeadLetter,
    ResolveUnknown,
    RetryAt,
    RetryPolicy,
    decide,
    parse_retry_after,
)

NOW = datetime(2025, 3, 4, 12, 0, 0, tzinfo=UTC)
NO_JITTER = RetryPolicy(jitter="none")


@pytest.mark.parametrize(
    ("attempt", "expected"),
    [
        (1, 1.0),  # first failure: base_delay
        (2, 2.0),
        (3, 4.0),
        (4, 8.0),
        (5, 16.0),
        (6, 32.0),
        (7, 64.0),
        (8, 128.0),
        (9, 256.0),  # last step under the cap
        (10, 300.0),  # 512 capped at max_delay
        (11, 300.0),  # stays at the cap
        (10_000, 300.0),  # factor ** 9999 overflows a float: still the cap
    ],
)
def test_backoff_sequence_walks_to_the_cap(attempt: int, expected: float) -> None:
    assert NO_JITTER.backoff(attempt) == expected
    assert NO_JITTER.delay(attempt, rng=random.Random(0)) == expected


def test_backoff_sequence_with_other_parameters() -> None:
    policy = RetryPolicy(base_delay=0.5, factor=3.0, max_delay=20.0, jitter="none")
    rng = random.Random(0)
    assert [policy.delay(n, rng=rng) for n in range(1, 7)] == [0.5, 1.5, 4.5, 13.5, 20.0, 20.0]


def test_full_jitter_is_seeded_and_within_zero_and_the_backoff() -> None:
    policy = RetryPolicy(jitter="full")
    first = [policy.delay(n, rng=random.Random(42)) for n in range(1, 13)]
    again = [policy.delay(n, rng=random.Random(42)) for n in range(1, 13)]
    assert first == again
    # random.Random(42).random() == 0.6394267984578837: uniform(0, cap) == cap * that.
    assert first[0] == pytest.approx(0.6394267984578837)
    assert first[9] == pytest.approx(300 * 0.6394267984578837)
    rng = random.Random(7)
    for attempt in range(1, 13):
        cap = policy.backoff(attempt)
        for _ in range(200):
            assert 0.0 <= policy.delay(attempt, rng=rng) <= cap


def test_equal_jitter_stays_in_the_upper_half() -> None:
    policy = RetryPolicy(jitter="equal")
    rng = random.Random(3)
    for attempt in range(1, 13):
        cap = policy.backoff(attempt)
        samples = [policy.delay(attempt, rng=rng) for _ in range(200)]
        assert all(cap / 2 <= s <= cap for s in samples)
        assert max(samples) - min(samples) > 0  # jitter really spreads


@pytest.mark.parametrize(
    ("policy", "attempt", "retry_after", "expected"),
    [
        (NO_JITTER, 1, 30.0, 30.0),  # the server asks for longer than our backoff: obey
        (NO_JITTER, 5, 3.0, 16.0),  # the server allows sooner than our backoff: keep ours
        (NO_JITTER, 1, 1000.0, 1000.0),  # may exceed max_delay (300)...
        (NO_JITTER, 1, 7200.0, 3600.0),  # ...but not max_retry_after
        (NO_JITTER, 1, math.inf, 3600.0),  # an absurd header value is capped too
        (NO_JITTER, 3, 0.0, 4.0),  # "retry now" is no floor
        (NO_JITTER, 3, math.nan, 4.0),  # nor is a NaN
        (RetryPolicy(max_retry_after=60), 1, 120.0, 60.0),  # a lower ceiling
    ],
)
def test_retry_after_is_a_capped_floor(
    policy: RetryPolicy, attempt: int, retry_after: float, expected: float
) -> None:
    assert policy.delay(attempt, retry_after=retry_after, rng=random.Random(1)) == expected


def test_retry_after_floor_with_full_jitter() -> None:
    policy = RetryPolicy()
    rng = random.Random(5)
    assert all(policy.delay(9, retry_after=250.0, rng=rng) >= 250.0 for _ in range(200))


@pytest.mark.parametrize(
    ("attempts", "exhausted"),
    [(1, False), (7, False), (8, True), (9, True)],
)
def test_exhausted_after_max_attempts(attempts: int, exhausted: bool) -> None:
    assert RetryPolicy().exhausted(attempts) is exhausted


@pytest.mark.parametrize(
    "kwargs",
    [
        {"base_delay": 0},
        {"base_delay": 10, "max_delay": 5},
        {"factor": 0.5},
        {"max_attempts": 0},
        {"jitter": "bogus"},
        {"max_retry_after": -1},
    ],
)
def test_policy_rejects_nonsense(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


def test_attempt_starts_at_one() -> None:
    with pytest.raises(ValueError):
        NO_JITTER.delay(0, rng=random.Random(0))


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("120", 120.0),  # delta-seconds
        ("  5 ", 5.0),  # surrounding whitespace
        ("0", 0.0),
        ("9" * 400, math.inf),  # huge, capped later by the policy
        ("Tue, 04 Mar 2025 12:01:30 GMT", 90.0),  # IMF-fixdate
        ("Tuesday, 04-Mar-25 12:02:00 GMT", 120.0),  # obsolete RFC 850 date
        ("Tue Mar  4 12:00:10 2025", 10.0),  # obsolete asctime date
        ("Tue, 04 Mar 2025 11:00:00 GMT", 0.0),  # in the past: retry now
        ("-5", None),  # negative
        ("1.5", None),  # not delta-seconds
        ("soon", None),  # garbage
        ("Tue, 32 Mar 2025 12:00:00 GMT", None),  # impossible date
        ("", None),
        (None, None),
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value, NOW) == expected


def test_parse_retry_after_needs_an_aware_now() -> None:
    with pytest.raises(ValueError):
        parse_retry_after("5", datetime(2025, 3, 4, 12, 0, 0))


SUMMARY = OutcomeSummary((IssueSummary("error", "invalid", expression=("Patient.birthDate",)),))


def test_transient_error_is_retried_after_the_backoff() -> None:
    decision = decide(TransientError("GET /x: 503", status=503), 3, NOW, random.Random(0))
    assert isinstance(decision, RetryAt)
    assert 0 <= decision.delay <= 4.0
    assert decision.at == NOW + timedelta(seconds=decision.delay)


def test_transient_error_honours_retry_after() -> None:
    error = TransientError(status=429, retry_after=120.0)
    decision = decide(error, 1, NOW, random.Random(0))
    assert isinstance(decision, RetryAt)
    assert decision.at == NOW + timedelta(seconds=120)


def test_transient_error_dead_letters_when_attempts_are_used_up() -> None:
    error = TransientError("POST /fhir/Patient: 500 Internal Server Error", status=500)
    decision = decide(error, 8, NOW, random.Random(0))
    assert decision == DeadLetter(
        reason="gave up after 8 attempts: POST /fhir/Patient: 500 Internal Server Error",
        code="retries_exhausted",
        status=500,
    )


@pytest.mark.parametrize(("attempts", "may_resend"), [(1, True), (7, True), (8, False)])
def test_unknown_outcome_is_resolved_by_a_search_first(attempts: int, may_resend: bool) -> None:
    error = OutcomeUnknownError("POST /fhir/Patient: request sent, no answer")
    decision = decide(error, attempts, NOW, random.Random(0), policy=NO_JITTER)
    assert isinstance(decision, ResolveUnknown)
    assert decision.may_resend is may_resend
    assert decision.at == NOW + timedelta(seconds=NO_JITTER.backoff(attempts))


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (RejectedError("x", status=422, summary=SUMMARY), "ehr_rejected"),
        (ConflictError("x", status=412, summary=SUMMARY), "ehr_conflict"),
        (InvalidResponseError("x", status=200), "ehr_invalid_response"),
    ],
)
def test_rejections_dead_letter_with_the_summary(error: RejectedError, code: str) -> None:
    decision = decide(error, 1, NOW, random.Random(0))
    assert isinstance(decision, DeadLetter)
    assert (decision.code, decision.status, decision.summary) == (
        code,
        error.status,
        error.summary,
    )


def test_unexpected_error_keeps_only_its_type() -> None:
    decision = decide(ValueError("Jane Doe 1962-01-01"), 1, NOW, random.Random(0))
    assert decision == DeadLetter(reason="unexpected ValueError", code="internal")
