"""kind change_type: a column's conversion as three SQL functions, and the proof that they hold on the real column.

`up` (old type -> new type) and `down` (new -> old) are the playbook's expressions, each the body of a SQL
function whose one parameter has the column's name, so an expression reads the column as written in the
playbook. PostgreSQL parses them when the function is created, checks the result type against the declared
one, and inlines them into the backfill's and the parity scan's statements (a plain expression there).
`back` is `down` that gives NULL where `down` fails (an id past 2^31 going back to integer): a sync trigger
calls it, and an app write must never fail because the rollback copy cannot hold its value.

Before anything changes, `prove` creates them in a transaction it rolls back: a syntax error, a wrong result
type, more than one statement, or a sampled row whose value does not come back through down(up(x)) is a
BadInput naming the column (and the row).
"""

from __future__ import annotations

import re

import psycopg
from psycopg import sql

from orchestrator.engine.errors import BadInput
from orchestrator.engine.playbook import ColumnMigration, _suffixed
from orchestrator.engine.sqlkit import I, L, Q, case_map, join, render

SAMPLE_ROWS = 2_000  # rows of the table tried through down(up(x)) before the first phase


def function(m: ColumnMigration, suffix: str) -> sql.Identifier:
    """Our functions for one column (sync, conversions): `_ec_<table>_<column><suffix>` in the table's schema."""
    return I(m.table.schema_, _suffixed(f"_ec_{m.table.name}_{m.column.name}", suffix))


def up(m: ColumnMigration) -> sql.Identifier:
    return function(m, "_up")


def down(m: ColumnMigration) -> sql.Identifier:
    return function(m, "_down")


def back(m: ColumnMigration) -> sql.Identifier:
    return function(m, "_back")


def create_statements(m: ColumnMigration, old_type: str, new_type: str) -> list[sql.Composed]:
    """CREATE OR REPLACE the three functions. The types are format_type() text read from the catalog (never
    the playbook's own text); the expressions are the playbook's, each proven to be one expression by prove()."""
    if m.change is None:
        raise RuntimeError(f"{m.label} is not a change_type column")
    col, old, new = I(m.column.name), Q(old_type), Q(new_type)
    body = render(Q("BEGIN RETURN {}(v); EXCEPTION WHEN data_exception THEN RETURN NULL; END").format(down(m)))
    return [
        Q("CREATE OR REPLACE FUNCTION {}({} {}) RETURNS {} LANGUAGE sql STABLE PARALLEL SAFE RETURN ({})").format(
            up(m), col, old, new, Q(m.change.up)),
        Q("CREATE OR REPLACE FUNCTION {}({} {}) RETURNS {} LANGUAGE sql STABLE PARALLEL SAFE RETURN ({})").format(
            down(m), col, new, old, Q(m.change.down)),
        Q("CREATE OR REPLACE FUNCTION {}(v {}) RETURNS {} LANGUAGE plpgsql STABLE AS {}").format(
            back(m), new, old, L(body)),
    ]


def drop_statement(m: ColumnMigration) -> sql.Composed:
    return Q("DROP FUNCTION IF EXISTS {}, {}, {}").format(back(m), down(m), up(m))


def _first_line(err: psycopg.Error) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def canonical_type(conn: psycopg.Connection, m: ColumnMigration, type_text: str) -> str:
    """The playbook's type as PostgreSQL spells it (format_type), or BadInput: what reaches DDL is the catalog's
    text, so `bigint, x int` or a type with a trailing clause never gets there."""
    try:
        with conn.transaction(force_rollback=True):
            cur = conn.execute(Q("SELECT NULL::{}").format(Q(type_text)), prepare=True)
            res = cur.pgresult
            if res is None or res.nfields != 1:
                raise BadInput(f"{m.where}type: {type_text!r} is not one SQL type")
            oid, fmod = res.ftype(0), res.fmod(0)
            name = conn.execute("SELECT format_type(%s, %s)", (oid, None if fmod < 0 else fmod)).fetchone()
    except psycopg.Error as err:
        raise BadInput(f"{m.where}type: {type_text!r} is not a type this server knows: {_first_line(err)}") from None
    if name is None:
        raise BadInput(f"{m.where}type: {type_text!r} is not one SQL type")
    return str(name[0])


