"""Pure rules, no I/O: a raw row to a session or a reject, jsonb text, masks, the catch-up
merge, verdicts, instants. Every floor above reads the backup and the target by these."""
