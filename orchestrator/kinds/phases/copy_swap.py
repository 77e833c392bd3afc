"""The copy's swap (phase 3 by copy, see copy.py): what it reads of the table and its twin, in one query each,
and the statements it sends in one round trip, all while it holds the table's lock.

Read once under the lock: the table's triggers, foreign keys (its own and other tables' to it), key and index
comments, owned sequences, grants, comment, replica identity and storage parameters (CAPTURE), which the twin
takes over; and the definition both were made of (SHAPE), compared so that DDL run on the table while it was
copied is refused by name rather than undone by the rename.
"""

from __future__ import annotations

from dataclasses import dataclass

from psycopg import sql

from orchestrator.engine.context import Context
from orchestrator.engine.sqlkit import I, L, Q, join

# Other sessions holding a snapshot (backend_xmin), idle or running, as CREATE INDEX CONCURRENTLY waits for them:
# a REPEATABLE READ or SERIALIZABLE transaction keeps its own to its end, also through a long statement. Not the
# orchestrator's own sessions, nor those waiting for the caller's locks (a READ COMMITTED statement takes its
# snapshot again once it has its locks). Rows: pid, virtual transaction, state, transaction start, its age, query.
OLD_SNAPSHOTS = Q("""SELECT a.pid, l.virtualtransaction, a.state, a.xact_start, (now() - a.xact_start)::text,
                            left(a.query, 120)
                     FROM pg_stat_activity a JOIN pg_locks l ON l.pid = a.pid AND l.locktype = 'virtualxid'
                      AND l.mode = 'ExclusiveLock' AND l.granted
                     WHERE a.pid <> pg_backend_pid() AND a.backend_type = 'client backend'
                       AND a.datname = current_database() AND a.backend_xmin IS NOT NULL
                       AND coalesce(a.application_name, '') NOT LIKE 'orchestrator:%%'
                       AND NOT pg_backend_pid() = ANY (pg_blocking_pids(a.pid)) ORDER BY a.pid""")
# Which of those virtual transactions are still running.
STILL_RUNNING = Q("""SELECT virtualtransaction FROM pg_locks WHERE locktype = 'virtualxid' AND granted
                     AND virtualtransaction = ANY (%s)""")


# What the swap reads under its lock, each (query over the table {t}, its number of columns); one round trip.
CAPTURE: dict[str, tuple[str, int]] = {
    "triggers": ("SELECT tgname AS c0, pg_get_triggerdef(oid) AS c1, tgenabled::text AS c2, "
                 "obj_description(oid, 'pg_trigger') AS c3 FROM pg_trigger WHERE tgrelid = to_regclass({t}) "
                 "AND NOT tgisinternal AND NOT tgname = ANY (%s) ORDER BY tgname", 4),
    "fks": ("SELECT conname AS c0, pg_get_constraintdef(oid) AS c1, obj_description(oid, 'pg_constraint') AS c2 "
            "FROM pg_constraint WHERE conrelid = to_regclass({t}) AND contype = 'f' ORDER BY conname", 3),
    "incoming": ("SELECT conrelid::regclass::text AS c0, conname AS c1, pg_get_constraintdef(oid) AS c2, "
                 "obj_description(oid, 'pg_constraint') AS c3 FROM pg_constraint WHERE confrelid = to_regclass({t}) "
                 "AND conrelid <> confrelid AND contype = 'f' ORDER BY 1, 2", 4),
    "key_comments": ("SELECT conname AS c0, obj_description(oid, 'pg_constraint') AS c1 FROM pg_constraint "
                     "WHERE conrelid = to_regclass({t}) AND contype IN ('p', 'u')", 2),
    "index_comments": ("SELECT c.relname AS c0, obj_description(c.oid, 'pg_class') AS c1 FROM pg_index x "
                       "JOIN pg_class c ON c.oid = x.indexrelid WHERE x.indrelid = to_regclass({t})", 2),
    "sequences": ("SELECT s.oid::regclass::text AS c0, a.attname AS c1 FROM pg_depend d "
                  "JOIN pg_class s ON s.oid = d.objid JOIN pg_attribute a ON a.attrelid = d.refobjid "
                  "AND a.attnum = d.refobjsubid WHERE d.refobjid = to_regclass({t}) "
                  "AND d.classid = 'pg_class'::regclass AND s.relkind = 'S' AND d.deptype = 'a'", 2),
    # Grants in the ACL's order, which pg_dump prints: a role's entry comes before any grant it made (it had to
    # hold the grant option first, and revoking that removes the grants made with it).
    "grants": ("SELECT c0, c1, c2, c3, c4 FROM ("
               "SELECT NULL::name AS c0, p.privilege_type AS c1, p.grantee::int8 AS c2, p.is_grantable AS c3, "
               "nullif(p.grantor, c.relowner)::int8 AS c4, 0 AS n, p.ordinality AS o "
               "FROM pg_class c, aclexplode(c.relacl) WITH ORDINALITY p WHERE c.oid = to_regclass({t}) UNION ALL "
               "SELECT a.attname, p.privilege_type, p.grantee::int8, p.is_grantable, "
               "nullif(p.grantor, c.relowner)::int8, a.attnum, p.ordinality "
               "FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid, aclexplode(a.attacl) WITH ORDINALITY p "
               "WHERE c.oid = to_regclass({t}) AND a.attnum > 0 AND NOT a.attisdropped) g "
               "ORDER BY n, o", 5),
    "table": ("SELECT obj_description(c.oid, 'pg_class') AS c0, c.relreplident::text AS c1, "
              "(SELECT i.relname FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid WHERE x.indrelid = c.oid "
              "AND x.indisreplident) AS c2, c.reloptions AS c3, t.reloptions AS c4 FROM pg_class c "
              "LEFT JOIN pg_class t ON t.oid = c.reltoastrelid WHERE c.oid = to_regclass({t})", 5),
    # oids as int8: JSON writes an oid as a string, and PUBLIC is grantee 0 (no role has that oid).
    "roles": ("SELECT oid::int8 AS c0, rolname AS c1 FROM pg_roles", 2),
}

