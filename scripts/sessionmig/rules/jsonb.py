"""Print JSON exactly as PostgreSQL prints ``jsonb``, so both sides of a comparison can
fingerprint the same text: object keys ordered by byte length then bytes (duplicates: last wins),
``", "`` and ``": "`` separators, numbers at the scale their text implies, no negative zero.
Pure functions; a hypothesis test checks them against both servers.
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any


def _jsonb_key(key: str) -> tuple[int, bytes]:
    raw = key.encode("utf-8", "surrogatepass")
    return len(raw), raw


def number_text(value: int | Decimal) -> str:
    """A JSON number (``int``, or ``Decimal`` as parsed) as ``jsonb`` prints it."""
    if isinstance(value, int):
        return str(value)
    # PostgreSQL numeric keeps the scale the text implies (1.0 -> 1.0, 1e2 -> 100) and has
    # no negative zero.
    exponent = value.as_tuple().exponent
    if not isinstance(exponent, int):  # NaN or Infinity: no JSON number, never in jsonb
        return str(value)
    if value.is_zero():
        value = value.copy_abs()
    return format(value, f".{max(0, -exponent)}f")


def jsonb_text(value: Any) -> str:
    """A parsed JSON value printed as PostgreSQL prints ``jsonb``: keys ordered by length then
    bytes, ``", "`` and ``": "`` separators, numbers at their own scale."""
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, int | Decimal):
        return number_text(value)
    if isinstance(value, list):
        return "[" + ", ".join(jsonb_text(v) for v in value) + "]"
    keys = sorted(value, key=_jsonb_key)
    return (
        "{"
        + ", ".join(f"{json.dumps(k, ensure_ascii=False)}: {jsonb_text(value[k])}" for k in keys)
        + "}"
    )


def _jsonb_order(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonb_order(value[k]) for k in sorted(value, key=_jsonb_key)}
    if isinstance(value, list):
        return [_jsonb_order(v) for v in value]
    return value


def metadata_text(text: str) -> str:
    """``jsonb_text`` of a JSON text, fast: without fractions or exponents, the C encoder prints
    exactly what PostgreSQL prints once keys are in jsonb order; otherwise the exact path."""
    fractions: list[str] = []
    value = json.loads(text, parse_float=fractions.append)
    if fractions:
        return jsonb_text(json.loads(text, parse_float=Decimal))
    return json.dumps(_jsonb_order(value), ensure_ascii=False, separators=(", ", ": "))
