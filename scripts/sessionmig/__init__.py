"""sessionmig: migrate a SQLite session store to PostgreSQL, provably."""