# What the twin copied from the table when it was made (its columns with their types, defaults, NOT NULL,
# storage, statistics and comments; its CHECKs; its owner) and the indexes each has: the swap compares the two
# under its lock, so DDL run on the table while it was copied is never silently undone. Rows: kind, name, text,
# the index's key constraint (kind, name), order. {r}: the relation, as text.
SHAPE = """
SELECT 'owner', '', pg_get_userbyid(relowner), NULL, NULL, 0 FROM pg_class WHERE oid = to_regclass({r})
UNION ALL
SELECT 'column', a.attname, concat_ws(' ', format_type(a.atttypid, a.atttypmod),
       CASE WHEN a.attcollation <> t.typcollation THEN 'COLLATE ' || a.attcollation::regcollation::text END,
       CASE WHEN a.attnotnull THEN 'NOT NULL' END,
       CASE WHEN a.attidentity <> '' THEN 'GENERATED AS IDENTITY' END,
       CASE WHEN a.attgenerated <> '' THEN 'GENERATED ALWAYS AS ' || pg_get_expr(d.adbin, d.adrelid)
            WHEN d.adbin IS NOT NULL THEN 'DEFAULT ' || pg_get_expr(d.adbin, d.adrelid) END,
       CASE WHEN a.attstorage <> t.typstorage THEN 'STORAGE ' || a.attstorage::text END,
       CASE WHEN a.attcompression <> '' THEN 'COMPRESSION ' || a.attcompression::text END,
       CASE WHEN coalesce(a.attstattarget::int, -1) >= 0 THEN 'STATISTICS ' || a.attstattarget::text END,
       'OPTIONS ' || array_to_string(a.attoptions, ', '),
       'COMMENT ' || quote_literal(col_description(a.attrelid, a.attnum))), NULL, NULL, a.attnum
  FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
  LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
 WHERE a.attrelid = to_regclass({r}) AND a.attnum > 0 AND NOT a.attisdropped
UNION ALL
SELECT 'check', conname, concat_ws(' ', pg_get_constraintdef(oid),
       'COMMENT ' || quote_literal(obj_description(oid, 'pg_constraint'))), NULL, NULL, 0
  FROM pg_constraint WHERE conrelid = to_regclass({r}) AND contype = 'c'
UNION ALL
SELECT 'index', i.relname, CASE WHEN x.indisunique THEN 'UNIQUE ' ELSE '' END
       || CASE WHEN starts_with(i.def, i.qualified) THEN substr(i.def, length(i.qualified) + 1)
               WHEN starts_with(i.def, i.plain) THEN substr(i.def, length(i.plain) + 1) ELSE i.def END
       -- what pg_get_indexdef leaves out (copy.py carry_index_details)
       || CASE WHEN x.indisclustered THEN ' CLUSTER' ELSE '' END
       || coalesce((SELECT ' STATISTICS ' || string_agg(a.attnum || ' ' || a.attstattarget, ', ' ORDER BY a.attnum)
                      FROM pg_attribute a WHERE a.attrelid = x.indexrelid
                       AND coalesce(a.attstattarget::int, -1) >= 0), ''),
       con.contype::text, con.conname, 0
  FROM pg_index x
  JOIN LATERAL (SELECT ic.relname, pg_get_indexdef(x.indexrelid) AS def,
                       format('CREATE %sINDEX %s ON %s', CASE WHEN x.indisunique THEN 'UNIQUE ' ELSE '' END,
                              quote_ident(ic.relname), quote_ident(n.nspname) || '.' || quote_ident(t.relname))
                           AS qualified,
                       format('CREATE %sINDEX %s ON %s', CASE WHEN x.indisunique THEN 'UNIQUE ' ELSE '' END,
                              quote_ident(ic.relname), quote_ident(t.relname)) AS plain
                  FROM pg_class ic, pg_class t, pg_namespace n
                 WHERE ic.oid = x.indexrelid AND t.oid = x.indrelid AND n.oid = t.relnamespace) i ON true
  LEFT JOIN pg_constraint con ON con.conindid = x.indexrelid AND con.conrelid = x.indrelid
       AND con.contype IN ('p', 'u', 'x')
 WHERE x.indrelid = to_regclass({r})"""


