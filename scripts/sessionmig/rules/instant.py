"""An instant given as text: ISO-8601 with a UTC offset, read as an aware UTC datetime.

Pure. The runbook's ``as_of`` parameter and the analysis queries' ``start`` and ``end`` are
read by this one rule, so a value the one accepts the other reads the same way.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sessionmig.errors import ParameterError


def parse_instant(value: Any, name: str = "as_of") -> datetime | None:
    """An ISO-8601 instant as an aware UTC datetime; empty means "not given" (None)."""
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        parsed = value
    else:
        try:
            parsed = datetime.fromisoformat(str(value).strip())
        except ValueError:
            raise ParameterError(
                f"{name}={value!r} is not an ISO-8601 instant; "
                "write e.g. 2026-11-26T09:00:00+09:00 or leave it empty for the run's start"
            ) from None
    if parsed.tzinfo is None:
        raise ParameterError(
            f"{name}={value!r} has no UTC offset, so it is not one instant; "
            "add one, e.g. 2026-11-26T09:00:00+09:00 or ...Z"
        )
    return parsed.astimezone(UTC)
