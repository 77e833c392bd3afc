"""What the database looks like: the facts a migration needs, and everything that would block it.

All reads; nothing here changes the database.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import psycopg
from psycopg import errors as pgerr
from psycopg.types.json import Jsonb

from orchestrator.engine import convert, db, target_rules
from orchestrator.engine.errors import BadInput
from orchestrator.engine.playbook import ColumnMigration, Playbook, _key, _suffixed
from orchestrator.engine.sqlkit import I, L, Q, Stmt, extra_type


@dataclass
class IndexFact:
    name: str
    unique: bool
    columns: list[str]  # the enum column appears under its original name
    # change_type of a key: the PRIMARY KEY ('p') or UNIQUE ('u') constraint this index belongs to, moved to
    # the new column at the swap (ADD CONSTRAINT ... USING INDEX) rather than renamed.
    constraint: str | None = None
    constraint_type: str | None = None

    @property
    def shadow_name(self) -> str:
        return _suffixed(self.name, "_ecnew")

    @property
    def retired_name(self) -> str:
        return _suffixed(self.name, "_ecold")


@dataclass
class ForeignKeyFact:
    """A foreign key from this column to a key the playbook also changes: dropped and re-created (NOT VALID,
    then VALIDATE) by the swap and its rollback, with the same name and definition."""

    name: str
    definition: str  # pg_get_constraintdef: columns by name, so the same text points at the swapped columns


@dataclass
class SequenceFact:
    """The sequence the column owns (serial): it moves with the column (OWNED BY, AS the new type)."""

    schema: str
    name: str
    type: str


@dataclass
class Facts:
    """The original shape, captured at the first run and stored, so later phases never re-guess it."""

    pk: list[str]
    not_null: bool
    default_label: str | None
    indexes: list[IndexFact] = field(default_factory=list)
    attnum: int | None = None
    # The enum type as it was (shared by every column of the playbook): what a reverse migration after the
    # contract recreates. None in state recorded before these were kept (the playbook's mapping order is used).
    enum: EnumFacts | None = None
    # kind change_type: the column's type before and after, as format_type() spells them.
    old_type: str | None = None
    new_type: str | None = None
    foreign_keys: list[ForeignKeyFact] = field(default_factory=list)
    sequence: SequenceFact | None = None

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Facts:
        return cls(pk=data["pk"], not_null=data["not_null"], default_label=data["default_label"],
                   indexes=[IndexFact(**i) for i in data["indexes"]], attnum=data.get("attnum"),
                   enum=EnumFacts(**data["enum"]) if data.get("enum") else None,
                   old_type=data.get("old_type"), new_type=data.get("new_type"),
                   foreign_keys=[ForeignKeyFact(**k) for k in data.get("foreign_keys") or []],
                   sequence=SequenceFact(**data["sequence"]) if data.get("sequence") else None)


@dataclass
class EnumFacts:
    labels: list[str]  # in their sort order
    owner: str
    comment: str | None = None
    acl: list[list] | None = None  # [grantee or None for PUBLIC, privilege, grantable]; None: the default ACL


def enum_facts(conn: psycopg.Connection, type_oid: int) -> EnumFacts:
    owner, comment, default_acl = db.one(
        conn,
        """SELECT pg_get_userbyid(typowner), obj_description(oid, 'pg_type'), typacl IS NULL FROM pg_type
           WHERE oid = %s""", (type_oid,))
    acl = None if default_acl else [list(r) for r in conn.execute(
        """SELECT (SELECT rolname FROM pg_roles WHERE oid = p.grantee), p.privilege_type, p.is_grantable
           FROM pg_type t, aclexplode(t.typacl) p WHERE t.oid = %s ORDER BY 1 NULLS FIRST, 2""", (type_oid,))]
    return EnumFacts(labels=enum_labels(conn, type_oid), owner=owner, comment=comment, acl=acl)


def facts_to_json(pb: Playbook, facts: list[Facts]) -> dict:
    return {"columns": {m.key: f.to_json() for m, f in zip(pb.migrations, facts)}}


def facts_from_json(pb: Playbook, data: dict) -> list[Facts]:
    return [Facts.from_json(data["columns"][m.key]) for m in pb.migrations]


def table_oid(conn: psycopg.Connection, schema: str, table: str) -> int | None:
    row = conn.execute("""SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                          WHERE n.nspname = %s AND c.relname = %s AND c.relkind IN ('r', 'p')""",
                       (schema, table)).fetchone()
    return row[0] if row else None


def existing_table_oid(conn: psycopg.Connection, schema: str, table: str) -> int:
    """table_oid of a table the migration inspected at its first run: that it is gone is an error."""
    oid = table_oid(conn, schema, table)
    if oid is None:
        raise RuntimeError(f"table {schema}.{table} does not exist (any more)")
    return oid


def schema_exists(conn: psycopg.Connection, schema: str) -> bool:
    return db.scalar(conn, "SELECT EXISTS (SELECT FROM pg_namespace WHERE nspname = %s)", (schema,))


# The state schema's tables and a column each that only ours have: a same-named app table is not ours to write.
STATE_TABLES = {"migrations": "fingerprint", "phases": "status", "backfills": "rows_done", "run_log": "statement"}


def check_state_schema(conn: psycopg.Connection, schema: str) -> None:
    """Refuse a state schema holding relations that have a state table's name but not its shape."""
    rows = conn.execute("""SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                           WHERE n.nspname = %s AND c.relname = ANY(%s) AND (c.relkind NOT IN ('r', 'p')
                             OR NOT EXISTS (SELECT FROM pg_attribute a WHERE a.attrelid = c.oid
                                            AND a.attname = 'playbook' AND NOT a.attisdropped)
                             OR NOT EXISTS (SELECT FROM pg_attribute a WHERE a.attrelid = c.oid
                                            AND a.attname = (%s::jsonb ->> c.relname) AND NOT a.attisdropped))
                           ORDER BY 1""", (schema, list(STATE_TABLES), json.dumps(STATE_TABLES))).fetchall()
    if rows:
        raise BadInput(f"settings.state_schema: schema {schema!r} already has a relation {rows[0][0]!r} that is "
                       f"not the orchestrator's state table; choose another schema")