@dataclass
class IndexPlan:
    name: str  # the table's index
    temp: str  # its copy on the twin, until the exchange
    tail: sql.SQL  # "USING btree (a, b) WHERE ...", from pg_get_indexdef: the catalog's own text
    unique: bool
    constraint: str | None  # the PRIMARY KEY / UNIQUE constraint it backs
    contype: str | None
    is_key: bool  # the index the copy's ON CONFLICT relies on: built before the rows


def capture_query(table: str) -> sql.Composed:
    """Every CAPTURE query over the table (its name as text) as one row of JSON arrays; one parameter: the
    names of our own triggers, left out."""
    parts = [Q("(SELECT coalesce(json_agg(json_build_array({})), '[]') FROM ({}) s)").format(
        join(I("s", f"c{i}") for i in range(n)), Q(text).format(t=L(table))) for text, n in CAPTURE.values()]
    return Q("SELECT {}").format(join(parts))


def shape_query(table: str, twin: str) -> sql.Composed:
    """SHAPE of the table and of its twin (names as text), each row led by its side: 'table' or 'copy'."""
    return Q("SELECT s.* FROM ({} UNION ALL {}) AS s ORDER BY 1, 2, 7").format(*(
        Q("SELECT {}::text AS side, * FROM ({}) AS d").format(L(side), Q(SHAPE).format(r=L(rel)))
        for side, rel in (("table", table), ("copy", twin))))


def definition_changes(rows: list[tuple], plans: list[IndexPlan], own: set[str]) -> list[tuple[str, str]]:
    """What differs between the table and its twin in the rows of shape_query, in words; `own`: the
    migration's indexes, built on the twin only, under their final names."""
    by_temp = {ix.temp: ix for ix in plans}
    found: dict[str, dict[tuple[str, str], str]] = {"table": {}, "copy": {}}
    order: dict[str, list[str]] = {"table": [], "copy": []}
    for side, kind, name, text, contype, conname, _ in rows:
        if kind == "index" and side == "copy":
            if name in by_temp:
                ix = by_temp[name]
                name, contype, conname = ix.name, ix.contype, ix.constraint
            elif name in own:
                continue
            else:
                name = f"built on the copy as {name}"
        if kind == "index" and contype in ("p", "u"):
            text = f"{text} ({'PRIMARY KEY' if contype == 'p' else 'UNIQUE'} {conname})"
        found[side][(kind, name)] = text
        if kind == "column":
            order[side].append(name)
    table, twin = found["table"], found["copy"]
    changes: list[tuple[str, str]] = []  # (kind, in words)
    for key in sorted(set(table) | set(twin)):
        what = f"{key[0]} {key[1]!r}" if key[1] else key[0]
        if key not in twin:
            changes.append((key[0], f"{what} ({table[key]}) is new on the table"))
        elif key not in table:
            changes.append((key[0], f"{what} ({twin[key]}) is gone from the table"))
        elif table[key] != twin[key]:
            changes.append((key[0], f"{what} is now {table[key]!r} (was {twin[key]!r})"))
    if not changes and order["table"] != order["copy"]:
        changes.append(("column", f"the columns are now in the order {', '.join(order['table'])}"))
    return changes


