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