def primary_key(conn: psycopg.Connection, oid: int) -> list[str]:
    rows = conn.execute("""SELECT a.attname FROM pg_index i
                           CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, pos)
                           JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
                           WHERE i.indrelid = %s AND i.indisprimary ORDER BY k.pos""", (oid,)).fetchall()
    return [r[0] for r in rows]


def column(conn: psycopg.Connection, oid: int, name: str) -> dict | None:
    row = conn.execute("""SELECT a.attnum, tn.nspname, t.typname, t.typtype, a.attnotnull,
                                 pg_get_expr(d.adbin, d.adrelid), format_type(a.atttypid, a.atttypmod), t.oid
                          FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
                          JOIN pg_namespace tn ON tn.oid = t.typnamespace
                          LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
                          WHERE a.attrelid = %s AND a.attname = %s AND a.attnum > 0 AND NOT a.attisdropped""",
                       (oid, name)).fetchone()
    if row is None:
        return None
    keys = ("attnum", "type_schema", "type_name", "typtype", "not_null", "default", "type", "type_oid")
    return dict(zip(keys, row))


def existing_column(conn: psycopg.Connection, oid: int, name: str) -> dict:
    """column() of a column the migration inspected at its first run: that it is gone is an error."""
    info = column(conn, oid, name)
    if info is None:
        raise RuntimeError(f"column {name!r} does not exist (any more) in the table of oid {oid}")
    return info


def columns(conn: psycopg.Connection, oid: int) -> set[str]:
    return {r[0] for r in conn.execute(
        "SELECT attname FROM pg_attribute WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped", (oid,))}


def enum_labels(conn: psycopg.Connection, type_oid: int) -> list[str]:
    return [r[0] for r in conn.execute(
        "SELECT enumlabel FROM pg_enum WHERE enumtypid = %s ORDER BY enumsortorder", (type_oid,))]


def relation_exists(conn: psycopg.Connection, schema: str, name: str) -> bool:
    return db.scalar(conn, """SELECT EXISTS (SELECT FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                           WHERE n.nspname = %s AND c.relname = %s)""", (schema, name))


