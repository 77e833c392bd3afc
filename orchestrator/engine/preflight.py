"""Privilege preflight: refuse up front, naming what is missing, instead of failing half-way through a phase.

docs/privileges.md lists the same requirements for people. Read-only: every check is a catalog function
(pg_has_role, has_*_privilege), so it needs no privilege of its own.
"""

from __future__ import annotations

import psycopg

from orchestrator.engine import db
from orchestrator.engine.errors import Refused
from orchestrator.engine.playbook import Playbook
from orchestrator.engine.sqlkit import I

STATE_TABLES = {"migrations": ("SELECT", "INSERT", "DELETE"), "phases": ("SELECT", "INSERT", "UPDATE", "DELETE"),
                "backfills": ("SELECT", "INSERT", "UPDATE", "DELETE"), "run_log": ("INSERT",)}
TABLE_PRIVILEGES = ("SELECT", "INSERT", "UPDATE", "DELETE", "TRIGGER")


def missing_privileges(conn: psycopg.Connection, pb: Playbook) -> list[str]:
    """What the connected role lacks to run every phase, rollback and contract of `pb`; empty when all is well."""
    if db.scalar(conn, "SELECT pg_is_in_recovery()"):
        return ["a writable server (this one is a read-only standby)"]
    missing: list[str] = []
    for schema, name in pb.tables:
        missing += _table_privileges(conn, schema, name)
    if pb.kind == "enum_to_varchar":
        missing += _enum_privileges(conn, pb)
    missing += _state_schema(conn, pb.settings.state_schema)

    # With backfill_method copy a table without a primary key is still updated in place (kinds/phases/backfill.py).
    keyless = [t for t in pb.tables if not _has_primary_key(conn, *t)]
    if pb.settings.app_triggers == "skip" and (pb.settings.backfill_method == "update" or keyless):
        missing += _replication_role(conn)
    if pb.settings.backfill_method == "copy":
        for schema, name in pb.tables:
            if (schema, name) not in keyless:
                missing += _copy_privileges(conn, schema, name)
    if pb.app_versions is not None:
        absent = [v for v in (pb.app_versions.old, pb.app_versions.new) if not db.scalar(
            conn, "SELECT EXISTS (SELECT FROM pg_namespace WHERE nspname = %s)", (v,))]
        if absent and not db.scalar(conn, "SELECT has_database_privilege(current_database(), 'CREATE')"):
            missing.append(f"CREATE on database {conn.info.dbname} (for the app version schemas "
                           f"{', '.join(absent)})")
    return list(dict.fromkeys(missing))  # tables sharing a schema need its CREATE once


def _has_primary_key(conn: psycopg.Connection, schema: str, name: str) -> bool:
    """True also for a table that does not exist (the playbook's inspection names that)."""
    return bool(db.scalar(conn, """SELECT NOT EXISTS (
                                       SELECT FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                                   WHERE n.nspname = %s AND c.relname = %s AND c.relkind = 'r' AND NOT EXISTS (
                                       SELECT FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary))""",
                          (schema, name)))


def _enum_privileges(conn: psycopg.Connection, pb: Playbook) -> list[str]:
    missing: list[str] = []
    enum_schema, enum_name = pb.enum_type
    enum = conn.execute("""SELECT pg_has_role(t.typowner, 'USAGE'), t.typowner::regrole::text,
                                  has_type_privilege(t.oid, 'USAGE')
                           FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
                           WHERE n.nspname = %s AND t.typname = %s""",
                        (enum_schema, enum_name)).fetchone()
    if enum is None:  # gone after the contract: the way back recreates it
        can = conn.execute("SELECT has_schema_privilege(oid, 'CREATE') FROM pg_namespace WHERE nspname = %s",
                           (enum_schema,)).fetchone()  # no row: no such schema, which inspect names
        if can is not None and not can[0]:
            missing.append(f"CREATE on schema {enum_schema} (the way back after the contract recreates the enum "
                           f"type {enum_schema}.{enum_name})")
    else:
        is_owner, owner, usage = enum
        type_name = f"{enum_schema}.{enum_name}"
        if not usage:
            missing.append(f"USAGE on type {type_name}")
        if pb.settings.drop_enum_type and not is_owner:
            missing.append(f"ownership of type {type_name} (owned by {owner}; the contract drops it)")

    return missing


def _table_privileges(conn: psycopg.Connection, schema: str, name: str) -> list[str]:
    missing: list[str] = []
    table = f"{schema}.{name}"  # as people write it; the queries take it as a regclass literal
    regclass = I(schema, name).as_string(conn)

    row = conn.execute("""SELECT pg_has_role(c.relowner, 'USAGE'), c.relowner::regrole::text
                          FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                          WHERE n.nspname = %s AND c.relname = %s AND c.relkind IN ('r', 'p')""",
                       (schema, name)).fetchone()
    if row is not None:  # a missing table is reported by the playbook check (exit 2)
        is_owner, owner = row
        if not is_owner:
            missing.append(f"ownership of table {table} (owned by {owner}; ALTER TABLE, CREATE INDEX and "
                           f"CREATE TRIGGER need its owner's privileges)")
        lacking = [p for p in TABLE_PRIVILEGES
                   if not db.scalar(conn, "SELECT has_table_privilege(%s::regclass, %s)", (regclass, p))]
        if lacking:
            missing.append(f"{', '.join(lacking)} on table {table}")
        if not db.scalar(conn, "SELECT has_schema_privilege(%s, 'CREATE')", (schema,)):
            missing.append(f"CREATE on schema {schema} (for the new indexes and the "
                           f"trigger functions)")
        if not db.scalar(conn, "SELECT has_language_privilege('plpgsql', 'USAGE')"):
            missing.append("USAGE on language plpgsql (for the trigger functions)")

    return missing


