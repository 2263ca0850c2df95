"""1. heartbeat(): ours against a raw single-row UPDATE and procrastinate's worker heartbeat;
HOT updates and table size over many heartbeats."""

from __future__ import annotations

import re
from typing import Any

import psycopg

from outbound_heartbeat import service

from .common import Results, Server, alternate

RAW_UPDATE = "UPDATE outbound_call_runs SET last_heartbeat_at = now() WHERE id = %s"


def _procrastinate(server: Server) -> tuple[psycopg.Connection[Any], Any] | None:
    try:
        from procrastinate import schema, sql
    except ImportError:
        return None
    dsn = server.database("bench_procrastinate", library=False)
    conn = psycopg.connect(dsn, autocommit=True)
    conn.execute(schema.SchemaManager.get_schema())
    row = conn.execute(sql.queries["register_worker"]).fetchone()
    assert row is not None
    query = sql.queries["update_heartbeat"]
    worker_id = row[0]
    return conn, lambda: conn.execute(query, {"worker_id": worker_id})


STATEMENTS = {
    "raw": "UPDATE outbound_call_runs SET last_heartbeat_at = now() WHERE id = $1",
    "ours": "SELECT outbound_heartbeat.heartbeat($1, $2, $3)",
    "procrastinate": "SELECT procrastinate_update_heartbeat_v1($1)",
}


def _server_times(dsn: str, proc: object) -> dict[str, tuple[float, int]]:
    """Total server execution ms and calls of each benchmarked statement, from pg_stat_statements."""
    out = {}
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        for key, text in STATEMENTS.items():
            row = conn.execute("SELECT coalesce(sum(total_exec_time), 0), coalesce(sum(calls), 0)"
                               " FROM pg_stat_statements WHERE query = %s", (text,)).fetchone()
            if row is not None and (key != "procrastinate" or proc is not None):
                out[key] = (float(row[0]), int(row[1]))
    return out


def _per_call(before: dict[str, tuple[float, int]], after: dict[str, tuple[float, int]], key: str) -> float:
    calls = after[key][1] - before[key][1]
    return (after[key][0] - before[key][0]) / calls * 1000 if calls else float("nan")


def run(server: Server, results: Results, *, rounds: int, calls: int, hot_beats: int) -> None:
    print("heartbeat", flush=True)
    dsn = server.database("bench_heartbeat")
    conns = [psycopg.connect(dsn, autocommit=True) for _ in range(3)]
    claims = []
    for i, conn in enumerate(conns):
        run_ = service.create_run(conn, 1000 + i, [{}])
        claim = service.claim_run(conn, f"bench-{i}", run_.id)
        assert claim is not None
        claims.append(claim)
    ours_sql, ours_py, raw = conns
    a, b, c = claims

    fns = {
        "raw UPDATE": lambda: raw.execute(RAW_UPDATE, (c.run_id,)),
        "heartbeat() in SQL": lambda: ours_sql.execute(
            "SELECT outbound_heartbeat.heartbeat(%s, %s, %s)", (a.run_id, a.worker_id, a.lease_epoch)
        ).fetchone(),
        "service.heartbeat()": lambda: service.heartbeat(ours_py, b.run_id, b.worker_id, b.lease_epoch),
    }
    proc = _procrastinate(server)
    if proc is not None:
        fns["procrastinate heartbeat"] = proc[1]
    server_before = _server_times(dsn, proc)
    measured = alternate(fns, rounds, calls, baseline="raw UPDATE")
    server_after = _server_times(dsn, proc)
    for name, (median, ratio) in measured.items():
        goal = "<= 1.2x raw" if name == "heartbeat() in SQL" else ""
        results.add("heartbeat", f"{name}: {median * 1e6:.0f} µs/call, client to client",
                    f"{ratio:.2f}x raw", goal, ratio <= 1.2 if goal else None)
    raw_server = _per_call(server_before, server_after, "raw")
    for key, label in (("ours", "heartbeat()"), ("procrastinate", "procrastinate heartbeat")):
        if key in server_after:
            ours = _per_call(server_before, server_after, key)
            results.add("heartbeat", f"{label}: {ours:.1f} µs vs raw UPDATE {raw_server:.1f} µs,"
                        " inside the server (pg_stat_statements)", f"{ours / raw_server:.2f}x raw")
    if proc is None:
        results.add("heartbeat", "procrastinate heartbeat", "not measured: pip install '.[bench]'")
    else:
        proc[0].close()

    # HOT updates: many heartbeats from several workers, each its own transaction.
    size = "SELECT pg_relation_size('outbound_call_runs'), pg_total_relation_size('outbound_call_runs')"
    stats = ("SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables"
             " WHERE relid = 'outbound_call_runs'::regclass")
    with psycopg.connect(dsn, autocommit=True) as probe:
        def read(query: str) -> tuple[int, int]:
            probe.execute("SELECT pg_stat_clear_snapshot()")
            row = probe.execute(query).fetchone()
            assert row is not None
            return int(row[0]), int(row[1])

        for conn in conns:
            conn.execute("SELECT pg_stat_force_next_flush()")
        before_size, before_stats = read(size), read(stats)
        query = "SELECT outbound_heartbeat.heartbeat(%s, %s, %s)"
        # One statement, one transaction each, as a worker sends them (no pipelining: a pipeline
        # would put a batch in one transaction and change what HOT pruning can reclaim).
        for n in range(hot_beats):
            claim = claims[n % len(claims)]
            ours_sql.execute(query, (claim.run_id, claim.worker_id, claim.lease_epoch))
        ours_sql.execute("SELECT pg_stat_force_next_flush()")
        after_size, after_stats = read(size), read(stats)
    updates = after_stats[0] - before_stats[0]
    hot = after_stats[1] - before_stats[1]
    ratio = hot / updates if updates else 0.0
    results.add("heartbeat", f"HOT updates over {hot_beats:,} heartbeats", f"{ratio:.1%} ({hot:,}/{updates:,})",
                ">= 95 %", ratio >= 0.95)
    results.add("heartbeat", "runs table size before -> after (heap, total)",
                f"{before_size[0] // 1024} -> {after_size[0] // 1024} KiB, "
                f"{before_size[1] // 1024} -> {after_size[1] // 1024} KiB")
    _rights(dsn, results, raw, claims[2], rounds=rounds, calls=calls)
    for conn in conns:
        conn.close()
    server.drop("bench_heartbeat", "bench_procrastinate")


