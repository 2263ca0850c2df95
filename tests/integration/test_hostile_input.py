"""Hostile input: Hypothesis throws NULLs, empty and huge strings, extreme numbers and
intervals, unicode and SQL-looking text at every SQL function, as a DBA's psql could. Each
call either succeeds or fails with a documented OH SQLSTATE, and a failed call writes nothing."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg.types.json import Jsonb

from outbound_heartbeat import service

from ..helpers import snapshot

DOCUMENTED = {"OH400", "OH403", "OH404", "OH409", "OH423"}
BIGINT = 2**63 - 1

ids = st.one_of(st.none(), st.integers(-BIGINT - 1, BIGINT), st.sampled_from([0, -1, 1, 2, 3, BIGINT]))
texts = st.one_of(
    st.none(),
    # NUL and lone surrogates cannot even be encoded by the client: psycopg refuses them.
    st.text(alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"), max_size=300),
    st.sampled_from(["", " ", "\t\n", "w1", "'; DROP TABLE outbound_call_runs; --", "w1' OR '1'='1",
                     "😀" * 60, "ש" * 201, "x" * 10_000, "completed", "failed", "cancelled"]),
)
intervals = st.one_of(
    st.none(),
    st.timedeltas(min_value=timedelta(days=-999_999_999), max_value=timedelta(days=999_999_999)),
    st.sampled_from([timedelta(0), timedelta(microseconds=1), timedelta(seconds=-1),
                     timedelta(days=365 * 5000)]),
)
ints = st.one_of(st.none(), st.integers(-(2**31), 2**31 - 1), st.sampled_from([0, -1, 100_000, 100_001]))
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**53), 2**53), st.text(
        alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"), max_size=20)),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(
        alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"), max_size=5),
        children, max_size=4),
    max_leaves=10,
)
jobs = st.one_of(st.none(), json_values, st.lists(json_values, max_size=5))

# Call keys well-formed or not, naming a seeded job or none (none of them genuine).
call_keys = st.one_of(texts, st.sampled_from(["oh1-1-1-1-" + "0" * 32, "oh1-3-0-1-" + "f" * 32,
                                              f"oh1-{BIGINT}-{BIGINT}-{BIGINT}-" + "a" * 32,
                                              "oh1-99999999999999999999-1-1-" + "a" * 32]))

# One entry per SQL function: the statement (every argument typed, as psql would) and its
# arguments' strategies.
FUNCTIONS: dict[str, tuple[str, list[st.SearchStrategy[Any]]]] = {
    "create_run": ("SELECT * FROM outbound_heartbeat.create_run(%s::bigint, %s::jsonb, %s::boolean)",
                   [ids, jobs, st.one_of(st.none(), st.booleans())]),
    "claim_run": ("SELECT * FROM outbound_heartbeat.claim_run(%s::text, %s::bigint)", [texts, ids]),
    "heartbeat": ("SELECT outbound_heartbeat.heartbeat(%s::bigint, %s::text, %s::bigint)", [ids, texts, ids]),
    "heartbeat_leases": ("SELECT * FROM outbound_heartbeat.heartbeat_leases(%s::bigint[], %s::text[],"
                         " %s::bigint[])", [st.one_of(st.none(), st.lists(ids, max_size=4)),
                                           st.one_of(st.none(), st.lists(texts, max_size=4)),
                                           st.one_of(st.none(), st.lists(ids, max_size=4))]),
    "next_job": ("SELECT * FROM outbound_heartbeat.next_job(%s::bigint, %s::text, %s::bigint)", [ids, texts, ids]),
    "finish_job": ("SELECT * FROM outbound_heartbeat.finish_job(%s::bigint, %s::text, %s::bigint, %s::text, %s::text)",
                   [ids, texts, ids, texts, texts]),
    "finish_run": ("SELECT * FROM outbound_heartbeat.finish_run(%s::bigint, %s::text, %s::bigint, %s::text)",
                   [ids, texts, ids, texts]),
    "finish_runs": ("SELECT * FROM outbound_heartbeat.finish_runs(%s::bigint[], %s::text[], %s::bigint[],"
                    " %s::text[])", [st.one_of(st.none(), st.lists(ids, max_size=4)),
                                     st.one_of(st.none(), st.lists(texts, max_size=4)),
                                     st.one_of(st.none(), st.lists(ids, max_size=4)),
                                     st.one_of(st.none(), st.lists(texts, max_size=4))]),
    "get_active_run": ("SELECT * FROM outbound_heartbeat.get_active_run(%s::bigint, %s::interval)", [ids, intervals]),
    "request_cancel": ("SELECT * FROM outbound_heartbeat.request_cancel(%s::bigint, %s::bigint)", [ids, ids]),
    "force_cancel": ("SELECT * FROM outbound_heartbeat.force_cancel(%s::bigint, %s::bigint)", [ids, ids]),
    "cleanup_stuck_runs": ("SELECT * FROM outbound_heartbeat.cleanup_stuck_runs(%s::boolean, %s::text)",
                           [st.one_of(st.none(), st.booleans()), texts]),
    "health_check": ("SELECT * FROM outbound_heartbeat.health_check(%s::interval, %s::integer)", [intervals, ints]),
    "list_events": ("SELECT * FROM outbound_heartbeat.list_events(%s::bigint, %s::bigint, %s::integer)",
                    [ids, ids, ints]),
    # The console's reads (sql/13_console.sql).
    "list_runs": ("SELECT * FROM outbound_heartbeat.list_runs(%s::bigint, %s::interval, %s::integer)",
                  [ids, intervals, ints]),
    "describe_run": ("SELECT * FROM outbound_heartbeat.describe_run(%s::bigint, %s::bigint)", [ids, ids]),
    "list_jobs": ("SELECT * FROM outbound_heartbeat.list_jobs(%s::bigint, %s::bigint, %s::text, %s::integer)",
                  [ids, ids, texts, ints]),
    "verify_events": ("SELECT * FROM outbound_heartbeat.verify_events(%s::bigint)", [ids]),
    # Calls (sql/15_calls.sql): keys well-formed or not, naming a seeded job or none.
    "resolve_call": ("SELECT * FROM outbound_heartbeat.resolve_call(%s::text, %s::text, %s::text, %s::bigint,"
                     " %s::text)", [call_keys,
                                    st.one_of(texts, st.sampled_from(["completed", "failed", "not_placed",
                                                                      "timed_out"])),
                                    texts, ids,
                                    st.one_of(texts, st.sampled_from(["callback", "provider", "worker"]))]),
    "audit_call_access_denied": ("SELECT * FROM outbound_heartbeat.audit_call_access_denied(%s::text, %s::bigint)",
                                 [call_keys, ids]),
    "list_orphaned_calls": ("SELECT * FROM outbound_heartbeat.list_orphaned_calls()", []),
    # A provider reconcile's listing (sql/16_reconcile.sql).
    "list_orphaned_call_keys": ("SELECT * FROM outbound_heartbeat.list_orphaned_call_keys(%s::bigint, %s::integer)",
                                [ids, ints]),
    "audit_access_denied": ("SELECT * FROM outbound_heartbeat.audit_access_denied(%s::bigint, %s::bigint, %s::text)",
                            [ids, ids, texts]),
    "prune_events": ("SELECT * FROM outbound_heartbeat.prune_events(%s::integer, %s::integer)", [ints, ints]),
    # The handover (sql/14_privileges.sql): a role that is not there, the API's owner, a superuser.
    "hand_over_tables": ("SELECT * FROM outbound_heartbeat.hand_over_tables(%s::text, %s::text, %s::boolean,"
                         " %s::interval, %s::integer)",
                         [st.one_of(texts, st.sampled_from(["outbound_heartbeat_owner", "postgres"])),
                          st.one_of(texts, st.sampled_from(["outbound_heartbeat_owner", "postgres"])),
                          st.one_of(st.none(), st.booleans()), intervals, ints]),
}


def seed(conn: psycopg.Connection[Any]) -> None:
    """A little of everything, so hostile calls also meet real rows: runs 1 (running, w1,
    epoch 1, business 1), 2 (pending, business 2), 3 (cancelled)."""
    running = service.create_run(conn, 1, [{"n": 1}, {"n": 2}])
    service.claim_run(conn, "w1", running.id)
    service.next_job(conn, running.id, "w1", 1)
    service.create_run(conn, 2, [{}])
    service.force_cancel(conn, service.create_run(conn, 3, [{}]).id)


def test_every_sql_function_is_covered(conn: psycopg.Connection[Any]) -> None:
    api = {r[0] for r in conn.execute(
        "SELECT p.proname FROM pg_proc p WHERE p.pronamespace = 'outbound_heartbeat'::regnamespace"
        " AND p.proname NOT LIKE '\\_%' AND p.prorettype <> 'trigger'::regtype").fetchall()}
    # Reads with no arguments or only the operator's own role name are covered elsewhere.
    assert api - set(FUNCTIONS) <= {"list_active_runs", "current_settings", "metrics", "count_runs",
                                    "grant_app_role", "grant_dba_role", "verify_counters",
                                    "recount_counters"}, api - set(FUNCTIONS)


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_hostile_arguments(conn: psycopg.Connection[Any], name: str) -> None:
    seed(conn)
    conn.execute("UPDATE outbound_heartbeat.settings SET lock_timeout = interval '200 ms'")
    query, strategies = FUNCTIONS[name]
    # The database as it is before the next call: taken again only after a call that succeeded
    # (it may have written); after a refused one it was just compared equal, so it still holds.
    known: list[tuple[Any, ...]] = []

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(st.tuples(*strategies))
    def call(args: tuple[Any, ...]) -> None:
        params = [Jsonb(a) if name == "create_run" and i == 1 and a is not None else a
                  for i, a in enumerate(args)]
        before = known.pop() if known else snapshot(conn)
        try:
            conn.execute(query, params).fetchall()
        except psycopg.Error as exc:
            assert exc.sqlstate in DOCUMENTED, (name, args, exc.sqlstate, str(exc))
            assert exc.diag.message_primary, (name, args)
            after = snapshot(conn)
            assert after == before, (name, args, "a refused call wrote something")
            known.append(after)

    call()