def _copy_privileges(conn: psycopg.Connection, schema: str, name: str) -> list[str]:
    """Phase 3 by copy re-adds the table's foreign keys on its copy: REFERENCES on each table they point at."""
    rows = conn.execute("""SELECT DISTINCT f.confrelid::regclass::text FROM pg_constraint f
                           JOIN pg_class c ON c.oid = f.conrelid JOIN pg_namespace n ON n.oid = c.relnamespace
                           WHERE n.nspname = %s AND c.relname = %s AND f.contype = 'f'
                             AND NOT has_table_privilege(f.confrelid, 'REFERENCES') ORDER BY 1""",
                        (schema, name)).fetchall()
    children = conn.execute("""SELECT DISTINCT f.conrelid::regclass::text FROM pg_constraint f
                               JOIN pg_class c ON c.oid = f.confrelid JOIN pg_namespace n ON n.oid = c.relnamespace
                               JOIN pg_class r ON r.oid = f.conrelid
                               WHERE n.nspname = %s AND c.relname = %s AND f.contype = 'f'
                                 AND f.conrelid <> f.confrelid AND NOT pg_has_role(r.relowner, 'USAGE') ORDER BY 1""",
                            (schema, name)).fetchall()
    return [f"REFERENCES on table {t} (settings.backfill_method: copy re-adds the foreign keys of "
            f"{schema}.{name} on its copy)" for (t,) in rows] + [
        f"ownership of table {t} (settings.backfill_method: copy re-adds its foreign keys to {schema}.{name})"
        for (t,) in children]


def _state_schema(conn: psycopg.Connection, schema: str) -> list[str]:
    quoted = schema
    exists = db.scalar(conn, "SELECT EXISTS (SELECT FROM pg_namespace WHERE nspname = %s)", (schema,))
    if not exists:
        if not db.scalar(conn, "SELECT has_database_privilege(current_database(), 'CREATE')"):
            return [f"CREATE on database {conn.info.dbname} (to create the state schema "
                    f"{quoted}), or create that schema for this role first"]
        return []
    if not db.scalar(conn, "SELECT has_schema_privilege(%s, 'USAGE')", (schema,)):
        return [f"USAGE on schema {quoted} (the orchestrator's state)"]
    missing = []
    tables: dict[str, int]  # relname -> oid
    tables = dict(conn.execute("""SELECT c.relname, c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                                  WHERE n.nspname = %s AND c.relkind = 'r'""", (schema,)).fetchall())
    if any(t not in tables for t in STATE_TABLES) and not db.scalar(
            conn, "SELECT has_schema_privilege(%s, 'CREATE')", (schema,)):
        missing.append(f"CREATE on schema {quoted} (to create the state tables)")
    for t, needed in STATE_TABLES.items():
        if t in tables:
            lacking = [p for p in needed
                       if not db.scalar(conn, "SELECT has_table_privilege(%s::oid, %s)", (tables[t], p))]
            if lacking:
                missing.append(f"{', '.join(lacking)} on table {schema}.{t}")
    seq = db.scalar(conn, "SELECT pg_get_serial_sequence(%s, 'id')",
                          (I(schema, "run_log").as_string(conn),)) if "run_log" in tables else None
    if seq and not db.scalar(conn, "SELECT has_sequence_privilege(%s, 'USAGE')", (seq,)):
        missing.append(f"USAGE on sequence {seq}")
    return missing


def _replication_role(conn: psycopg.Connection) -> list[str]:
    """settings.app_triggers: skip runs each backfill batch with SET LOCAL session_replication_role = replica."""
    if db.scalar(conn, "SELECT current_setting('is_superuser') = 'on'"):
        return []
    if conn.info.server_version >= 150000:
        if db.scalar(conn, "SELECT has_parameter_privilege('session_replication_role', 'SET')"):
            return []
        how = "GRANT SET ON PARAMETER session_replication_role TO the role, or run as a superuser"
    else:
        how = "only a superuser may set it before PostgreSQL 15"
    return [f"SET on parameter session_replication_role (settings.app_triggers: skip runs the backfill with it "
            f"set to replica; {how})"]


def check(conn: psycopg.Connection, pb: Playbook) -> None:
    """Raise Refused (exit 3), one line naming every missing privilege, before anything is changed."""
    missing = missing_privileges(conn, pb)
    if missing:
        role = db.scalar(conn, "SELECT current_user")
        raise Refused(f"role {role} lacks " + "; ".join(missing)
                      + "; nothing was changed",
                      hint="grant these (see docs/privileges.md) or run as the table owner, then re-run")
