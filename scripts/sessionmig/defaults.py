"""The engines' own defaults: the lowest floor of the house.

Each engine takes its defaults from here; the runbook's parameter table (``params``) declares
the same values for the operator by reading them from here too, so a default is written once
and no engine depends on the runbook's idea of its parameters.
"""

from __future__ import annotations

TARGET_SCHEMA = "public"  # the PostgreSQL schema that holds the sessions tables
DATABASE_URL_ENV = "DATABASE_URL"  # the environment variable naming the target's DSN
BATCH_ROWS = 10_000  # rows per SQLite fetch and per COPY batch
ON_CONFLICT = "fail"  # rows already in the target that differ: fail | skip | keep_newer
MAX_RETRIES = 3  # a lost connection is retried this many times (1, 2, 4 s apart)
LOCK_TIMEOUT = "5s"  # longest wait for a row the app holds before a catch-up pass gives up
SOAK_HOURS = 24  # hours between a passing reconcile and the archive (finalize)
UNIT = "day"  # the analysis queries' time bucket
