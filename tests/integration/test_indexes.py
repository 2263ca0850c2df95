"""An index behind every foreign key (issue 15, item 8), on a fresh install and on adopted
legacy tables: deleting or re-keying a run never scans the jobs table."""

from __future__ import annotations

from typing import Any

import psycopg

from outbound_heartbeat import migrate

from ..helpers import seed_legacy

UNINDEXED_FOREIGN_KEYS = """
SELECT c.conrelid::regclass::text, c.conname
  FROM pg_constraint AS c
 WHERE c.contype = 'f'
   AND (c.conrelid IN ('public.outbound_call_runs'::regclass, 'public.outbound_call_jobs'::regclass)
        OR c.connamespace::regnamespace::text = 'outbound_heartbeat')
   AND NOT EXISTS (
        SELECT 1 FROM pg_index AS i
         WHERE i.indrelid = c.conrelid AND i.indpred IS NULL
           AND (i.indkey::int2[])[0:array_length(c.conkey, 1) - 1] @> c.conkey
           AND (i.indkey::int2[])[0:array_length(c.conkey, 1) - 1] <@ c.conkey)
"""


def foreign_keys(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT count(*) FROM pg_constraint WHERE contype = 'f'"
                       " AND conrelid = 'public.outbound_call_jobs'::regclass").fetchone()
    assert row is not None
    return int(row[0])


def test_every_foreign_key_has_a_full_index(conn: psycopg.Connection[Any]) -> None:
    assert foreign_keys(conn) == 1
    assert conn.execute(UNINDEXED_FOREIGN_KEYS).fetchall() == []


def test_adopted_legacy_tables_get_it_too(empty_dsn: str) -> None:
    seed_legacy(empty_dsn)
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        assert conn.execute(UNINDEXED_FOREIGN_KEYS).fetchall() != []  # the app's own tables lacked it
    migrate(empty_dsn)
    with psycopg.connect(empty_dsn, autocommit=True) as conn:
        assert foreign_keys(conn) == 1
        assert conn.execute(UNINDEXED_FOREIGN_KEYS).fetchall() == []