def prove(conn: psycopg.Connection, m: ColumnMigration, old_type: str, new_type: str, pk: list[str]) -> None:
    """Create the functions and try them on a sample of the table, in a transaction that is always rolled back."""
    table, col = I(m.table.schema_, m.table.name), I(m.column.name)
    stmts = create_statements(m, old_type, new_type)
    with conn.transaction(force_rollback=True):
        conn.execute("SET LOCAL lock_timeout = '2s'")
        conn.execute("SET LOCAL statement_timeout = '60s'")
        for field, stmt in zip(("up", "down", "down"), stmts):
            try:
                with conn.transaction():
                    conn.execute(stmt, prepare=True)  # the extended protocol: one statement, never two
            except psycopg.Error as err:
                raise BadInput(f"{m.where}{field}: {_first_line(err)} (in {m.label}: "
                               f"{getattr(m.change, field)!r})") from None
        pk = pk or ["ctid"]  # a table without a primary key: its rows named by where they are
        keys = join(I(c) for c in pk)
        # reltuples is -1 before the first ANALYZE: then no sampling, the first rows of the table instead
        pct = conn.execute(Q("SELECT CASE WHEN reltuples > 0 THEN least(100, greatest(0.01, 100.0 * {} / reltuples)) "
                             "END FROM pg_class WHERE oid = to_regclass({})").format(
            L(SAMPLE_ROWS), L(render(table)))).fetchone()
        sample = Q("TABLESAMPLE SYSTEM ({})").format(L(float(pct[0]))) if pct and pct[0] is not None and \
            pct[0] < 100 else Q("")
        value = I("_ec_value")  # the column may be the key itself: a name of its own in the sample
        sampled = Q("SELECT ctid AS _ec_tid, {}, {} AS {} FROM {} {} WHERE {} IS NOT NULL LIMIT {}").format(
            keys, col, value, table, sample, col, L(SAMPLE_ROWS))
        try:
            with conn.transaction():
                bad = conn.execute(Q("SELECT {}, {}::text, {}({}({}))::text FROM ({}) AS s "
                                     "WHERE {}({}({})) IS DISTINCT FROM {} LIMIT 1").format(
                    keys, value, back(m), up(m), value, sampled, back(m), up(m), value, value)).fetchone()
        except psycopg.Error as err:  # up itself fails on some row: find one, a row at a time
            _name_failing_row(conn, m, table, sampled, pk, err)
            return
        if bad is not None:
            n = len(pk)
            key, value, got = (bad[0] if n == 1 else tuple(bad[:n])), bad[n], bad[n + 1]
            raise BadInput(f"{m.where}down: the value {value} of {m.label} in the row {_pk(pk, key)} does not come "
                           f"back through down(up(x)): it gives {'NULL (down fails)' if got is None else got}")


def _name_failing_row(conn: psycopg.Connection, m: ColumnMigration, table: sql.Identifier, sampled: sql.Composed,
                      pk: list[str], err: psycopg.Error) -> None:
    rows = conn.execute(sampled).fetchall()
    for row in rows:
        try:
            with conn.transaction():
                conn.execute(Q("SELECT {}({}) FROM {} WHERE ctid = %s").format(up(m), I(m.column.name), table),
                             (row[0],))
        except psycopg.Error as row_err:
            key = row[1] if len(pk) == 1 else tuple(row[1:-1])
            raise BadInput(f"{m.where}up: fails on {m.label} in the row {_pk(pk, key)} (value {row[-1]!s}): "
                           f"{_first_line(row_err)}") from None
    raise BadInput(f"{m.where}up: fails on a value of {m.label}: {_first_line(err)}") from None


_IDENT = re.compile(r"[A-Za-z_\u0080-\uffff][A-Za-z0-9_$\u0080-\uffff]*")


def references(expr: str, column: str) -> list[tuple[int, int]]:
    """Where `expr` names `column` (start, end): an unquoted identifier equal to it as PostgreSQL folds case, or
    a quoted one spelled exactly; not inside string literals, dollar quotes or comments, not a function name
    (followed by "("), a qualified name's later part (after ".") or a type (after "::")."""
    found, i, n = [], 0, len(expr)
    while i < n:
        c = expr[i]
        if c == "'":  # a literal; E'..' also escapes with a backslash
            escapes = i > 0 and expr[i - 1] in "eE" and (i < 2 or not (expr[i - 2].isalnum() or expr[i - 2] == "_"))
            i += 1
            while i < n and not (expr[i] == "'" and expr[i + 1:i + 2] != "'"):
                i += 2 if (expr[i] == "'" or (escapes and expr[i] == "\\")) else 1
            i += 1
        elif expr.startswith("--", i):
            i = expr.find("\n", i) % (n + 1) if "\n" in expr[i:] else n
        elif expr.startswith("/*", i):
            depth, i = 1, i + 2
            while i < n and depth:
                depth += 1 if expr.startswith("/*", i) else -1 if expr.startswith("*/", i) else 0
                i += 2 if expr.startswith(("/*", "*/"), i) else 1
        elif c == "$" and (tag := re.match(r"\$([A-Za-z_][A-Za-z0-9_]*)?\$", expr[i:])):
            end = expr.find(tag.group(0), i + len(tag.group(0)))
            i = n if end < 0 else end + len(tag.group(0))
        elif c == '"' or _IDENT.match(c):
            start = i
            if c == '"':
                i += 1
                while i < n and not (expr[i] == '"' and expr[i + 1:i + 2] != '"'):
                    i += 2 if expr[i] == '"' else 1
                i += 1
                name = expr[start + 1:i - 1].replace('""', '"')
            else:
                i = _IDENT.match(expr, start).end()  # type: ignore[union-attr]
                name = expr[start:i].lower()
            before, after = expr[:start].rstrip(), expr[i:].lstrip()
            if name == column and not before.endswith((".", "::")) and not after.startswith("("):
                found.append((start, i))
        elif c.isdigit():  # a number, whose digits and exponent are no identifier
            i = re.compile(r"[0-9.]+(?:[eE][+-]?[0-9]+)?").match(expr, i).end()  # type: ignore[union-attr]
        else:
            i += 1
    return found


