"""The per-client rate limit through create_app: 429 OperationOutcome with Retry-After.

In memory: one budget per authenticated client (else per address), probes exempt, a broken
storage fails open to per-process counting. On a real Redis at 127.0.0.1:6379 (skipped with the
reason when none answers, failed under CI=true): two app instances share one counter.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from flask import Flask
from flask.testing import FlaskClient

from fhirbridge import create_app
from fhirbridge.api import ratelimit
from fhirbridge.auth.apikeys import entry, new_key
from fhirbridge.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
REDIS_URL = "redis://127.0.0.1:6379/0"
LIMIT = "3/minute"
KEY_A, KEY_B, KEY_LOOPBACK = new_key(), new_key(), new_key()
API_KEYS = [
    entry(KEY_A, "client-a", ["fhir.read"]),
    entry(KEY_B, "client-b", ["fhir.read"]),
    # a client id that looks like an address must not share the address's bucket
    entry(KEY_LOOPBACK, "127.0.0.1", ["fhir.read"]),
]
ROUTE = "/fhir/Patient?_count=1"

AppFactory = Callable[..., Flask]


@pytest.fixture
def make_app(tmp_path: Path) -> Iterator[AppFactory]:
    apps: list[Flask] = []

    def make(**overrides: Any) -> Flask:
        settings: dict[str, Any] = {
            "database_url": f"sqlite:///{tmp_path / f'db{len(apps)}.sqlite'}",
            "mappings_dir": ROOT / "mappings",
            "db_auto_upgrade": True,
            "rate_limit": LIMIT,
        }
        app = create_app(Settings(**{**settings, **overrides}))
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.extensions["fhirbridge"].store.close()


def _key(key: str) -> dict[str, str]:
    return {"X-API-Key": key}


def _throttled(resp: Any, limit: str = LIMIT) -> int:
    """The answer is the 429 OperationOutcome; returns its Retry-After (whole seconds)."""
    assert resp.status_code == 429, resp.get_data(as_text=True)
    assert resp.mimetype == "application/fhir+json"
    body = resp.get_json()
    assert body["resourceType"] == "OperationOutcome"
    assert [i["code"] for i in body["issue"]] == ["throttled"]
    assert limit in body["issue"][0]["diagnostics"]
    retry_after = resp.headers["Retry-After"]
    assert retry_after.isdigit(), retry_after  # whole seconds, not an HTTP date
    assert 1 <= int(retry_after) <= 60
    return int(retry_after)


def _spend(client: FlaskClient, n: int, path: str = ROUTE, **kw: Any) -> None:
    for i in range(n):
        resp = client.get(path, **kw)
        assert resp.status_code != 429, f"request {i + 1} of {n} throttled"


# ---------------------------------------------------------------- in memory


def test_fourth_request_is_429_with_retry_after(make_app: AppFactory) -> None:
    client = make_app().test_client()
    _spend(client, 3)
    _throttled(client.get(ROUTE))
    # the budget is per caller, not per route: every route is now refused
    _throttled(client.post("/fhir/$validate", json={"resourceType": "Patient"}))
    assert "Retry-After" not in make_app().test_client().get(ROUTE).headers  # only on a 429


def test_probes_are_never_throttled(make_app: AppFactory) -> None:
    client = make_app().test_client()
    _spend(client, 3)
    _throttled(client.get(ROUTE))
    for _ in range(5):
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 200


def test_each_client_id_has_its_own_bucket(make_app: AppFactory) -> None:
    client = make_app(auth_api_keys=API_KEYS).test_client()
    _spend(client, 3, headers=_key(KEY_A))
    _throttled(client.get(ROUTE, headers=_key(KEY_A)))
    _spend(client, 3, headers=_key(KEY_B))  # client-b is untouched by client-a's spending
    _throttled(client.get(ROUTE, headers=_key(KEY_B)))
    # anonymous callers of a public route count by address (127.0.0.1), even though a client
    # whose id is "127.0.0.1" spends its own budget
    _spend(client, 3, headers=_key(KEY_LOOPBACK))
    _throttled(client.get(ROUTE, headers=_key(KEY_LOOPBACK)))
    _spend(client, 3, path="/fhir/metadata")
    _throttled(client.get("/fhir/metadata"))


def test_unauthenticated_callers_count_by_address(make_app: AppFactory) -> None:
    client = make_app().test_client()
    first = {"environ_base": {"REMOTE_ADDR": "127.0.0.1"}}
    second = {"environ_base": {"REMOTE_ADDR": "127.0.0.2"}}
    _spend(client, 3, **first)
    _throttled(client.get(ROUTE, **first))
    _spend(client, 3, **second)


def test_unrouted_requests_count_too(make_app: AppFactory) -> None:
    client = make_app().test_client()
    assert client.get("/no/such/route").status_code == 404
    assert client.delete("/healthz").status_code == 405  # a probe's path, but not a probe
    assert client.get("/no/such/route").status_code == 404
    _throttled(client.get("/no/such/route"))


def test_an_empty_rate_limit_turns_it_off(make_app: AppFactory) -> None:
    app = make_app(rate_limit="")
    assert ratelimit.EXTENSION not in app.extensions
    _spend(app.test_client(), 10)


def test_a_bad_limit_stops_start_up(make_app: AppFactory) -> None:
    with pytest.raises(ValueError, match="couldn't parse rate limit string"):
        make_app(rate_limit="three per minute")


def test_an_unreachable_storage_fails_open_to_per_process_counting(
    make_app: AppFactory, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        client = make_app(rate_limit_storage_url="redis://127.0.0.1:1/0").test_client()
        assert "rate-limit storage unreachable at start-up" in caplog.text
        _spend(client, 3)  # served, not 500: the API stays up
        assert "falling back to in-memory storage" in caplog.text
        _throttled(client.get(ROUTE))  # and still limited, in this process's memory


# ---------------------------------------------------------------- real Redis


@pytest.fixture
def redis_prefix(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A key prefix of this test alone on the Redis at 127.0.0.1:6379 (its keys removed after)."""
    conn = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1, socket_timeout=1)
    try:
        conn.ping()
    except redis.RedisError as exc:
        reason = f"Redis not reachable at {REDIS_URL}: {type(exc).__name__}: {exc}"
        conn.close()
        if os.environ.get("CI") == "true":
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    prefix = f"fhirbridge-test-{uuid.uuid4().hex}"
    monkeypatch.setattr(ratelimit, "KEY_PREFIX", prefix)
    try:
        yield prefix
    finally:
        for key in conn.scan_iter(match=f"*{prefix}*"):
            conn.delete(key)
        conn.close()


