"""The store's own defaults, read by the store and by sessionmig's parameter table alike (a
default is written once: ``sessionmig.defaults`` re-exports these)."""

from __future__ import annotations

TARGET_SCHEMA = "public"  # the PostgreSQL schema that holds the sessions tables
DATABASE_URL_ENV = "DATABASE_URL"  # the environment variable naming the database's DSN
LOCK_TIMEOUT = "5s"  # longest wait for a lock the app holds (DDL, a catch-up pass's rows)
