"""`orchestrator demo`: seed a database, run every phase and the contract, and show the tables before and after."""
from __future__ import annotations

import psycopg
from psycopg import sql

from orchestrator.lab import chatter
from orchestrator.lab.seed import SeedNames, create_seed_schema, insert_rows
from orchestrator.lab.snapshot import describe_table


def refuse_existing(dsn: str, pb) -> None:
    """The demo creates the seed's enum type and table: refuse, changing nothing, when either exists."""
    from orchestrator.engine import db
    from orchestrator.engine.errors import Refused
    with db.connect(dsn) as conn:
        found = db.one(
            conn,
            """SELECT (SELECT format('table %%I.%%I', n.nspname, c.relname) FROM pg_class c
                       JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relname = %s),
                      (SELECT format('type %%I.%%I', n.nspname, t.typname) FROM pg_type t
                       JOIN pg_namespace n ON n.oid = t.typnamespace WHERE n.nspname = %s AND t.typname = %s)""",
            (pb.migrations[0].table.schema_, pb.migrations[0].table.name, *pb.enum_type))
    existing = [f for f in found if f]
    if existing:
        raise Refused(f"the demo creates the seed schema, but {' and '.join(existing)} already exist(s) in this "
                      "database; nothing was changed",
                      hint="point --dsn / DATABASE_URL at an empty database, or leave it unset to use the local "
                           "demo server (recreated each time); to migrate this table instead: orchestrator plan")


def run_demo(dsn: str, pb, *, rows: int, setup_only: bool = False, console=None) -> None:
    """Chatter's schema (or, for a one-column playbook, the simplified table) with sample rows, then every
    phase and the contract, printing as it goes and showing every migrated table before and after."""
    from rich.console import Console

    from orchestrator.console import output
    from orchestrator.engine import db
    from orchestrator.run.runner import Orchestrator

    console = console or Console()
    schema = pb.migrations[0].table.schema_
    enum_schema, enum_name = pb.enum_type

    def show(title: str) -> None:
        with psycopg.connect(dsn) as conn:
            for m in pb.migrations:
                output.print_table(console, f"{title}: {m.table.schema_}.{m.table.name}",
                                   ["column", "type", "not null", "default"],
                                   [[name, type_, "yes" if nn else "", default] for name, type_, nn, default
                                    in describe_table(conn, m.table.schema_, m.table.name)])
                counts = conn.execute(sql.SQL("SELECT {}::text, count(*) FROM {} GROUP BY 1 ORDER BY 1").format(
                    sql.Identifier(m.column.name), sql.Identifier(m.table.schema_, m.table.name)),
                    prepare=False).fetchall()
                console.print(f"{m.label} values: " + ", ".join(f"{v}={n:,}" for v, n in counts))
                for name, definition in conn.execute(
                        "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = %s AND tablename = %s "
                        "ORDER BY 1", (m.table.schema_, m.table.name)):
                    console.print(f"index {name}: {definition}", markup=False, highlight=False, soft_wrap=True)
            enum = db.scalar(conn, "SELECT EXISTS (SELECT FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace "
                                   "WHERE n.nspname = %s AND t.typname = %s)", (enum_schema, enum_name))
            console.print(f"enum type {enum_name}: {'present' if enum else 'dropped'}")
            builtins = [m for m in pb.migrations if m.seed_rows.rows]
            for m in builtins:
                keys = [str(r[m.seed_rows.key[0]]) for r in m.seed_rows.rows]
                found = db.scalar(conn, sql.SQL("SELECT count(*) FROM {} WHERE {}::text = ANY(%s)").format(
                    sql.Identifier(m.table.schema_, m.table.name), sql.Identifier(m.seed_rows.key[0])),
                    (keys,))
                console.print(f"built-in rows in {m.table.name}: {found} of {len(keys)}")

    console.print(f"seeding {rows:,} sample rows (a few seconds per 100,000)")
    with psycopg.connect(dsn) as conn:
        if chatter.is_chatter(pb):
            chatter.create_chatter_schema(conn, schema)
            chatter.insert_chatter_rows(conn, rows, schema=schema)
            console.print(f"created Chatter's schema in {schema} with {rows:,} workflow_templates and "
                          f"{max(1, rows // 4):,} template_specs rows")
        else:
            m = pb.migrations[0]
            names = SeedNames(schema=m.table.schema_, table=m.table.name, column=m.column.name,
                              enum=m.column.enum_type, labels=tuple(m.mapping))
            create_seed_schema(conn, names, enum_default=names.labels[0])
            insert_rows(conn, rows, names)
            console.print(f"created {names.schema}.{names.table} with {rows:,} rows")
    show("before")
    if setup_only:
        return
    orch = Orchestrator(pb, dsn)
    try:
        for phase in orch.phases:
            title, expand_doc = phase.described(pb.settings)
            output.rule(console, f"phase {phase.number}: {title}")
            console.print(f"expand: {expand_doc}\nlocks: {phase.locks_doc}")
            orch.run(phase.number)
        output.rule(console, "contract")
        for phase in orch.phases:
            console.print(f"contract {phase.number} ({phase.name}): {phase.contract_doc}")
            orch.contract(phase.number)
    finally:
        orch.close()
    show("after")
