"""The one strict reading of client JSON and times, shared by the HTTP API and the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from jobq import wire
from jobq.queue import Queue
from tests.helpers import ROOT


def jobq(*args: str, dsn: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "jobq", *args],
        env={**os.environ, "DATABASE_URL": dsn, "JOBQ_LOG_LEVEL": "WARNING"},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (b'{"a": 1, "a": 2}', "duplicate_key"),
        (b"18446744073709551616", "number_out_of_range"),
        (b"1e-400", "number_out_of_range"),
        (b"1e400", "number_out_of_range"),
        (b"1.00000000000000000001", "number_out_of_range"),
        (b"NaN", "invalid_json"),
        (b'"\xc3"', "invalid_utf8"),
        (b"[" * 5000 + b"]" * 5000, "invalid_json"),
    ],
)
def test_json_that_would_be_read_differently_or_rounded_is_refused(text: bytes, error: str) -> None:
    with pytest.raises(wire.WireError) as refused:
        wire.loads(text)
    assert refused.value.error == error


def test_a_key_given_twice_deeper_than_orjson_writes_is_refused() -> None:
    with pytest.raises(wire.WireError) as refused:
        wire.loads("[" * 300 + '{"a": 1, "a": 2}' + "]" * 300)
    assert refused.value.error == "duplicate_key"


@pytest.mark.parametrize(
    "text",
    [
        '[{"a": 1}, {"b": {"c": 2, "c": 3}}]',
        '{"a": "x:y", "b": 1, "a": "z"}',
        '{"a:b": 1, "a:b": 2}',
        '{"a": {"k": "1:2:3"}, "a": {}}',
        '{"a": "\\u003a", "a": 1}',
        '{"a": 1, "\\u0061": 2}',
    ],
)
def test_a_key_given_twice_is_refused_wherever_it_is(text: str) -> None:
    with pytest.raises(wire.WireError) as refused:
        wire.loads(text)
    assert refused.value.error == "duplicate_key"


@pytest.mark.parametrize(
    "text",
    [
        '{"jobs": [{"kind": "a", "payload": {"i": 1, "f": 0.5, "s": "x:y"}}]}',
        '{"a": -0, "b": -0.0, "c": 1E5, "d": 1.5e-7, "e": 12345678901234567, "f": true}',
        '{"t": "2030-01-31T09:00:00Z", "u": "\\u00e9\\n", "v": [null, {}, []], "w": "ü"}',
        '{"z": 9223372036854775807, "y": 0.30000000000000004, "x": 5e-324}',
        '{"a": "\\u003a", "b": "1e400"}',
    ],
)
def test_a_text_read_either_way_gives_the_strict_reading(text: str) -> None:
    read = wire.loads(text)
    strict = wire._STRICT.decode(text)
    assert read == strict
    assert repr(read) == repr(strict)  # the same types too: 1.0 is not 1


async def test_cli_enqueue_refuses_an_integer_beyond_64_bits_instead_of_rounding_it(
    queue: Queue, dsn: str
) -> None:
    result = jobq("enqueue", "echo", "--payload", '{"n": 18446744073709551616}', dsn=dsn)
    assert result.returncode != 0
    assert "64-bit" in result.stderr
    assert "Traceback" not in result.stderr
    assert await queue.pool.fetchval("SELECT count(*) FROM jobs") == 0


async def test_cli_enqueue_file_refuses_a_line_with_a_duplicate_key(
    queue: Queue, dsn: str, tmp_path: Path
) -> None:
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"kind": "echo"}\n{"kind": "echo", "kind": "other"}\n')
    result = jobq("enqueue-file", str(jobs), dsn=dsn)
    assert result.returncode != 0
    assert "line 2" in result.stderr
    assert "'kind' appears twice" in result.stderr
    assert await queue.pool.fetchval("SELECT count(*) FROM jobs") == 0


@pytest.mark.parametrize("depth", [980, 1000, 1010])
def test_json_nested_deeper_than_the_strict_reader_reaches_is_refused(depth: int) -> None:
    # orjson reads it; the stdlib reader's recursion gave out, and the error escaped.
    with pytest.raises(wire.WireError, match="nested too deeply"):
        wire.loads("[" * depth + "]" * depth)
