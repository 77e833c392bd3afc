"""The target column's value rules (`target.check`): what the enum guaranteed, kept as a CHECK constraint.

Two rules, either or both:
  non_empty: true      the value holds at least one character that is not white space ('' and '  ' fail)
  pattern: '^...$'     the value matches this regular expression (PostgreSQL's `~`: case-sensitive, unanchored
                       unless the pattern says ^ and $)

The CHECK is PostgreSQL's (POSIX "advanced" regular expressions), but the playbook is validated before any
database is reached, in Python. The two dialects differ (class shorthands like \\d and \\w depend on the
server's locale, `$` matches before a final newline in Python, back-references, look-arounds, embedded
options and POSIX classes exist in one form only), so a pattern is accepted only in a subset that both read
the same way and that is purely regular, so that both engines accept exactly the same strings:

  literal characters (printable; the specials . ^ $ * + ? ( ) [ ] { } | \\ escaped with a backslash),
  . (any character), ^ and $ (start and end of the value), groups ( ) and (?: ), alternation |,
  quantifiers * + ? {m} {m,} {m,n} (m <= n <= 255), each optionally followed by ? (non-greedy: the same
  strings match), bracket expressions [abc] [^a-z0-9_] of characters and ranges (- first or last is a
  literal; no backslash, no [: :] classes, no nested [).

Anything else is refused when the playbook is read, with the position. Every value the playbook itself
puts in the column (mapping targets, rollback.reverse_mapping values, target.default, the seed rows' values)
is checked against the rules then (Python, exit 2), and again by the server when the database is inspected
before phase 1 (the very CHECK expression the phases install), so a difference between the engines cannot
slip through either.
"""

from __future__ import annotations

import re
from functools import lru_cache

from psycopg import errors as pgerr
from psycopg import sql

from orchestrator.engine import db
from orchestrator.engine.sqlkit import column_type

MAX_PATTERN = 1000
MAX_BOUND = 255  # PostgreSQL's RE_DUP_MAX
_SPECIAL = set(".^$*+?()[]{}|\\")
_NOT_BLANK = "[^[:space:]]"  # PostgreSQL: at least one character that is not white space


class PatternError(ValueError):
    pass


@lru_cache(maxsize=64)
def to_python(pattern: str) -> re.Pattern:
    """Check `pattern` is in the accepted subset; the Python regex that accepts the same strings."""
    if not pattern:
        raise PatternError("must not be empty")
    if len(pattern) > MAX_PATTERN:
        raise PatternError(f"is longer than {MAX_PATTERN} characters")
    out: list[str] = []
    i, n = 0, len(pattern)
    depth = 0
    atom = False  # the last token can take a quantifier

    def bad(pos: int, why: str) -> PatternError:
        return PatternError(f"{why} at position {pos} of {pattern!r} (accepted: literals, . ^ $ ( ) (?: ) | "
                            f"* + ? {{m,n}} and [...] of characters and ranges; "
                            f"see orchestrator/engine/target_rules.py)")

    while i < n:
        c = pattern[i]
        if not c.isprintable():
            raise bad(i, "a non-printable character")
        if c == "\\":
            nxt = pattern[i + 1] if i + 1 < n else ""
            if not nxt or not nxt.isascii() or nxt.isalnum() or not nxt.isprintable() or nxt == " ":
                raise bad(i, f"the escape \\{nxt} (only punctuation can be escaped)")
            out.append(re.escape(nxt))
            i, atom = i + 2, True
        elif c == "[":
            end, py = _bracket(pattern, i, bad)
            out.append(py)
            i, atom = end, True
        elif c == "(":
            if pattern.startswith("(?:", i):
                out.append("(?:")
                i += 3
            elif pattern.startswith("(?", i):
                raise bad(i, "a (? construct other than (?:")
            else:
                out.append("(")
                i += 1
            depth, atom = depth + 1, False
        elif c == ")":
            if depth == 0:
                raise bad(i, "an unbalanced )")
            out.append(")")
            depth, i, atom = depth - 1, i + 1, True
        elif c == "|":
            out.append("|")
            i, atom = i + 1, False
        elif c in "*+?{":
            if not atom:
                raise bad(i, f"the quantifier {c} with nothing to repeat")
            if c == "{":
                m = re.match(r"\{(\d{1,3})(,(\d{1,3})?)?\}", pattern[i:])
                if not m:
                    raise bad(i, "a { that is not a bound {m}, {m,} or {m,n}")
                lo, hi = int(m.group(1)), m.group(3)
                if lo > MAX_BOUND or (hi is not None and not lo <= int(hi) <= MAX_BOUND):
                    raise bad(i, f"the bound {m.group(0)} (needs m <= n <= {MAX_BOUND})")
                out.append(m.group(0))
                i += len(m.group(0))
            else:
                out.append(c)
                i += 1
            if i < n and pattern[i] == "?":  # non-greedy: which strings match does not change
                out.append("?")
                i += 1
            atom = False
        elif c == "^":
            out.append("^")  # no MULTILINE: start of the value only, as in PostgreSQL
            i, atom = i + 1, False
        elif c == "$":
            out.append(r"\Z")  # Python's $ would also match before a final newline
            i, atom = i + 1, False
        elif c == ".":
            out.append(".")  # with DOTALL: any character, newline included, as in PostgreSQL
            i, atom = i + 1, True
        elif c in "]}":
            raise bad(i, f"an unescaped {c}")
        else:
            out.append(re.escape(c))
            i, atom = i + 1, True
    if depth:
        raise bad(n, "an unclosed (")
    try:
        return re.compile("".join(out), re.DOTALL)
    except re.error as err:  # pragma: no cover - the subset above always compiles
        raise PatternError(f"{pattern!r}: {err}") from None


