"""The SQL a DBA reads: every public function, view and table of schema outbound_heartbeat
has a COMMENT (what psql's \\df+ and \\dv+ show)."""

from __future__ import annotations

from typing import Any

import psycopg


def test_every_public_object_has_a_comment(conn: psycopg.Connection[Any]) -> None:
    rows = conn.execute(
        """
        SELECT 'function ' || p.oid::regprocedure::text
          FROM pg_proc AS p
         WHERE p.pronamespace = 'outbound_heartbeat'::regnamespace
           AND p.proname NOT LIKE '\\_%'
           AND pg_catalog.obj_description(p.oid, 'pg_proc') IS NULL
        UNION ALL
        SELECT c.relkind::text || ' ' || c.oid::regclass::text
          FROM pg_class AS c
         WHERE c.relnamespace = 'outbound_heartbeat'::regnamespace AND c.relkind IN ('r', 'v', 'p')
           AND pg_catalog.obj_description(c.oid, 'pg_class') IS NULL
        ORDER BY 1
        """
    ).fetchall()
    assert [r[0] for r in rows] == []
    public = conn.execute(
        "SELECT count(*) FROM pg_proc WHERE pronamespace = 'outbound_heartbeat'::regnamespace"
        " AND proname NOT LIKE '\\_%'"
    ).fetchone()
    assert public is not None and public[0] >= 18


def test_docs_sql_reference_matches_the_catalog(conn: psycopg.Connection[Any]) -> None:
    """docs/sql-reference.md documents every public function and view (a leading underscore marks an
    internal one), and names none that does not exist."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "sql-reference.md").read_text()
    documented = set(re.findall(r"`([a-z_]+)\(", text)) | set(re.findall(r"view `([a-z_]+)`", text))
    documented |= {v for group in re.findall(r"views ((?:`[a-z_]+`(?:, )?)+)", text)
                   for v in re.findall(r"`([a-z_]+)`", group)}
    rows = conn.execute(
        "SELECT proname FROM pg_proc WHERE pronamespace = 'outbound_heartbeat'::regnamespace"
        " AND proname NOT LIKE '\\_%' AND prokind = 'f'"
        " UNION SELECT relname FROM pg_class WHERE relnamespace = 'outbound_heartbeat'::regnamespace"
        " AND relkind = 'v' AND relname NOT LIKE '\\_%'"
    ).fetchall()
    catalog = {r[0] for r in rows}
    assert sorted(catalog - documented) == []  # undocumented
    sql_words = {"now", "count", "make_interval", "pg_terminate_backend", "set_config", "coalesce"}
    named_functions = set(re.findall(r"\| `([a-z_]+)\(", text))
    assert sorted(named_functions - catalog - sql_words) == []  # documented but absent