def up_of_default(m: ColumnMigration, default: str) -> str | None:
    """The new column's default: up() applied to the old default's expression, the function inlined (a default
    calling our function would outlive it): the playbook's `up` with the column's one reference replaced by the
    old default in parentheses. None when up names the column more than once (a volatile default such as
    nextval() would be computed once per reference)."""
    if m.change is None:
        raise RuntimeError(f"{m.label} is not a change_type column")
    up_text, refs = m.change.up, references(m.change.up, m.column.name)
    if len(refs) > 1:
        return None
    if not refs:
        return up_text
    (start, end), = refs
    return f"{up_text[:start]}({default}){up_text[end:]}"


def _pk(pk: list[str], key) -> str:
    values = key if isinstance(key, tuple) else (key,)
    return ", ".join(f"{c}={v!r}" for c, v in zip(pk, values))


# -- how a column's values cross between the two types: the enum's label map, or change_type's functions -------


class Conversion:
    """What the generic phases ask of a column's conversion. `forward`: the new value of an old one; `backward`:
    the old value of a new one, NULL where there is none; `fallback`: what the old copy holds instead of NULL
    (None: NULL); `translations`: old values a stale old-version instance may still write into the new column
    after the swap, with their new values."""

    old_name: str  # in messages: "enum workflowtype", "integer"
    lost: str  # in a refusal: "values that <lost> <old_name>"
    fallback: sql.Composable | None = None
    translations: list[tuple[str, str]] = []

    def forward(self, expr: sql.Composable) -> sql.Composed:
        raise NotImplementedError

    def backward(self, expr: sql.Composable, *, typed: bool = True) -> sql.Composed:
        raise NotImplementedError

    def refusal_hint(self) -> str:
        raise NotImplementedError

    def round_trip(self, expr: sql.Composable) -> sql.Composed:
        """down(up(x)), inlined (change_type only)."""
        raise NotImplementedError


class LabelMap(Conversion):
    """kind enum_to_varchar: the playbook's mapping, compared as the enum (cheaper than via text)."""

    def __init__(self, m: ColumnMigration, enum_type: sql.Identifier):
        self.m, self.enum_type = m, enum_type
        self.old_name, self.lost = f"enum {m.column.enum_type}", "that have no label in"
        rb = m.rollback
        self.fallback = Q("{}::{}").format(L(rb.fallback_label), enum_type) if rb.unmapped == "fallback" else None
        self.translations = [(k, v) for k, v in m.mapping.items() if k != v]

    def forward(self, expr: sql.Composable) -> sql.Composed:
        return case_map(expr, self.m.mapping.items())

    def backward(self, expr: sql.Composable, *, typed: bool = True) -> sql.Composed:
        """typed=False compares as text, for the reverse migration before its CREATE TYPE."""
        return case_map(expr, self.m.reverse.items(), result_type=self.enum_type if typed else None)

    def refusal_hint(self) -> str:
        return "change those rows, add them to rollback.reverse_mapping, or set rollback.unmapped: fallback in " \
               "the playbook"


class Expressions(Conversion):
    """kind change_type: the up/down functions of this module (`back`: down, or NULL where it fails)."""

    def __init__(self, m: ColumnMigration, old_type: str):
        self.m, self.old_name, self.lost = m, old_type, "that cannot go back to"

    def forward(self, expr: sql.Composable) -> sql.Composed:
        return Q("{}({})").format(up(self.m), expr)

    def backward(self, expr: sql.Composable, *, typed: bool = True) -> sql.Composed:
        return Q("{}({})").format(back(self.m), expr)

    def refusal_hint(self) -> str:
        return "change or delete those rows (they hold values only the new type can), then re-run"

    def round_trip(self, expr: sql.Composable) -> sql.Composed:
        return Q("{}({}({}))").format(down(self.m), up(self.m), expr)