def column_indexes(conn: psycopg.Connection, oid: int, attnum: int, *,
                   keys: bool = False) -> tuple[list[IndexFact], list[str]]:
    """Indexes using the column: plain btree ones we can rebuild on the new column, and blockers. `keys`
    (change_type): the column's own one-column primary key or unique constraint is one we can move."""
    rows = conn.execute("""
        SELECT c.relname, i.indisunique, i.indisprimary, am.amname, i.indexprs IS NULL AND i.indpred IS NULL,
               i.indnkeyatts = i.indnatts, NOT EXISTS (SELECT FROM unnest(i.indoption::int2[]) o WHERE o <> 0),
               array(SELECT a.attname FROM unnest(i.indkey) WITH ORDINALITY k(n, pos)
                     JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.n ORDER BY k.pos),
               pg_get_indexdef(i.indexrelid),
               (SELECT array[con.conname::text, con.contype::text] FROM pg_constraint con
                WHERE con.conindid = i.indexrelid AND con.conrelid = i.indrelid AND con.contype IN ('p', 'u'))
        FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
        JOIN pg_am am ON am.oid = c.relam
        WHERE i.indrelid = %s AND (%s = ANY(i.indkey::int2[]) OR EXISTS (
            SELECT FROM pg_depend d WHERE d.classid = 'pg_class'::regclass AND d.objid = i.indexrelid
              AND d.refobjid = i.indrelid AND d.refobjsubid = %s))""", (oid, attnum, attnum)).fetchall()
    simple, blockers = [], []
    for name, unique, primary, am, plain, no_include, default_opts, cols, definition, con in rows:
        movable = am == "btree" and plain and no_include and default_opts and len(cols) == len(set(cols))
        if con is not None and keys and movable and len(cols) == 1:
            simple.append(IndexFact(name=name, unique=True, columns=list(cols), constraint=con[0],
                                    constraint_type=con[1]))
        elif primary:
            blockers.append(f"the primary key {name!r} includes the column" + (
                " with others (a key of one column can be changed)" if keys else ""))
        elif con is not None and keys:
            blockers.append(f"the unique constraint {name!r} includes the column with others")
        elif movable:
            simple.append(IndexFact(name=name, unique=unique, columns=list(cols)))
        else:
            blockers.append(f"index {name!r} ({definition}) cannot be rebuilt automatically")
    return simple, blockers


def column_dependents(conn: psycopg.Connection, oid: int, attnum: int, own_view_schemas: tuple = (),
                      excused: tuple[str, ...] = ()) -> list[str]:
    """Objects depending on the column other than its own default and indexes: views, constraints, generated
    columns, ... (the orchestrator's own version views, in `own_view_schemas`, excepted)."""
    # A generated column reading this one depends on it through its expression (pg_attrdef, up to 17) or itself
    # (pg_class with the column's number, 18); a default never reads a column, so no other pg_attrdef does.
    rows = conn.execute(r"""
        SELECT CASE WHEN d.classid IN ('pg_class'::regclass, 'pg_attrdef'::regclass)
                    THEN format('generated column %%I (its expression reads the column: drop it, and re-create it '
                                'on the new column after the swap)', (
                         SELECT a.attname FROM pg_attribute a LEFT JOIN pg_attrdef ad ON ad.oid = d.objid
                         WHERE (d.classid = 'pg_class'::regclass AND a.attrelid = d.objid AND a.attnum = d.objsubid)
                            OR (a.attrelid = ad.adrelid AND a.attnum = ad.adnum)))
                    ELSE pg_describe_object(d.classid, d.objid, d.objsubid) END,
               d.classid::regclass::text
        FROM pg_depend d
        WHERE d.refclassid = 'pg_class'::regclass AND d.refobjid = %s AND d.refobjsubid = %s
          AND NOT (d.classid = 'pg_class'::regclass AND d.objsubid = 0)  -- indexes: column_indexes
          AND NOT (d.classid = 'pg_attrdef'::regclass AND EXISTS (  -- the column's own default
               SELECT FROM pg_attrdef ad
               WHERE ad.oid = d.objid AND ad.adrelid = d.refobjid AND ad.adnum = d.refobjsubid))
          AND NOT (d.classid = 'pg_constraint'::regclass AND EXISTS (
               SELECT FROM pg_constraint c WHERE c.oid = d.objid
                 AND (c.contype IN ('p', 'n') OR c.conname = ANY(%s))))  -- keys and foreign keys we move
          AND NOT (d.classid = 'pg_rewrite'::regclass AND EXISTS (  -- our own version views
               SELECT FROM pg_rewrite r JOIN pg_class v ON v.oid = r.ev_class
               JOIN pg_namespace n ON n.oid = v.relnamespace WHERE r.oid = d.objid AND n.nspname = ANY(%s)))
          AND NOT (d.classid = 'pg_trigger'::regclass AND EXISTS (  -- our own sync triggers
               SELECT FROM pg_trigger t WHERE t.oid = d.objid AND t.tgname LIKE '~ec\_%%'))
        ORDER BY 1""", (oid, attnum, list(excused), list(own_view_schemas))).fetchall()
    out = [desc for desc, _ in rows]
    # Triggers listed with UPDATE OF the column (no pg_depend entry for tgattr).
    for (name,) in conn.execute("""SELECT tgname FROM pg_trigger WHERE tgrelid = %s AND NOT tgisinternal
                                   AND %s = ANY(tgattr::int2[]) AND tgname NOT LIKE '~ec\\_%%'""",
                                (oid, attnum)):
        out.append(f"trigger {name!r} fires on UPDATE OF the column")
    return sorted(set(out))


