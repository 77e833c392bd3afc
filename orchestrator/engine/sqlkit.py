"""Small builders over psycopg's `sql` module: the only way this project writes SQL."""

from __future__ import annotations

from typing import Any, Iterable, Protocol, TypeAlias

from psycopg import sql

Q = sql.SQL
I = sql.Identifier
L = sql.Literal

# What psycopg executes: a bare SQL snippet or a composed statement (an Identifier or Literal alone is not).
Stmt: TypeAlias = sql.SQL | sql.Composed

_TYPES = {
    "text": "text", "boolean": "boolean", "integer": "integer",
    "bigint": "bigint", "timestamptz": "timestamptz", "jsonb": "jsonb",
}


def qualified(schema: str, name: str) -> sql.Identifier:
    return sql.Identifier(schema, name)


def column_type(type_: str, length: int | None) -> Stmt:
    if type_ == "varchar":
        return Q("varchar({})").format(L(length))
    return Q(_TYPES[type_])  # only whitelisted keywords reach SQL


def typed_literal(value: Any, type_sql: sql.Composable) -> sql.Composed:
    return Q("{}::{}").format(L(value), type_sql)


class Typed(Protocol):  # a playbook column: its SQL type and, for varchar, its length
    # read-only members, so that a model whose `type` is a Literal of the names satisfies the protocol
    @property
    def type(self) -> str: ...

    @property
    def length(self) -> int | None: ...


def extra_type(col: Typed) -> Stmt:
    return column_type(col.type, col.length)


def case_map(expr: sql.Composable, pairs: Iterable[tuple[str, str]], *,
             result_type: sql.Composable | None = None, otherwise: sql.Composable = Q("NULL")) -> sql.Composed:
    """CASE expr WHEN 'a' THEN 'x' ... ELSE otherwise END, with the results cast to result_type."""
    whens = []
    for src, dst in pairs:
        out = typed_literal(dst, result_type) if result_type is not None else L(dst)
        whens.append(Q("WHEN {} THEN {}").format(L(src), out))
    return Q("CASE {} {} ELSE {} END").format(expr, Q(" ").join(whens), otherwise)


def join(parts: Iterable[sql.Composable], sep: str = ", ") -> sql.Composed:
    return Q(sep).join(list(parts))


def idents(names: Iterable[str]) -> sql.Composed:
    return join(I(n) for n in names)


def row_of(names: Iterable[str], prefix: str | None = None) -> sql.Composed:
    """(a, b) or (t.a, t.b): a row value for keyset comparisons over composite keys."""
    cols = [I(prefix, n) if prefix else I(n) for n in names]
    return Q("({})").format(join(cols))


def placeholders(n: int) -> sql.Composed:
    return Q("({})").format(join(sql.Placeholder() for _ in range(n)))


def render(stmt: sql.Composable, conn=None) -> str:
    return stmt.as_string(conn)