def _bracket(pattern: str, start: int, bad) -> tuple[int, str]:
    """A bracket expression starting at `start`: (index after it, its Python form)."""
    i = start + 1
    negate = pattern.startswith("^", i)
    i += negate
    items: list[str] = []  # single characters, or 'a-z' ranges, as written
    chars: list[str] = []
    while True:
        if i >= len(pattern):
            raise bad(start, "an unclosed [")
        c = pattern[i]
        if c == "]" and chars:
            break
        if c in "[]\\" or not c.isprintable():
            raise bad(i, f"{c!r} inside [...] (write it outside a bracket, escaped)")
        chars.append(c)
        i += 1
    j = 0
    while j < len(chars):
        if j + 2 < len(chars) and chars[j + 1] == "-":
            lo, hi = chars[j], chars[j + 2]
            if lo == "-" or hi == "-" or ord(lo) > ord(hi):
                raise bad(start, f"the range {lo}-{hi} in [...]")
            items.append(re.escape(lo) + "-" + re.escape(hi))
            j += 3
        elif chars[j] == "-" and 0 < j < len(chars) - 1:
            raise bad(start, "a - inside [...] that is neither a range nor first or last")
        else:
            items.append(re.escape(chars[j]))
            j += 1
    return i + 1, "[" + ("^" if negate else "") + "".join(items) + "]"


def not_blank(value: str) -> bool:
    return any(not c.isspace() for c in value)


def violation(rules, value: str) -> str | None:
    """Why `value` breaks the rules (a TargetCheck), or None."""
    if rules.non_empty and not not_blank(value):
        return "is empty or only white space (target.check.non_empty)"
    if rules.pattern is not None and not to_python(rules.pattern).search(value):
        return f"does not match target.check.pattern {rules.pattern!r}"
    return None


def expression(rules, column: sql.Composable) -> sql.Composed:
    """The CHECK's condition on `column`. NULL passes (a CHECK is only violated by false): whether NULL is
    allowed is target.nullable's business, enforced by NOT NULL."""
    parts = []
    if rules.non_empty:
        parts.append(sql.SQL("{} ~ {}").format(column, sql.Literal(_NOT_BLANK)))
    if rules.pattern is not None:
        parts.append(sql.SQL("{} ~ {}").format(column, sql.Literal(rules.pattern)))
    return sql.SQL(" AND ").join(parts)


def server_problems(conn, m) -> list[str]:
    """The same values, tried by the server against the very CHECK expression the phases install."""
    rules = m.target.check
    if rules is None:
        return []
    problems = []
    for where, value in m.own_values():
        expr = expression(rules, sql.SQL("{}::{}").format(sql.Literal(value),
                                                        column_type(m.target.type, m.target.length)))
        try:
            with conn.transaction():
                ok = db.scalar(conn, sql.SQL("SELECT ({}) IS NOT FALSE").format(expr))
        except (pgerr.DataError, pgerr.SyntaxError) as err:
            line = str(err).strip().splitlines()[0]
            return [f"{m.field('target.check.pattern')}: the server rejects {rules.pattern!r}: {line}"]
        if not ok:
            problems.append(f"{where}: {value!r} violates target.check (checked by the server)")
    return problems