def type_dependents(conn: psycopg.Connection, type_oid: int, columns: list[tuple[int, int]]) -> list[str]:
    """Other users of the enum type (columns, functions, casts...), which would stop DROP TYPE. `columns`:
    (table oid, attnum) of the columns the playbook migrates: they and their defaults go with the migration."""
    oids, attnums = [c[0] for c in columns], [c[1] for c in columns]
    rows = conn.execute("""
        WITH ours(oid, attnum) AS (SELECT * FROM unnest(%s::oid[], %s::int2[]))
        SELECT pg_describe_object(d.classid, d.objid, d.objsubid)
        FROM pg_depend d
        WHERE d.refclassid = 'pg_type'::regclass AND d.refobjid = %s AND d.deptype = 'n'
          AND NOT (d.classid = 'pg_class'::regclass AND (d.objid, d.objsubid) IN (SELECT oid, attnum FROM ours))
          AND NOT (d.classid = 'pg_attrdef'::regclass AND d.objid IN (
               SELECT ad.oid FROM pg_attrdef ad JOIN ours ON ad.adrelid = ours.oid AND ad.adnum = ours.attnum))
        ORDER BY 1""", (oids, attnums, type_oid)).fetchall()
    return [r[0] for r in rows]


def default_label(default: str | None, labels: list[str]) -> tuple[str | None, str | None]:
    """('plain', None) for a default like 'plain'::workflowtype, (None, problem) for anything else."""
    if default is None:
        return None, None
    if default.startswith("'") and "'::" in default:
        literal = default[1:default.rindex("'::")].replace("''", "'")
        if literal in labels:
            return literal, None
    return None, f"the column default {default} is not a plain enum label"


def _rejected(conn: psycopg.Connection, query: Stmt) -> str | None:
    """The server's complaint (first line) when converting a playbook value fails, else None."""
    try:
        with conn.transaction():  # a savepoint on a connection already in a transaction
            conn.execute(query)
    except (pgerr.DataError, pgerr.CannotCoerce, pgerr.DatatypeMismatch) as err:
        return str(err).strip().splitlines()[0]
    return None


def _json_value(v):
    return Jsonb(v) if isinstance(v, (dict, list)) else v


def value_problems(conn: psycopg.Connection, m: ColumnMigration, oid: int, col_has_default: bool) -> list[str]:
    """Extra column defaults and seed rows the server would reject: found now, not phases later."""
    problems = []
    extras = {c.name: c for c in m.extra_columns}
    for i, c in enumerate(m.extra_columns):
        for what, value in (("default", c.default), ("backfill", c.backfill)):
            if value is not None:
                why = _rejected(conn, Q("SELECT {}::{}").format(L(value), extra_type(c)))
                if why:
                    problems.append(f"{m.where}extra_columns.{i}.{what}: {c.name!r}: {why}")
    if not m.seed_rows.rows:
        return problems
    cols = {name: (not_null, required) for name, not_null, required in conn.execute(
        """SELECT attname, attnotnull, attnotnull AND NOT atthasdef AND attidentity = '' AND attgenerated = ''
           FROM pg_attribute WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped""", (oid,))}
    required = {n for n, (_, req) in cols.items() if req and n != m.column.name}
    if not m.target.nullable and not col_has_default:
        required.add(m.column.name)
    table = I(m.table.schema_, m.table.name)
    for i, row in enumerate(m.seed_rows.rows):
        where = f"{m.where}seed_rows.rows[{i}]"
        for name in sorted(required - set(row)):
            problems.append(f"{where}: the NOT NULL column {name!r} has no value and no default")
        for name, value in row.items():
            if name in extras and value is None:
                why = None if extras[name].nullable else "NULL in a NOT NULL column"
            elif name in extras:
                why = _rejected(conn, Q("SELECT {}::{}").format(L(_json_value(value)), extra_type(extras[name])))
            elif name not in cols:
                why = "not a column of the table nor an extra column"
            elif value is None:
                not_null = not m.target.nullable if name == m.column.name else cols[name][0]
                why = "NULL in a NOT NULL column" if not_null else None
            elif name == m.column.name:
                why = None  # a new value: checked against the target type by the playbook
            else:  # the server converts it as an INSERT would, with the column's type and length
                why = _rejected(conn, Q("SELECT FROM jsonb_populate_record(NULL::{}, {})").format(
                    table, L(Jsonb({name: value}))))
            if why:
                problems.append(f"{where}: {name!r}: {why}")
    if not problems:
        problems += _seed_constraint_problems(conn, m)
    return problems


