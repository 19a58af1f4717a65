"""The backup side: the SQLite file opened as evidence, its live copy, a generated sample, its
rows read for a load (keys, the wire format) and for reconcile (expected), and its profile."""
