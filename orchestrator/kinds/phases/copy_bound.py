"""What the copy's swap (phase 3 by copy, see copy.py) cannot carry: objects bound to the table by its OID.

The swap renames the table away and its twin in: everything that holds the table's OID rather than its name
follows the renamed-away table, then blocks its DROP. The swap carries the table's own indexes, constraints,
triggers, defaults, owned sequences, other tables' foreign keys to it and the app version views; every other
`pg_depend` entry on the table, its row type or its indexes is refused here, by name, with what to do. A
publication reaches the twin without any pg_depend entry (FOR ALL TABLES, FOR TABLES IN SCHEMA): refused too.
All in one query, asked before anything changes and again under the swap's lock (a dependent created meanwhile).
"""

from __future__ import annotations

from psycopg import sql

from orchestrator.engine.sqlkit import L, Q

# Rows: the dependent's catalog, its description, how it is bound (table, type or index), the dependency's type
# and whether it names the table as a whole (refobjsubid 0). {t}: the table, as text; %s: our version schemas.
BOUND = """
WITH t AS (SELECT c.oid, c.reltype FROM pg_class c WHERE c.oid = to_regclass({t})),
ix AS (SELECT x.indexrelid AS oid FROM pg_index x, t WHERE x.indrelid = t.oid),
d AS (
  SELECT d.*, CASE WHEN d.refclassid = 'pg_type'::regclass THEN 'type'
                   WHEN d.refobjid = t.oid THEN 'table' ELSE 'index' END AS via
    FROM pg_depend d, t
   WHERE (d.refclassid = 'pg_class'::regclass AND (d.refobjid = t.oid OR d.refobjid IN (SELECT oid FROM ix)))
      OR (d.refclassid = 'pg_type'::regclass AND d.refobjid = t.reltype))
SELECT d.classid::regclass::text, pg_describe_object(d.classid, d.objid, d.objsubid), d.via,
       bool_or(d.deptype = 'n' AND d.refobjsubid = 0 AND d.via = 'table')
  FROM d, t
 WHERE NOT (
       -- the table's own indexes, owned sequences and TOAST table; its row type and that one's array type
       (d.classid = 'pg_class'::regclass AND d.via = 'table' AND d.deptype IN ('a', 'i'))
    OR (d.classid = 'pg_type'::regclass AND d.via <> 'index' AND d.deptype = 'i')
       -- its own defaults, constraints and triggers, unless they name the table itself ('t'::regclass)
    OR (d.classid = 'pg_attrdef'::regclass AND d.via = 'table' AND NOT (d.deptype = 'n' AND d.refobjsubid = 0)
        AND EXISTS (SELECT FROM pg_attrdef a WHERE a.oid = d.objid AND a.adrelid = t.oid))
    OR (d.classid = 'pg_trigger'::regclass AND d.via = 'table' AND NOT (d.deptype = 'n' AND d.refobjsubid = 0)
        AND EXISTS (SELECT FROM pg_trigger g WHERE g.oid = d.objid AND g.tgrelid = t.oid))
    OR (d.classid = 'pg_constraint'::regclass AND d.via <> 'type' AND NOT (d.deptype = 'n' AND d.refobjsubid = 0
        AND d.via = 'table') AND EXISTS (SELECT FROM pg_constraint k WHERE k.oid = d.objid
        AND (k.conrelid = t.oid OR (k.contype = 'f' AND k.confrelid = t.oid))))
       -- the app version views, re-pointed by the swap
    OR (d.classid = 'pg_rewrite'::regclass AND d.via = 'table' AND EXISTS (SELECT FROM pg_rewrite r
        JOIN pg_class v ON v.oid = r.ev_class JOIN pg_namespace n ON n.oid = v.relnamespace
        WHERE r.oid = d.objid AND v.oid <> t.oid AND n.nspname = ANY (%s)))
       -- named by their own checks (copy.py): inheritance children, the table's own policies
    OR (d.classid = 'pg_class'::regclass AND EXISTS (SELECT FROM pg_inherits WHERE inhrelid = d.objid
        AND inhparent = t.oid))
    OR (d.classid = 'pg_policy'::regclass AND EXISTS (SELECT FROM pg_policy p WHERE p.oid = d.objid
        AND p.polrelid = t.oid)))
 GROUP BY 1, 2, 3 ORDER BY 2, 3"""