def _keys(prefix: str) -> list[bytes]:
    conn = redis.Redis.from_url(REDIS_URL)
    try:
        return list(conn.scan_iter(match=f"*{prefix}*"))
    finally:
        conn.close()


def test_two_instances_share_one_counter_in_redis(make_app: AppFactory, redis_prefix: str) -> None:
    first = make_app(rate_limit_storage_url=REDIS_URL).test_client()
    second = make_app(rate_limit_storage_url=REDIS_URL).test_client()
    _spend(first, 1)
    _spend(second, 1)
    _spend(first, 1)
    retry_after = _throttled(second.get(ROUTE))  # the 4th request, counted across both
    _throttled(first.get(ROUTE))
    assert retry_after > 30  # the window opened with the first request, moments ago
    assert _keys(redis_prefix), "the counter is not in Redis"


def test_client_buckets_are_separate_in_redis(make_app: AppFactory, redis_prefix: str) -> None:
    settings = {"rate_limit_storage_url": REDIS_URL, "auth_api_keys": API_KEYS}
    first, second = make_app(**settings).test_client(), make_app(**settings).test_client()
    _spend(first, 2, headers=_key(KEY_A))
    _spend(second, 1, headers=_key(KEY_A))
    _throttled(first.get(ROUTE, headers=_key(KEY_A)))
    _spend(second, 3, headers=_key(KEY_B))
    _throttled(first.get(ROUTE, headers=_key(KEY_B)))
    assert len(_keys(redis_prefix)) == 2  # one counter per client
