"""The digest's FastAPI session app (``app``) and real clients that drive it (``traffic``):
blue on the legacy SQLite store, green on PostgreSQL, for the live-cutover demo and test."""