# Publications that publish every table of the schema, hence the twin too (its INSERTs streamed to subscribers).
PUBLISHED = """
SELECT p.pubname, 'FOR ALL TABLES' FROM pg_publication p WHERE p.puballtables
{schemas}
 ORDER BY 1"""
IN_SCHEMA = """UNION ALL
SELECT p.pubname, 'FOR TABLES IN SCHEMA ' || quote_ident(n.nspname) FROM pg_publication p
  JOIN pg_publication_namespace pn ON pn.pnpubid = p.oid JOIN pg_namespace n ON n.oid = pn.pnnspid
 WHERE n.oid = (SELECT relnamespace FROM pg_class WHERE oid = to_regclass({t}))"""

DROP_AND_RECREATE = "drop it for phase 3 and create it again after"


def bound_query(table: str) -> sql.Composed:
    """BOUND over the table (its name as text); one parameter: the version schemas' names."""
    return Q(BOUND).format(t=L(table))


def published_query(table: str, server_version: int) -> sql.Composed:
    """PUBLISHED over the table's schema (pg_publication_namespace is PostgreSQL 15+)."""
    schemas = Q(IN_SCHEMA).format(t=L(table)) if server_version >= 150000 else Q("")
    return Q(PUBLISHED).format(schemas=schemas)


def in_words(catalog: str, what: str, via: str, names_table: bool) -> str:
    """One dependent of the table (a row of BOUND): what it is, why the swap cannot carry it, what to do."""
    if catalog == "pg_proc" and via == "table":
        return (f"{what} has a SQL-standard body (BEGIN ATOMIC or RETURN) bound to the table itself: after the swap "
                f"it would use the replaced table (re-create it with a string body, AS $$ ... $$, resolved by name "
                f"at each call)")
    if via == "type":
        return f"{what} uses its row type, bound to the table itself ({DROP_AND_RECREATE})"
    if catalog == "pg_rewrite" and what.startswith("rule _RETURN on "):
        return (f"{what.removeprefix('rule _RETURN on ')} reads it, bound to the table itself: a copy re-points only "
                f"the app version views, any other would go on reading the replaced table ({DROP_AND_RECREATE})")
    if catalog == "pg_rewrite":
        return f"{what}: a copy does not carry rules ({DROP_AND_RECREATE})"
    if catalog == "pg_policy":
        return (f"{what} reads it, bound to the table itself: it would go on reading the replaced table "
                f"({DROP_AND_RECREATE})")
    if catalog == "pg_statistic_ext":
        return f"{what}: a copy does not carry extended statistics ({DROP_AND_RECREATE})"
    if catalog == "pg_publication_rel":
        return f"it is published ({what}): a copy would stop its subscribers ({DROP_AND_RECREATE})"
    if names_table:
        return (f"{what} names the table itself (as 'table'::regclass does): it would name the replaced table "
                f"(name it by text, or {DROP_AND_RECREATE})")
    if catalog == "pg_trigger":
        return f"{what} is bound to it (CREATE CONSTRAINT TRIGGER ... FROM): {DROP_AND_RECREATE}"
    return f"{what} is bound to it by its OID and would follow the replaced table ({DROP_AND_RECREATE})"


def published_in_words(name: str, how: str) -> str:
    return (f"publication {name} ({how}) would publish the copy and stream its rows to subscribers "
            f"(drop it for phase 3, or publish a list of tables, FOR TABLE, without this one)")
