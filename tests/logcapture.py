"""Capture what fhirbridge.logs writes (the formatted lines ops would see), then put logging back.

``captured_logs(level, fmt)`` configures the root logger through ``fhirbridge.logs.configure``
with a StringIO as its stream and yields that StringIO; on exit the root handler, the root level
and the levels of the quiet third-party loggers are what they were before.
``json_lines(text)`` parses every line as one JSON object (a line that is not fails the test).
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from fhirbridge import logs


@contextmanager
def captured_logs(level: str = "DEBUG", fmt: logs.Format = "json") -> Iterator[io.StringIO]:
    root = logging.getLogger()
    ours = [h for h in root.handlers if isinstance(h, logs._RootHandler)]
    root_level = root.level
    quiet = {name: logging.getLogger(name).level for name in logs.QUIET_LOGGERS}
    buffer = io.StringIO()
    logs.configure(level, fmt, stream=buffer)
    try:
        yield buffer
    finally:
        for handler in [h for h in root.handlers if isinstance(h, logs._RootHandler)]:
            root.removeHandler(handler)
        for handler in ours:
            root.addHandler(handler)
        root.setLevel(root_level)
        for name, saved in quiet.items():
            logging.getLogger(name).setLevel(saved)


def json_lines(text: str) -> list[dict[str, Any]]:
    """Every line of `text` as a JSON object, in order."""
    out: list[dict[str, Any]] = []
    for number, line in enumerate(text.splitlines(), 1):
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise AssertionError(f"log line {number} is not JSON ({exc}): {line[:300]!r}") from None
        assert isinstance(value, dict), f"log line {number} is not a JSON object: {line[:300]!r}"
        out.append(value)
    return out
