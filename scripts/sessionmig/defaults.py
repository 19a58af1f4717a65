"""The engines' own defaults: the lowest floor of the house.

Each engine takes its defaults from here; the runbook's parameter table (``params``) declares
the same values for the operator by reading them from here too, so a default is written once
and no engine depends on the runbook's idea of its parameters. Those the session store uses
are the store's own (``sessionstore.defaults``), re-exported.
"""

from __future__ import annotations

from sessionstore.defaults import DATABASE_URL_ENV as DATABASE_URL_ENV
from sessionstore.defaults import LOCK_TIMEOUT as LOCK_TIMEOUT
from sessionstore.defaults import TARGET_SCHEMA as TARGET_SCHEMA

BATCH_ROWS = 10_000  # rows per SQLite fetch and per COPY batch
ON_CONFLICT = "fail"  # rows already in the target that differ: fail | skip | keep_newer
MAX_RETRIES = 3  # a lost connection is retried this many times (1, 2, 4 s apart)
SOAK_HOURS = 24  # hours between a passing reconcile and the archive (finalize)
UNIT = "day"  # the analysis queries' time bucket