def _seed_constraint_problems(conn: psycopg.Connection, m: ColumnMigration) -> list[str]:
    """Each seed row tried as an INSERT that is always rolled back: CHECK, foreign keys and unique keys speak now.

    The new columns do not exist yet, so the row is tried without them and with the migrated column holding
    an enum label (the one its value maps back from, else any): those columns are checked above.
    """
    problems = []
    table = I(m.table.schema_, m.table.name)
    extras = {c.name for c in m.extra_columns}
    label = next(iter(m.mapping))
    for i, row in enumerate(m.seed_rows.rows):
        trial = {k: v for k, v in row.items() if k not in extras}
        if m.column.name in trial:
            trial[m.column.name] = m.reverse.get(trial[m.column.name], label) if trial[m.column.name] is not None \
                else None
        cols = list(trial)
        stmt = Q("INSERT INTO {} ({}) VALUES ({}) ON CONFLICT DO NOTHING").format(
            table, Q(", ").join(I(c) for c in cols), Q(", ").join(L(_json_value(trial[c])) for c in cols))
        try:
            with conn.transaction(force_rollback=True):
                conn.execute("SET LOCAL lock_timeout = '2s'")
                conn.execute("SET LOCAL statement_timeout = '10s'")
                conn.execute(stmt)
        except (pgerr.IntegrityError, pgerr.DataError) as err:
            diag = err.diag
            what = f"constraint {diag.constraint_name!r}" if diag.constraint_name else type(err).__name__
            col = f" on column {diag.column_name!r}" if diag.column_name else ""
            detail = " ".join((diag.message_detail or diag.message_primary or "").split())
            key = ", ".join(f"{k}={row.get(k)!r}" for k in m.seed_rows.key)
            problems.append(f"{m.where}seed_rows.rows[{i}] ({key}) violates {what}{col}: {detail}")
    return problems


def labels_without_mapping(conn: psycopg.Connection, pb: Playbook) -> list[tuple[str, str]]:
    """(column label, enum label) for labels added to the type (ALTER TYPE ... ADD VALUE) that a column's
    mapping lacks; empty once the type is gone."""
    schema, name = pb.enum_type
    labels = [r[0] for r in conn.execute(
        """SELECT e.enumlabel FROM pg_enum e JOIN pg_type t ON t.oid = e.enumtypid
           JOIN pg_namespace n ON n.oid = t.typnamespace WHERE n.nspname = %s AND t.typname = %s
           ORDER BY e.enumsortorder""", (schema, name))]
    return [(m.label, lb) for m in pb.migrations for lb in labels if lb not in m.mapping]


def type_users(conn: psycopg.Connection, type_oid: int) -> list[tuple[str, str, str]]:
    """(schema, table, column) of every table column of the type (or an array of it)."""
    return [tuple(r) for r in conn.execute(
        """SELECT n.nspname, c.relname, a.attname FROM pg_attribute a
           JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
           JOIN pg_type t ON t.oid = a.atttypid
           WHERE (t.oid = %s OR t.typelem = %s) AND a.attnum > 0 AND NOT a.attisdropped
             AND c.relkind IN ('r', 'p', 'm', 'f')
           ORDER BY 1, 2, 3""", (type_oid, type_oid)).fetchall()]