def swap_statements(ctx: Context, found: dict, plans: list[IndexPlan], views: list[sql.Composed], *,
                    twin: sql.Identifier, old_name: str, tag: str) -> list[sql.SQL | sql.Composed]:
    """The swap's statements, from what capture_query found under its lock: the twin takes the table's name
    and everything of the table's that LIKE did not copy."""
    triggers, fks, incoming, sequences, grants = (found[k] for k in (
        "triggers", "fks", "incoming", "sequences", "grants"))
    key_comments, index_comments = dict(found["key_comments"]), dict(found["index_comments"])
    (comment, replident, replindex, main_options, toast_options), = found["table"]
    names = dict(found["roles"])
    t = ctx.table
    stmts: list[sql.SQL | sql.Composed] = [
        # Other tables' foreign keys follow the table's OID: dropped here, added again on the copy below.
        *(Q("ALTER TABLE {} DROP CONSTRAINT {}").format(Q(child), I(name)) for child, name, _, _ in incoming),
        Q("ALTER TABLE {} RENAME TO {}").format(t, I(old_name)),
        Q("ALTER TABLE {} RENAME TO {}").format(twin, I(ctx.m.table.name)),
        *views,
        *(Q("ALTER SEQUENCE {} OWNED BY {}").format(Q(seq), I(ctx.m.table.schema_, ctx.m.table.name, col))
          for seq, col in sequences),
        # The old table is dropped after the commit (unlinking its files would hold the lock): its indexes
        # give their names up now.
        *(Q("ALTER INDEX {} RENAME TO {}").format(ctx.index(ix.name), I(f"_ec_old_{tag}_{i}"))
          for i, ix in enumerate(plans)),
    ]
    for ix in plans:
        if ix.constraint and ix.contype in ("p", "u"):
            kind = Q("PRIMARY KEY") if ix.contype == "p" else Q("UNIQUE")
            stmts.append(Q("ALTER TABLE {} ADD CONSTRAINT {} {} USING INDEX {}").format(
                t, I(ix.constraint), kind, I(ix.temp)))
            if key_comments.get(ix.constraint):
                stmts.append(Q("COMMENT ON CONSTRAINT {} ON {} IS {}").format(
                    I(ix.constraint), t, L(key_comments[ix.constraint])))
        else:
            stmts.append(Q("ALTER INDEX {} RENAME TO {}").format(ctx.index(ix.temp), I(ix.name)))
        if index_comments.get(ix.name):
            stmts.append(Q("COMMENT ON INDEX {} IS {}").format(ctx.index(ix.name), L(index_comments[ix.name])))
    for owner, name, definition, note in [(t, *fk) for fk in fks] + [(Q(c), *rest) for c, *rest in incoming]:
        stmts.append(Q("ALTER TABLE {} ADD CONSTRAINT {} {} NOT VALID").format(owner, I(name), Q(definition)))
        if note:
            stmts.append(Q("COMMENT ON CONSTRAINT {} ON {} IS {}").format(I(name), owner, L(note)))
    for name, definition, enabled, note in triggers:
        stmts.append(Q(definition))
        if enabled != "O":
            state = {"D": "DISABLE", "A": "ENABLE ALWAYS", "R": "ENABLE REPLICA"}[enabled]
            stmts.append(Q("ALTER TABLE {} {} TRIGGER {}").format(t, Q(state), I(name)))
        if note:
            stmts.append(Q("COMMENT ON TRIGGER {} ON {} IS {}").format(I(name), t, L(note)))
    if comment:
        stmts.append(Q("COMMENT ON TABLE {} IS {}").format(t, L(comment)))
    stmts += grant_statements(t, grants, names)
    mine = {o.split("=", 1)[0]: o.split("=", 1)[1] for o in main_options or []}
    mine.update({f"toast.{o.split('=', 1)[0]}": o.split("=", 1)[1] for o in toast_options or []})
    stmts.append(Q("ALTER TABLE {} RESET (autovacuum_enabled, toast.autovacuum_enabled)").format(t))
    if mine:
        stmts.append(Q("ALTER TABLE {} SET ({})").format(t, join(
            Q("{} = {}").format(Q(".").join(I(part) for part in k.split(".")), L(v)) for k, v in mine.items())))
    if replident != "d":
        stmts.append(Q("ALTER TABLE {} REPLICA IDENTITY {}").format(t, Q("USING INDEX {}").format(I(replindex))
                     if replident == "i" else Q({"f": "FULL", "n": "NOTHING"}[replident])))
    return stmts


def grant_statements(t: sql.Composable, grants: list, names: dict) -> list[sql.SQL | sql.Composed]:
    """The table's grants again, each by its grantor: one by a role other than the owner is made as that role
    (SET LOCAL ROLE), so that its REVOKE still reaches it; copy.py refuses a grantor the migrating role cannot be."""
    stmts: list[sql.SQL | sql.Composed] = []
    for column, privilege, grantee, grantable, grantor in grants:
        who = Q("PUBLIC") if grantee == 0 else I(names[grantee])
        what = Q(privilege) if column is None else Q("{} ({})").format(Q(privilege), I(column))
        grant = Q("GRANT {} ON TABLE {} TO {}{}").format(what, t, who, Q(" WITH GRANT OPTION") if grantable else Q(""))
        if grantor is None:
            stmts.append(grant)
        else:
            stmts += [Q("SET LOCAL ROLE {}").format(I(names[grantor])), grant, Q("RESET ROLE")]
    return stmts
