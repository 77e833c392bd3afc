"""What the console prints, and how, for people at a terminal and for files and CI logs.

On a terminal: rich tables, colour, the progress bar. Anywhere else (a pipe, a file, a CI log): plain text,
never wrapped or truncated (tables are aligned columns at their full width), logs on stderr as one JSON object
per line, stdout flushed line by line so log lines and output keep their order in a shared file.
Hints name the command of the entry point in use: `make phase-3 ... YES=1` under make.
"""

from __future__ import annotations

import os
import re
import shutil
import sys

from rich.console import Console
from rich.table import Table
from rich.text import Text

WIDE = 10_000  # the width of "no limit" for output that is not a terminal

EXIT_CODES = ("Exit codes: 0 done; 1 failure (fix the cause, re-run the same command: completed work is kept); "
              "2 bad input (nothing changed); 3 refused: order, precondition, data loss or lock budget "
              "(nothing changed); 130 interrupted (re-run to resume).")


def confirm(yes: bool, question: str) -> None:
    """Ask on a terminal; anywhere else --yes is the answer. A refusal changes nothing."""
    import typer

    from orchestrator.engine.errors import Refused
    if yes:
        return
    if sys.stdin.isatty():
        if typer.confirm(question, default=False):
            return
        raise Refused("not confirmed; nothing was changed")
    raise Refused(f"{question.split(';')[0]}: confirmation needed", hint="re-run with --yes")


def is_terminal() -> bool:
    return sys.stdout.isatty()


def make_console() -> Console:
    if is_terminal():
        return Console()
    # Not a terminal: no wrapping or cropping at an imagined 80 columns; rich strips colours by itself.
    return Console(soft_wrap=True, highlight=False, emoji=False, width=WIDE)


def line_buffered_stdout() -> None:
    """Piped stdout is block-buffered: a line printed before a log line could land after it in a file."""
    try:
        sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]  # any TextIO may stand in; see except
    except (AttributeError, ValueError):
        pass


def table(title: str, columns: list[str], rows: list[list[str]]):
    """A rich Table on a terminal; aligned plain text, full width, otherwise."""
    if is_terminal():
        t = Table(title=title)
        for c in columns:
            t.add_column(c)
        for r in rows:
            t.add_row(*r)
        return t
    return Text(plain_table(title, columns, rows), no_wrap=True, overflow="ignore")


def plain_table(title: str, columns: list[str], rows: list[list[str]]) -> str:
    cells = [[" ".join(str(v).split()) for v in r] for r in [columns, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = [title] if title else []
    for k, r in enumerate(cells):
        lines.append("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def print_table(console: Console, title: str, columns: list[str], rows: list[list[str]]) -> None:
    console.print(table(title, columns, rows), soft_wrap=not is_terminal())


def rule(console: Console, title: str) -> None:
    if is_terminal():
        console.rule(title)
    else:
        console.print(f"-- {title} --", markup=False, highlight=False)


# -- hints for the entry point in use -----------------------------------------------------------------------------

def frontend() -> str:
    return "make" if os.environ.get("ORCHESTRATOR_FRONTEND") == "make" else "cli"


def program() -> str:
    """How the user called the CLI: `orchestrator` when that is on PATH, else the path they used."""
    argv0 = sys.argv[0] if sys.argv else ""
    if os.path.basename(argv0) != "orchestrator":
        return "orchestrator"  # python -m orchestrator, tests, embedding
    found = shutil.which("orchestrator")
    try:
        if found and os.path.samefile(found, argv0):
            return "orchestrator"
    except OSError:
        pass
    rel = os.path.relpath(argv0)
    return rel if not rel.startswith("../..") else argv0


_MAKE = [
    (re.compile(r"\borchestrator run 1 after --setup-only"), "make phase-1 after make demo-db"),
    (re.compile(r"\borchestrator run (\d+)"), r"make phase-\1"),
    (re.compile(r"\borchestrator rollback (\d+)"), r"make rollback-\1"),
    (re.compile(r"\borchestrator contract (\d+)"), r"make contract-\1"),
    (re.compile(r"\borchestrator (contract|status|verify|plan|pause|resume|log|server-stop)\b"), r"make \1"),
    (re.compile(r"re-run with --yes"), "run the same make target again with YES=1"),
    (re.compile(r"--yes"), "YES=1"),
    (re.compile(r"re-run the same command"), "run the same make target again"),
    (re.compile(r"check --dsn / DATABASE_URL"), "check DATABASE_URL="),
]


def for_frontend(text: str) -> str:
    """Rewrite the commands a message names for the entry point that printed it."""
    if frontend() == "make":
        for pattern, repl in _MAKE:
            text = pattern.sub(repl, text)
        return text
    prog = program()
    if prog != "orchestrator":
        text = re.sub(r"(?<![\w./-])orchestrator (?=[a-z])", prog + " ", text)
    return text


# -- a PL/pgSQL body over several lines, for people (plan) --------------------------------------------------------

_BODY = re.compile(r"^(CREATE (?:OR REPLACE )?FUNCTION [^']*? LANGUAGE plpgsql [^']*?AS ')(.*)(')$", re.S)
_ATOM = re.compile(r"''(?:''''|[^'])*''|\"(?:\"\"|[^\"])*\"|\w+|\s+|.", re.S)
_OPENS = {"BEGIN", "THEN", "ELSE", "LOOP", "DECLARE"}  # a block's body begins after these
_CLOSES = {"ELSIF", "ELSE", "END", "EXCEPTION"}  # and ends before these


def readable_sql(text: str) -> str:
    """A CREATE FUNCTION ... LANGUAGE plpgsql AS '<body>' statement with its body one PL/pgSQL statement a line,
    indented by block. Breaks go only where the body has white space outside its string literals, quoted names,
    parentheses and CASE expressions, so the function is the same one (PL/pgSQL reads any white space alike);
    anything else is returned as it is."""
    m = _BODY.match(text)
    if m is None:
        return text
    atoms = _ATOM.findall(m.group(2))
    out: list[str] = []
    parens = cases = level = 0
    prev = ""  # the last word or sign before this atom
    for i, a in enumerate(atoms):
        if a.isspace() and parens == 0 and cases == 0:
            nxt = next((b.upper() for b in atoms[i + 1:] if not b.isspace()), "")
            if (prev in _OPENS or prev == ";" or nxt in _CLOSES) and not (prev == "END" and nxt in ("IF", "LOOP")):
                if nxt in _CLOSES:
                    level = max(level - 1, 0)
                out.append("\n" + "    " * (level + 1))
                continue
        out.append(a)
        word = a.upper()
        if a == "(":
            parens += 1
        elif a == ")":
            parens = max(parens - 1, 0)
        elif word == "CASE" and parens == 0:
            cases += 1
        elif word == "END" and cases and parens == 0:
            cases -= 1
            word = "END CASE"
        elif word in _OPENS and parens == 0 and cases == 0:
            level += 1
        if not a.isspace():
            prev = word
    return m.group(1) + "".join(out) + m.group(3)
