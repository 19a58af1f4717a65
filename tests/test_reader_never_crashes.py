"""Reconcile's (and rollback's) own timestamp reader never takes the process
down, whatever the backup holds, and answers as the per-row rules do.

The reader runs in a worker process of its own: a crash there (NumPy's datetime parser
segfaulted on an impossible date among a thousand texts) is reported as a failure with the
texts that caused it, instead of killing the test run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sessionmig.rules.transform import RowProblem, parse_timestamp
from sessionmig.sqlite.wire import pg_micros

ZONES = ("UTC", "Asia/Seoul", "America/New_York", "Australia/Lord_Howe")

WORKER = r"""
import json, sys
from zoneinfo import ZoneInfo
from sessionmig.sqlite.expected import ExpectedPath

readers = {}
for line in sys.stdin:
    ask = json.loads(line)
    zone = ask["zone"]
    reader = readers.setdefault(zone, ExpectedPath(ZoneInfo(zone)))
    values, ok = reader.instants([bytes.fromhex(t) for t in ask["texts"]])
    print(json.dumps({"values": [int(v) for v in values], "ok": [bool(b) for b in ok]}),
          flush=True)
"""


class Reader:
    """ExpectedPath.instants in a worker process, started again after a crash."""

    def __init__(self) -> None:
        self.process: subprocess.Popen[str] | None = None

    def _start(self) -> subprocess.Popen[str]:
        if self.process is None or self.process.poll() is not None:
            self.process = subprocess.Popen(
                [sys.executable, "-c", WORKER],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                env={**os.environ, "PYTHONFAULTHANDLER": ""},
            )
        return self.process

    def instants(self, texts: list[bytes], zone: str) -> tuple[list[int], list[bool]]:
        process = self._start()
        assert process.stdin is not None and process.stdout is not None
        ask = json.dumps({"zone": zone, "texts": [t.hex() for t in texts]})
        try:
            process.stdin.write(ask + "\n")
            process.stdin.flush()
            line = process.stdout.readline()
        except BrokenPipeError:
            line = ""
        if not line:
            code = process.wait(timeout=30)
            shown = [t for t in texts if not _plain_and_real(t)][:10]
            pytest.fail(
                f"the reader's process died (exit {code}) on {len(texts)} texts in {zone}; "
                f"the texts that are not plain among them: {shown!r}"
            )
        answer = json.loads(line)
        return answer["values"], answer["ok"]

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.close()
            self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def reader() -> Iterator[Reader]:
    worker = Reader()
    yield worker
    worker.close()


def _plain_and_real(text: bytes) -> bool:
    """``YYYY-MM-DD HH:MM:SS[.ffffff]`` naming a real wall-clock time, year 1 or later."""
    try:
        decoded = text.decode("ascii")
    except UnicodeDecodeError:
        return False
    if len(decoded) not in (19, 26) or not decoded.isprintable():
        return False
    shape = "0000-00-00 00:00:00.000000"[: len(decoded)]
    for have, want in zip(decoded, shape, strict=True):
        if (want == "0") != have.isdigit() or (want != "0" and have != want):
            return False
        if want == "0" and have not in "0123456789":
            return False
    try:
        datetime.fromisoformat(decoded)
    except ValueError:
        return False
    return True


def _rules(text: bytes, zone: ZoneInfo) -> int | None:
    """The per-row rules' instant (``timestamptz``'s binary value), None for a reject."""
    try:
        return pg_micros(parse_timestamp(text, "text", "t", zone))
    except RowProblem:
        return None


def _check(reader: Reader, texts: list[bytes], zone_name: str) -> None:
    zone = ZoneInfo(zone_name)
    values, ok = reader.instants(texts, zone_name)
    assert len(values) == len(ok) == len(texts)
    for text, value, sure in zip(texts, values, ok, strict=True):
        expected = _rules(text, zone)
        if sure:
            # What the reader is sure of, the rules say too, to the microsecond.
            assert expected is not None and value == expected, (text, value, expected)
        if zone_name == "UTC" and _plain_and_real(text):
            # Every plain, real text is read without the rules where no hour is ambiguous.
            assert sure, text


# --- the crash itself, as found --------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 999, 1000, 5000])
@pytest.mark.parametrize("impossible", [b"2025-02-30 10:00:00", b"2025-02-30 10:00:00.123456"])
def test_an_impossible_date_among_many_texts_never_kills_the_reader(reader, n, impossible):
    texts = [b"2026-01-15 10:00:00" if i % 3 else b"2026-01-15 10:00:00.250000" for i in range(n)]
    texts[n // 2] = impossible
    values, ok = reader.instants(texts, "Asia/Seoul")
    assert ok[n // 2] is False
    assert sum(ok) == n - 1


@pytest.mark.parametrize(
    "bad",
    [
        b"2026-02-29 00:00:00",  # not a leap year
        b"1900-02-29 00:00:00",  # a century that is not one either
        b"2026-04-31 00:00:00",
        b"2026-13-01 00:00:00",
        b"2026-00-10 00:00:00",
        b"2026-01-00 00:00:00",
        b"2026-01-15 24:00:00",
        b"2026-01-15 23:60:00",
        b"2026-01-15 23:59:60",
        b"2026-01-15 23:59:60.000000",
        b"0000-01-01 00:00:00",
        b"9999-12-32 00:00:00.000000",
    ],
)
def test_every_impossible_field_is_left_to_the_rules(reader, bad) -> None:
    texts = [b"2024-02-29 12:00:00.000001"] * 1200 + [bad] + [b"2000-02-29 00:00:00"] * 300
    values, ok = reader.instants(texts, "UTC")
    assert ok[1200] is False and all(ok[:1200]) and all(ok[1201:])
    assert _rules(bad, ZoneInfo("UTC")) is None


# --- property: any texts, any mix, any length --------------------------------------------------

DIGITS = st.text(alphabet="0123456789", min_size=1, max_size=1)


def _spelled(fields: list[int], micros: bool) -> bytes:
    y, mo, d, h, mi, s, us = fields
    text = f"{y:04d}-{mo:02d}-{d:02d} {h:02d}:{mi:02d}:{s:02d}"
    return (text + f".{us:06d}" if micros else text).encode()


# Texts of the plain shape with any two-digit fields (most impossible), real ones, and any bytes.
shaped = st.builds(
    _spelled,
    st.tuples(
        st.integers(0, 9999),
        st.integers(0, 99),
        st.integers(0, 99),
        st.integers(0, 99),
        st.integers(0, 99),
        st.integers(0, 99),
        st.integers(0, 999_999),
    ).map(list),
    st.booleans(),
)
real = st.builds(
    lambda moment, micros: moment.isoformat(
        " ", timespec="microseconds" if micros else "seconds"
    ).encode(),
    st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30)),
    st.booleans(),
)
near = st.builds(
    lambda text, at, byte: text[:at] + bytes([byte]) + text[at + 1 :],
    real,
    st.integers(0, 26),
    st.integers(0, 255),
)
anything = st.one_of(
    st.binary(max_size=30),
    st.text(max_size=30).map(lambda t: t.encode("utf-8", "surrogatepass")),
)
texts = st.one_of(shaped, real, near, anything)


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    chosen=st.lists(texts, min_size=1, max_size=24),
    padding=st.integers(0, 1600),
    at=st.randoms(use_true_random=False),
    zone=st.sampled_from(ZONES),
)
def test_the_reader_answers_as_the_rules_for_any_mix(reader, chosen, padding, at, zone) -> None:
    base = datetime(2026, 1, 15, 10, tzinfo=UTC).replace(tzinfo=None)
    fill = [
        (base + timedelta(seconds=7 * i, microseconds=i % 5))
        .isoformat(" ", timespec="microseconds" if i % 2 else "seconds")
        .encode()
        for i in range(padding)
    ]
    mixed = fill + chosen
    at.shuffle(mixed)
    _check(reader, mixed, zone)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(chosen=st.lists(texts, min_size=1, max_size=60), zone=st.sampled_from(ZONES))
def test_the_reader_answers_as_the_rules_for_few_texts(reader, chosen, zone) -> None:
    _check(reader, chosen, zone)