#: heartbeat() with the rights attributes of each choice (sql/08_worker_lease.sql, docs/security.md).
VARIANTS = {
    "invoker, no SET (previous release)": "SECURITY INVOKER RESET ALL",
    "definer, no SET": "SECURITY DEFINER RESET ALL",
    "definer, pinned search_path (installed)": "SECURITY DEFINER SET search_path = pg_catalog, pg_temp",
}


def _rights(dsn: str, results: Results, raw: psycopg.Connection[Any], claim: Any, *, rounds: int, calls: int) -> None:
    """The cost of definer rights and of a pinned search_path on the fast path: copies of
    heartbeat() differing only in those attributes, against the raw UPDATE, side by side."""
    with psycopg.connect(dsn, autocommit=True) as admin:
        row = admin.execute("SELECT pg_get_functiondef('outbound_heartbeat.heartbeat(bigint, text, bigint)'"
                            "::regprocedure)").fetchone()
        assert row is not None
        names = {}
        for i, (label, attributes) in enumerate(VARIANTS.items()):
            name = f"heartbeat_variant_{i}"
            body = re.sub(r"(?<![_.\w])heartbeat\.(run_id|worker_id|lease_epoch)\b", rf"{name}.\1", row[0])
            admin.execute(body.replace("outbound_heartbeat.heartbeat(", f"outbound_heartbeat.{name}(", 1))
            admin.execute(f"ALTER FUNCTION outbound_heartbeat.{name}(bigint, text, bigint) {attributes}")
            names[label] = name
        conns = {label: psycopg.connect(dsn, autocommit=True) for label in names}
        fns: dict[str, Any] = {"raw UPDATE": lambda: raw.execute(RAW_UPDATE, (claim.run_id,))}
        for label, name in names.items():
            query = f"SELECT outbound_heartbeat.{name}(%s, %s, %s)"
            fns[label] = (lambda c, q: lambda: c.execute(q, (claim.run_id, claim.worker_id, claim.lease_epoch))
                          .fetchone())(conns[label], query)
        stat = "SELECT coalesce(sum(total_exec_time), 0), coalesce(sum(calls), 0) FROM pg_stat_statements" \
               " WHERE query = %s"
        texts = {label: f"SELECT outbound_heartbeat.{name}($1, $2, $3)" for label, name in names.items()}
        texts["raw UPDATE"] = STATEMENTS["raw"]

        def server() -> dict[str, tuple[float, int]]:
            out = {}
            for label, text in texts.items():
                row = admin.execute(stat, (text,)).fetchone()
                assert row is not None
                out[label] = (float(row[0]), int(row[1]))
            return out

        before = server()
        measured = alternate(fns, rounds, calls, baseline="raw UPDATE")
        after = server()
        for label, (median, ratio) in measured.items():
            if label != "raw UPDATE":
                inside = _per_call(before, after, label)
                results.add("heartbeat", f"heartbeat() {label}: {median * 1e6:.0f} µs/call client to client,"
                            f" {inside:.1f} µs inside the server", f"{ratio:.2f}x raw")
        # The same calls in a server-side loop: no round trip, so only the function's own cost.
        loops = {
            label: (lambda c, q: lambda: c.execute(q, (claim.run_id, claim.worker_id, claim.lease_epoch)))(
                conns[label],
                f"SELECT count(outbound_heartbeat.{name}(%s, %s, %s)) FROM generate_series(1, {calls})")
            for label, name in names.items()
        }
        looped = alternate(loops, rounds, 1, baseline=next(iter(names)))
        for label, (median, ratio) in looped.items():
            results.add("heartbeat", f"heartbeat() {label}: {median / calls * 1e6:.1f} µs/call in a server-side"
                        " loop", f"{ratio:.2f}x the previous release")
        for conn in conns.values():
            conn.close()
        for name in names.values():
            admin.execute(f"DROP FUNCTION outbound_heartbeat.{name}(bigint, text, bigint)")