def inspect(conn: psycopg.Connection, pb: Playbook) -> list[Facts]:
    """Check the database matches the playbook before the first phase; raise BadInput listing every blocker.

    One Facts per column the playbook migrates, in its order.
    """
    check_state_schema(conn, pb.settings.state_schema)
    if pb.kind == "change_type":
        return [_inspect_type_change(conn, pb, m) for m in pb.migrations]
    found = [_inspect_column(conn, pb, m) for m in pb.migrations]
    type_oid = found[0][1]
    listed = {(m.table.schema_, m.table.name, m.column.name) for m in pb.migrations}
    if pb.settings.drop_enum_type:
        schema, name = pb.enum_type
        others = [u for u in type_users(conn, type_oid) if u not in listed]
        if others:
            where = ", ".join(f"{t}.{c}" if s == "public" else f"{s}.{t}.{c}" for s, t, c in others)
            raise BadInput(f"columns: {where} also uses the enum type {schema}.{name}, which the playbook drops; "
                           f"list it under 'columns' (or set settings.drop_enum_type: false to keep the type)")
        columns = []
        for facts in found:
            if facts[0].attnum is None:  # never: inspected just now (only state stored by old versions lacks it)
                raise RuntimeError(f"no attnum in the facts of table oid {facts[2]}")
            columns.append((facts[2], facts[0].attnum))
        blockers = sorted({d for d in type_dependents(conn, type_oid, columns)
                           if not d.startswith("column ")})  # columns: covered above
        if blockers:
            raise BadInput(f"enum type {schema}.{name}: " + "; ".join(
                f"{d} uses the enum type (set settings.drop_enum_type: false to keep it)" for d in blockers))
    return [f for f, _, _ in found]


def _refuse_unbatchable(conn: psycopg.Connection, oid: int, field_: str, where: str) -> None:
    """A table without a primary key is batched by heap block ranges (engine/keyset.py BlockRanges): that needs
    TID range scans, and UPDATEs the server allows on it."""
    if conn.info.server_version < 140000:
        raise BadInput(f"{field_}: {where} has no primary key, and batching by physical position needs "
                       f"PostgreSQL 14+ (TID range scans); add a primary key, or upgrade the server")
    # Published for UPDATE with no replica identity, the server refuses every UPDATE of the table (the backfill's
    # first batch would fail); the app evidently never updates it.
    published = db.scalar(conn, """
        SELECT string_agg(p.pubname, ', ' ORDER BY p.pubname) FROM pg_publication p
        JOIN pg_class c ON c.oid = %s JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE p.pubupdate AND (c.relreplident = 'n' OR (c.relreplident = 'd' AND NOT EXISTS (
                  SELECT FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary)))
          AND EXISTS (SELECT FROM pg_publication_tables t WHERE t.pubname = p.pubname
                      AND t.schemaname = n.nspname AND t.tablename = c.relname)""", (oid,))
    if published:
        raise BadInput(f"{field_}: {where} has no primary key nor replica identity and is published for UPDATE "
                       f"({published}), so the server refuses the backfill's UPDATEs; set REPLICA IDENTITY FULL "
                       f"(or USING INDEX) on it first")


def _table(conn: psycopg.Connection, m: ColumnMigration) -> tuple[int, list[str], dict]:
    """(table oid, primary key, column info) of a column to migrate, or BadInput naming what is wrong."""
    schema, table, col = m.table.schema_, m.table.name, m.column.name
    f = m.field
    where = f"table {schema}.{table}"
    if not schema_exists(conn, schema):
        raise BadInput(f"{f('table.schema')}: schema {schema!r} does not exist")
    oid = table_oid(conn, schema, table)
    if oid is None:
        raise BadInput(f"{f('table.name')}: {where} does not exist")
    if db.scalar(conn, "SELECT relkind = 'p' OR relispartition FROM pg_class WHERE oid = %s", (oid,)):
        # The scans read heap blocks of one relation (a parent has none) and the swap renames one table's column.
        raise BadInput(f"{f('table.name')}: {where} is partitioned or a partition, which this version does not "
                       "migrate online; nothing was changed")
    pk = primary_key(conn, oid)
    if not pk:
        _refuse_unbatchable(conn, oid, f('table.name'), where)
    info = column(conn, oid, col)
    if info is None:
        raise BadInput(f"{f('column.name')}: {where} has no column {col!r}")
    existing = columns(conn, oid)
    for name, field_ in ((m.shadow, f("column.shadow")), (m.retired, f("column.retired")),
                         *((c.name, f"{m.where}extra_columns.name") for c in m.extra_columns)):
        if name in existing:
            raise BadInput(f"{field_}: {where} already has a column {name!r}")
    return oid, pk, info


