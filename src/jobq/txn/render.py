"""Statements with `$n` placeholders rendered for a driver's parameter style (PEP 249)."""

from __future__ import annotations

import re
from typing import Any

from jobq.queue.inserts import Statement

_PLACEHOLDER = re.compile(r"\$(\d+)")


def render(statement: Statement, style: str) -> tuple[str, Any]:
    """The SQL and parameters for a driver whose paramstyle is `style`.

    `$n` may appear more than once (a positional style repeats the value); a literal `%` is
    doubled for the styles that read `%` as the start of a placeholder."""
    args = statement.args
    if style == "numeric_dollar":
        return statement.sql, args
    if style == "pyformat":
        sql = _PLACEHOLDER.sub(lambda m: f"%(p{m[1]})s", statement.sql.replace("%", "%%"))
        return sql, {f"p{i}": a for i, a in enumerate(args, start=1)}
    if style == "format":
        ordered: list[Any] = []

        def positional(m: re.Match[str]) -> str:
            ordered.append(args[int(m[1]) - 1])
            return "%s"

        sql = _PLACEHOLDER.sub(positional, statement.sql.replace("%", "%%"))
        return sql, tuple(ordered)
    raise TypeError(f"jobq.txn does not support the parameter style {style!r}")
