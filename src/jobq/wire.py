"""What clients send, read strictly and never changed silently: JSON and RFC 3339 times.

One reading for the HTTP API and the CLI alike:
- JSON text is UTF-8; an invalid byte is reported by offset, line and column.
- An object may not repeat a key (parsers disagree on which one wins).
- Numbers are 64-bit integers (-2**63 .. 2**64-1) or IEEE doubles: an integer beyond 64 bits,
  a decimal with more than 17 significant digits (more than a double holds), or one outside
  the double range (1e400, 1e-400) would come back as a different number, so it is refused.
  NaN and Infinity are not JSON.
- A time is an RFC 3339 date-time with an explicit offset (`Z` or `+hh:mm`), at most
  microsecond precision (what PostgreSQL stores).
"""

from __future__ import annotations

import json
import math
import re
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson

INT_MIN, INT_MAX = -(2**63), 2**64 - 1
FLOAT_DIGITS = 17  # enough to name every double; more cannot all be kept


class WireError(ValueError):
    """Input that jobq will not read. `error` is a machine-readable slug."""

    def __init__(
        self, error: str, message: str, *, reason: str | None = None, column: int | None = None
    ) -> None:
        super().__init__(message)
        self.error = error
        self.message = message
        # For JSON syntax errors: the parser's own words and the 1-based column.
        self.reason = reason
        self.column = column