def foreign_keys(conn: psycopg.Connection, oid: int, attnum: int) -> list[tuple]:
    """Foreign keys with the column on either side: (name, definition, referencing (schema, table, [columns]),
    referenced (schema, table, [columns]), referencing table oid)."""
    return [tuple(r) for r in conn.execute("""
        SELECT con.conname, pg_get_constraintdef(con.oid),
               (SELECT array[n.nspname::text, c.relname::text] FROM pg_class c JOIN pg_namespace n
                 ON n.oid = c.relnamespace WHERE c.oid = con.conrelid),
               array(SELECT a.attname::text FROM unnest(con.conkey) WITH ORDINALITY k(n, pos)
                     JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.n ORDER BY k.pos),
               (SELECT array[n.nspname::text, c.relname::text] FROM pg_class c JOIN pg_namespace n
                 ON n.oid = c.relnamespace WHERE c.oid = con.confrelid),
               array(SELECT a.attname::text FROM unnest(con.confkey) WITH ORDINALITY k(n, pos)
                     JOIN pg_attribute a ON a.attrelid = con.confrelid AND a.attnum = k.n ORDER BY k.pos),
               con.conrelid
        FROM pg_constraint con
        WHERE con.contype = 'f' AND ((con.conrelid = %s AND %s = ANY(con.conkey))
                                     OR (con.confrelid = %s AND %s = ANY(con.confkey)))
        ORDER BY 1""", (oid, attnum, oid, attnum))]


def owned_sequence(conn: psycopg.Connection, oid: int, attnum: int) -> SequenceFact | None:
    row = conn.execute("""SELECT n.nspname, c.relname, format_type(s.seqtypid, NULL)
                          FROM pg_depend d JOIN pg_sequence s ON s.seqrelid = d.objid
                          JOIN pg_class c ON c.oid = s.seqrelid JOIN pg_namespace n ON n.oid = c.relnamespace
                          WHERE d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass
                            AND d.refobjid = %s AND d.refobjsubid = %s AND d.deptype = 'a'""",
                       (oid, attnum)).fetchone()
    return SequenceFact(*row) if row else None


def _family(pb: Playbook, m: ColumnMigration, fks: list[tuple]) -> list[ForeignKeyFact]:
    """The foreign keys to move with the column (those it references from), each checked to join two listed
    columns: a foreign key to or from a column the playbook leaves out would point at a type it no longer has."""
    listed = {(u.table.schema_, u.table.name, u.column.name) for u in pb.migrations}
    mine = []
    for name, definition, (rs, rt), rcols, (fs, ft), fcols, _ in fks:
        if len(rcols) != 1:
            raise BadInput(f"{m.field('column.name')}: foreign key {name!r} ({definition}) has several columns; "
                           f"this version moves foreign keys of one column")
        for schema, table, col in ((rs, rt, rcols[0]), (fs, ft, fcols[0])):
            if (schema, table, col) not in listed:
                shown = f"{table}.{col}" if schema == "public" else f"{schema}.{table}.{col}"
                raise BadInput(f"columns: {shown} is joined to {m.label} by foreign key {name!r} and must change "
                               f"with it; list it under 'columns' (with its type, up and down)")
        if (rs, rt, rcols[0]) == (m.table.schema_, m.table.name, m.column.name):
            mine.append(ForeignKeyFact(name=name, definition=definition))
    return mine


