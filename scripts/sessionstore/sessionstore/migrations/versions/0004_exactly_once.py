"""Exactly once, whatever fails: guarantees the target keeps itself, not a connection.

- One catch-up pass per number: a unique index on (migrate run, pass number) of the catch-up
  audit rows. The migration lock is a session-level advisory lock on a connection that can
  vanish mid-pass; this index makes a second "pass N" fail at its commit whatever happened to
  the lock.
- One rollback during the overlap per migrate run: its intent row (written before SQLite is
  touched) is unique the same way.
- The recorded manifest digests are append-only: a trigger refuses UPDATE, DELETE and TRUNCATE
  of ``session_migration_manifests``, so a forged digest cannot replace the one a run recorded
  (``sessionmig verify --env`` also checks the trigger is there and enabled).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07
"""

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

# Unqualified: env.py sets search_path to the target schema for the migration.
_FUNCTION = "session_migration_append_only"


def upgrade() -> None:
    # Both indexes are on the small audit table, which the app never touches: no lock it waits on.
    op.execute(
        """CREATE UNIQUE INDEX uq_session_migration_runs_catchup_pass
           ON session_migration_runs ((parameters->>'migrate_run_id'),
                                      ((parameters->>'catchup_pass')::int))
           WHERE step = 'catchup'"""
    )
    op.execute(
        """CREATE UNIQUE INDEX uq_session_migration_runs_overlap_rollback
           ON session_migration_runs ((parameters->>'migrate_run_id'))
           WHERE step = 'rollback' AND parameters->>'mode' = 'overlap'
             AND parameters->>'state' = 'intent'"""
    )
    op.execute(
        f"""CREATE FUNCTION {_FUNCTION}() RETURNS trigger
            LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
            BEGIN
                RAISE EXCEPTION '% is append-only: a recorded digest is evidence (% refused)',
                    TG_TABLE_NAME, TG_OP
                    USING ERRCODE = 'insufficient_privilege',
                          HINT = 'a run records its digest once, when it is sealed';
            END $$"""
    )
    op.execute(
        f"""CREATE TRIGGER session_migration_manifests_append_only
            BEFORE UPDATE OR DELETE ON session_migration_manifests
            FOR EACH ROW EXECUTE FUNCTION {_FUNCTION}()"""
    )
    op.execute(
        f"""CREATE TRIGGER session_migration_manifests_no_truncate
            BEFORE TRUNCATE ON session_migration_manifests
            FOR EACH STATEMENT EXECUTE FUNCTION {_FUNCTION}()"""
    )
    op.execute("REVOKE UPDATE, DELETE, TRUNCATE ON session_migration_manifests FROM PUBLIC")


def downgrade() -> None:
    for trigger in ("no_truncate", "append_only"):
        op.execute(
            f"DROP TRIGGER session_migration_manifests_{trigger} ON session_migration_manifests"
        )
    op.execute(f"DROP FUNCTION {_FUNCTION}()")
    op.execute("DROP INDEX uq_session_migration_runs_overlap_rollback")
    op.execute("DROP INDEX uq_session_migration_runs_catchup_pass")