def decode_utf8(data: bytes, what: str = "the body") -> str:
    """`data` as text, or WireError naming the first byte that is not UTF-8."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        start = exc.start
        line = data.count(b"\n", 0, start) + 1
        column = start - (data.rfind(b"\n", 0, start) + 1) + 1
        raise WireError(
            "invalid_utf8",
            f"{what} is not valid UTF-8: byte 0x{data[start]:02x} at offset {start}"
            f" (line {line}, column {column})",
        ) from None


def _int(text: str) -> int:
    if len(text) <= 18:
        return int(text)  # fast path: 18 characters always fit in 64 bits
    # Python refuses int() of more than 4300 digits; anything over 20 is out of range anyway.
    if len(text.lstrip("-")) > 20 or not INT_MIN <= (value := int(text)) <= INT_MAX:
        shown = text if len(text) <= 40 else f"{text[:20]}…({len(text)} digits)"
        raise WireError(
            "number_out_of_range",
            f"the integer {shown} is outside the 64-bit range (-2^63 to 2^64-1) and would lose"
            " precision; send it as a string",
        )
    return value


def _float(text: str) -> float:
    value = float(text)
    if len(text) <= FLOAT_DIGITS and value != 0.0 and not math.isinf(value):
        return value  # fast path: too short to hold more digits than a double keeps
    shown = text if len(text) <= 40 else f"{text[:30]}…"
    mantissa = re.split("[eE]", text, maxsplit=1)[0].lstrip("-").replace(".", "")
    digits = mantissa.strip("0")
    if len(digits) > FLOAT_DIGITS:
        raise WireError(
            "number_out_of_range",
            f"the number {shown} has {len(digits)} significant digits; a 64-bit float keeps"
            f" {FLOAT_DIGITS}, so it would be rounded: send it as a string",
        )
    if math.isinf(value) or (value == 0.0 and digits):
        raise WireError(
            "number_out_of_range",
            f"the number {shown} is outside the range of a 64-bit float and would become"
            f" {'0' if value == 0.0 else 'infinite'}: send it as a string",
        )
    return value


def _constant(name: str) -> Any:
    raise WireError("invalid_json", f"{name} is not a JSON value")


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise WireError("duplicate_key", f"the key {key!r} appears twice in one object")
            seen.add(key)
    return obj


_STRICT = json.JSONDecoder(
    object_pairs_hook=_object, parse_int=_int, parse_float=_float, parse_constant=_constant
)


# Text in which a number may need the strict reader's checks: a run of 18 characters that can
# make up a number (an integer of 19 digits may exceed 64 bits, a decimal of 18 characters may
# hold more digits than a double), or an exponent of 3 digits (1e400, 1e-400). Found by
# translating the characters (str.translate: a fraction of a regular expression's time); a
# match inside a string only costs the strict reading.
_NUMBER_CHARS = str.maketrans(dict.fromkeys("0123456789.eE+-", "#"))
_RUN = "#" * 18
_EXPONENT_CHARS = str.maketrans({**dict.fromkeys("0123456789", "0"), "E": "e", "-": "+"})


def _number_to_check(text: str) -> bool:
    if _RUN in text.translate(_NUMBER_CHARS):
        return True
    exponents = text.translate(_EXPONENT_CHARS)
    return "e000" in exponents or "e+000" in exponents


def _as_read(text: str, value: Any) -> bool:
    """True when orjson's reading `value` of `text` is the strict reading: no number that
    needs checking, and no key given twice. orjson keeps the last of two equal keys, silently:
    written out again, compact, every key is followed by one colon and string contents keep
    theirs, so a dropped key shows as fewer colons than the text has (unless the text hides
    a colon in a \\u escape: then the strict reader decides)."""
    if "\\u003a" in text or "\\u003A" in text or _number_to_check(text):
        return False
    try:
        again = orjson.dumps(value)
    except orjson.JSONEncodeError:  # orjson writes 254 levels of nesting, reads 1,024
        return False
    return text.count(":") == again.count(b":")


def loads(data: bytes | str, what: str = "the body") -> Any:
    """Parse JSON text strictly (see the module docstring), or raise WireError."""
    text = decode_utf8(data, what) if isinstance(data, bytes | bytearray) else data
    try:
        # orjson first: fast, bounded nesting depth, precise syntax errors; and for most
        # texts its reading is the strict one (`_as_read`), without the stdlib reader's
        # Python call per object and number.
        value = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        syntax = WireError(
            "invalid_json", f"{what} is not JSON: {exc}", reason=exc.msg, column=exc.colno
        )
        try:
            _STRICT.decode(text)  # 1e400 is ours to explain: out of range, not bad syntax
        except WireError as ours:
            raise WireError(ours.error, f"{what}: {ours.message}") from None
        except (ValueError, RecursionError):
            pass
        raise syntax from None
    if _as_read(text, value):
        return value
    try:
        return _STRICT.decode(text)
    except WireError as exc:
        raise WireError(exc.error, f"{what}: {exc.message}") from None
    except RecursionError:
        # Deeper than the stdlib reader's recursion reaches, though not deeper than orjson's.
        raise WireError("invalid_json", f"{what} is not JSON jobq can read: nested too deeply",
                        reason="nested too deeply") from None  # fmt: skip


_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?(?:([Zz])|([+-])(\d{2}):(\d{2}))"
)
RFC3339_PATTERN = r"^\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d{1,6}0*)?([Zz]|[+-]\d{2}:\d{2})$"
RFC3339_HINT = "an RFC 3339 time with an offset, e.g. 2030-01-31T09:00:00Z"


def parse_rfc3339(text: str) -> datetime:
    """An RFC 3339 date-time with its offset, as an aware datetime; WireError otherwise."""
    m = _RFC3339.fullmatch(text)
    if m is None:
        raise WireError("invalid_time", f"{text[:60]!r} is not {RFC3339_HINT}")
    year, month, day, hour, minute, second = (int(g) for g in m.groups()[:6])
    fraction, zulu, sign, off_h, off_m = m.groups()[6:]
    if fraction is not None and len(fraction.rstrip("0")) > 6:
        raise WireError("invalid_time", f"{text[:60]!r} is more precise than a microsecond")
    if second == 60:
        raise WireError("invalid_time", f"{text[:60]!r} is a leap second, which is not supported")
    if zulu:
        tz: timezone = UTC
    else:
        hours, minutes = int(off_h), int(off_m)
        if hours > 23 or minutes > 59:
            raise WireError("invalid_time", f"{text[:60]!r} has an impossible offset")
        delta = timedelta(hours=hours, minutes=minutes)
        tz = timezone(-delta if sign == "-" else delta)
    micro = int((fraction or "0")[:6].ljust(6, "0"))
    try:
        return datetime(year, month, day, hour, minute, second, micro, tzinfo=tz)
    except ValueError as exc:
        raise WireError("invalid_time", f"{text[:60]!r} is not a valid date-time: {exc}") from None