def _inspect_type_change(conn: psycopg.Connection, pb: Playbook, m: ColumnMigration) -> Facts:
    """Facts of one change_type column, its conversions proven on the table (engine/convert.py)."""
    if m.change is None:
        raise RuntimeError(f"{m.label} is not a change_type column")
    oid, pk, info = _table(conn, m)
    where = f"{m.label} ({info['type']})"
    identity, generated = db.one(conn, "SELECT attidentity, attgenerated FROM pg_attribute WHERE attrelid = %s "
                                       "AND attnum = %s", (oid, info["attnum"]))
    if generated:
        raise BadInput(f"{m.field('column.name')}: {where} is a generated column; change its expression instead")
    if identity:
        raise BadInput(f"{m.field('column.name')}: {where} is an identity column, whose sequence cannot move to "
                       f"another column online; make it a plain column with a sequence default first "
                       f"(ALTER TABLE ... ALTER COLUMN ... DROP IDENTITY, then a sequence owned by it)")
    new_type = convert.canonical_type(conn, m, m.change.type)
    if new_type == info["type"]:
        raise BadInput(f"{m.where}type: {m.label} is of type {new_type} already")
    convert.prove(conn, m, info["type"], new_type, pk)
    fks = foreign_keys(conn, oid, info["attnum"])
    family = _family(pb, m, fks)
    indexes, blockers = column_indexes(conn, oid, info["attnum"], keys=True)
    excused = tuple(f[0] for f in fks) + tuple(ix.constraint for ix in indexes if ix.constraint)
    blockers += column_dependents(conn, oid, info["attnum"], excused=excused)
    for ix in indexes:
        for n in (ix.shadow_name, ix.retired_name):
            if relation_exists(conn, m.table.schema_, n):
                blockers.append(f"a relation named {n!r} already exists in schema {m.table.schema_!r}")
    if blockers:
        raise BadInput(f"table {m.table.schema_}.{m.table.name}.{m.column.name} cannot be migrated online: "
                       + "; ".join(blockers))
    return Facts(pk=pk, not_null=info["not_null"], default_label=None, indexes=indexes, attnum=info["attnum"],
                 old_type=info["type"], new_type=new_type, foreign_keys=family,
                 sequence=owned_sequence(conn, oid, info["attnum"]))


def _inspect_column(conn: psycopg.Connection, pb: Playbook, m: ColumnMigration) -> tuple[Facts, int, int]:
    """(facts, enum type oid, table oid) of one column, or BadInput naming the first thing that is wrong."""
    schema, table, col = m.table.schema_, m.table.name, m.column.name
    f = m.field
    where = f"table {schema}.{table}"
    oid, pk, info = _table(conn, m)
    if info["typtype"] != "e":
        raise BadInput(f"{f('column.name')}: {col!r} is of type {info['type']}, not an enum")
    if (info["type_schema"], info["type_name"]) != (m.enum_schema, m.column.enum_type):
        field_ = f("column.enum_schema") if info["type_name"] == m.column.enum_type else f("column.enum_type")
        raise BadInput(f"{field_}: {col!r} is of enum type {info['type_schema']}.{info['type_name']}, "
                       f"not {m.enum_schema}.{m.column.enum_type}")
    labels = enum_labels(conn, info["type_oid"])
    missing = [lb for lb in labels if lb not in m.mapping]
    if missing:
        raise BadInput(f"{f('mapping')}: enum label {missing[0]!r} of {m.column.enum_type} has no mapping")
    unknown = [lb for lb in m.mapping if lb not in labels]
    if unknown:
        raise BadInput(f"{f('mapping')}.{_key(unknown[0])}: {unknown[0]!r} is not a label of enum "
                       f"{m.column.enum_type}")
    if not info["not_null"] and not m.target.nullable:
        raise BadInput(f"{f('target.nullable')}: {m.label} allows NULL today, so the new column cannot be NOT NULL "
                       "(the app may write NULL); set target.nullable: true")
    label, problem = default_label(info["default"], labels)
    values = value_problems(conn, m, oid, m.target.default is not None or label is not None)
    values = values or target_rules.server_problems(conn, m)  # target.check, tried by the server itself
    if values:
        raise BadInput("; ".join(values))
    indexes, blockers = column_indexes(conn, oid, info["attnum"])
    if problem and m.target.default is None:
        blockers.append(problem + " (set target.default)")
    blockers += column_dependents(conn, oid, info["attnum"])
    for ix in indexes:
        for n in (ix.shadow_name, ix.retired_name):
            if relation_exists(conn, schema, n):
                blockers.append(f"a relation named {n!r} already exists in schema {schema!r}")
    if blockers:
        raise BadInput(f"{where}.{col} cannot be migrated online: " + "; ".join(blockers))
    return Facts(pk=pk, not_null=info["not_null"], default_label=label, indexes=indexes,
                 attnum=info["attnum"], enum=enum_facts(conn, info["type_oid"])), info["type_oid"], oid
