"""7. What a heartbeat costs, from a lone lease to a thousand in one process:

- "what a default Lease sends": the statement the process's hub sends to beat N leases (N = 1,
  10, 100, 1,000), per lease, against N raw single-row ``UPDATE ... SET last_heartbeat_at =
  now() WHERE id = $1`` round trips (the cost of a beat nobody fences) and against one bare
  fenced ``UPDATE ... FROM unnest(ids, workers, epochs)`` statement (the set-based limit), all
  alternating round by round in one run; ``heartbeat()`` alone and ``heartbeat_leases()`` beside
  them (goals: a lone lease's beat and ``heartbeat()`` <= 1.1x raw; ``heartbeat_leases()`` <=
  1.5x the bare limit per lease at 100 and 1,000 leases);
- release storms: 1,000 sync leases (a thread each) and 1,000 async leases (a task each) of
  one process leave at the same instant; p50/p99 of the time until each is released (goals:
  p99 <= 0.5 s threads, <= 0.3 s tasks);
- the lone lease's rows again on a second private server that flushes each commit to disk
  (fsync, synchronous_commit, full_page_writes on: a production server's settings), labelled
  "durable": the first server runs with fsync off, the harshest baseline for a statement's cost.

Every connection is opened with the leases' own connect options.

    python -m benchmarks.heartbeat_cost [--full] [--output FILE] [--before CHECKOUT [--before-sends KIND]]

``--before``: another checkout (``git archive main | tar -x -C DIR``) installs a second database
on the same server; its functions alternate with this checkout's in the same rounds, and its
storms run in a child process importing its library. Its Lease's beat is sent by this process
as that checkout's hub sent it (``--before-sends``): through the service layer, heartbeat() for
a lone lease and heartbeat_leases() for more (up to 5aefdd3, the default), or heartbeat_leases()
always (before a82b46e).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg

from outbound_heartbeat import hub, service
from outbound_heartbeat.connections import CONNECT_OPTIONS
from outbound_heartbeat.lease import Lease
from outbound_heartbeat.lease_async import AsyncLease

from .common import Results, Server, percentile, timed

RAW = "UPDATE outbound_call_runs SET last_heartbeat_at = now() WHERE id = %s"
BARE = (
    "UPDATE public.outbound_call_runs AS r SET last_heartbeat_at = now()"
    " FROM unnest(%s::bigint[], %s::text[], %s::bigint[]) AS a(id, worker_id, lease_epoch)"
    " WHERE r.id = a.id AND r.locked_by_worker = a.worker_id AND r.lease_epoch = a.lease_epoch"
    " AND r.status = 'running'"
)

HEARTBEAT = "SELECT outbound_heartbeat.heartbeat(%s, %s, %s)"

#: What heartbeat() costs, piece by piece: each step adds one part of its contract to the one
#: before, as a copy made in the benchmark's own schema (name, statement, function to create).
_FENCE = (" WHERE r.id OPERATOR(pg_catalog.=) $1 AND r.status OPERATOR(pg_catalog.=) 'running'"
          " AND r.locked_by_worker OPERATOR(pg_catalog.=) $2 AND r.lease_epoch OPERATOR(pg_catalog.=) $3")
_BEAT = ("UPDATE public.outbound_call_runs AS r SET last_heartbeat_at = GREATEST(LEAST(r.last_heartbeat_at,"
         " pg_catalog.clock_timestamp()), pg_catalog.statement_timestamp())")
_STALE = (" AND r.last_heartbeat_at OPERATOR(pg_catalog.>=) ((pg_catalog.statement_timestamp() AT TIME ZONE 'UTC')"
          " OPERATOR(pg_catalog.-) (SELECT s.stale_after FROM outbound_heartbeat.settings AS s)) AT TIME ZONE 'UTC'")
_HELD = (" FROM (SELECT l.ctid FROM public.outbound_call_runs AS l WHERE l.id OPERATOR(pg_catalog.=) $1"
         " FOR NO KEY UPDATE SKIP LOCKED) AS held")


def _ladder_function(name: str, statement: str) -> str:
    return ("CREATE OR REPLACE FUNCTION bench_ladder." + name + "(bigint, text, bigint) RETURNS text"
            " LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $f$"
            " DECLARE v_cancel pg_catalog.bool; BEGIN " + statement +
            " RETURNING r.cancel_requested_at IS NOT NULL INTO v_cancel;"
            " RETURN CASE WHEN v_cancel THEN 'cancel_requested' ELSE 'ok' END; END $f$")


LADDER = [
    ("fenced UPDATE statement (no function)",
     "UPDATE public.outbound_call_runs AS r SET last_heartbeat_at = GREATEST(LEAST(r.last_heartbeat_at,"
     " clock_timestamp()), statement_timestamp()) WHERE r.id = %s AND r.status = 'running'"
     " AND r.locked_by_worker = %s AND r.lease_epoch = %s RETURNING r.cancel_requested_at IS NOT NULL", None),
    ("+ in a definer PL/pgSQL function, search_path pinned", "SELECT bench_ladder.fenced(%s, %s, %s)",
     _ladder_function("fenced", _BEAT + _FENCE)),
    ("+ the staleness bound (a dead lease is not revived)", "SELECT bench_ladder.stale(%s, %s, %s)",
     _ladder_function("stale", _BEAT + _FENCE + _STALE)),
    ("+ the row lock, SKIP LOCKED (a beat never waits)", "SELECT bench_ladder.held(%s, %s, %s)",
     _ladder_function("held", _BEAT + _HELD + _FENCE.replace("r.id OPERATOR(pg_catalog.=) $1",
                                                              "r.ctid OPERATOR(pg_catalog.=) held.ctid") + _STALE)),
]

#: What heartbeat_leases() costs per lease above the bare statement, piece by piece: plain
#: statements, each adding one part of its contract (name, statement on the three arrays).
_SET_BEAT = ("UPDATE public.outbound_call_runs AS r SET last_heartbeat_at = now()"
             " FROM unnest(%s::bigint[], %s::text[], %s::bigint[]) AS a(id, worker_id, lease_epoch)"
             " CROSS JOIN LATERAL (SELECT l.ctid FROM public.outbound_call_runs AS l WHERE l.id = a.id"
             " AND l.status = 'running' AND l.locked_by_worker = a.worker_id AND l.lease_epoch = a.lease_epoch")
SET_LADDER = [
    ("each lease's row found by its primary key (LATERAL), no lock", _SET_BEAT + ") AS held WHERE r.ctid = held.ctid"),
    ("+ the row lock, SKIP LOCKED (a beat never waits)",
     _SET_BEAT + " FOR NO KEY UPDATE SKIP LOCKED) AS held WHERE r.ctid = held.ctid"),
]

#: (rounds, calls per round) for each number of leases: a few seconds per size.
PLAN = {1: (40, 100), 10: (24, 30), 100: (24, 6), 1_000: (20, 1)}


def lease_sender() -> Callable[[psycopg.Connection[Any], list[tuple[int, str, int]]], list[tuple[int, str]]]:
    """What the hub of this checkout sends for the leases it beats (older checkouts: always
    heartbeat_leases())."""
    send = getattr(hub, "send_beat", None)
    return send if send is not None else service.heartbeat_leases


def service_sender(conn: psycopg.Connection[Any], leases: list[tuple[int, str, int]]) -> list[tuple[int, str]]:
    """What the hub sent before its beats skipped the service layer (up to 5aefdd3): heartbeat()
    for a lone lease, heartbeat_leases() for more, each through service's execute()."""
    if len(leases) == 1:
        return [(leases[0][0], service.heartbeat(conn, *leases[0]))]
    return service.heartbeat_leases(conn, leases)


def _connect(dsn: str) -> psycopg.Connection[Any]:
    return psycopg.connect(dsn, **CONNECT_OPTIONS)


def _claimed(conn: psycopg.Connection[Any], n: int, tag: str) -> list[tuple[int, str, int]]:
    leases = []
    for i in range(n):
        run_id = service.create_run(conn, 70_000 + i, [{}]).id
        claim = service.claim_run(conn, f"{tag}-{i}", run_id)
        assert claim is not None
        leases.append((claim.run_id, claim.worker_id, claim.lease_epoch))
    return leases


Send = Callable[[psycopg.Connection[Any], list[tuple[int, str, int]]], list[tuple[int, str]]]


def cost(installs: list[tuple[str, str, Send]], results: Results, sizes: list[int], scale: float = 1.0,
         *, labelled: bool = False) -> None:
    """``installs``: (label, dsn, what its Lease sends); every install's functions alternate in
    one run, each compared with the raw and bare statements on its own database."""
    conns = {label: [_connect(dsn) for _ in range(6)] for label, dsn, _ in installs}
    for n in sizes:
        fns: dict[str, Callable[[], Any]] = {}
        done: list[tuple[psycopg.Connection[Any], list[int]]] = []
        for label, _, send in installs:
            raw_conn, bare_conn, lease_conn, set_conn, one_conn, sql_conn = conns[label]
            fns.update(_functions(label, send, n, raw_conn, bare_conn, lease_conn, set_conn, one_conn, sql_conn,
                                  done))
        rounds, calls = PLAN.get(n, (10, 1))
        before = {label: _server_times(conns[label][0]) for label, _, _ in installs}
        samples = side_by_side(fns, max(4, round(rounds * scale)), max(1, round(calls * scale)))
        for label, _, send in installs:
            tagged = labelled or len(installs) > 1
            _report(results, label, send, n, samples, tagged)
            _report_server(results, label, n, before[label], _server_times(conns[label][0]), tagged)
        for conn, ids in done:
            conn.execute("UPDATE outbound_call_runs SET status = 'completed', ended_at = now(),"
                         " locked_by_worker = NULL WHERE id = ANY(%s)", (ids,))
    for opened in conns.values():
        for conn in opened:
            conn.close()


def _functions(label: str, send: Send, n: int, raw_conn: psycopg.Connection[Any], bare_conn: psycopg.Connection[Any],
               lease_conn: psycopg.Connection[Any], set_conn: psycopg.Connection[Any],
               one_conn: psycopg.Connection[Any], sql_conn: psycopg.Connection[Any],
               done: list[tuple[psycopg.Connection[Any], list[int]]]) -> dict[str, Callable[[], Any]]:
    leases = _claimed(raw_conn, n, f"cost{n}")
    ids = [lease[0] for lease in leases]
    workers = [lease[1] for lease in leases]
    epochs = [lease[2] for lease in leases]
    done.append((raw_conn, ids))

    def raw() -> None:
        for run_id in ids:
            raw_conn.execute(RAW, (run_id,))

    def bare() -> None:
        cur = bare_conn.execute(BARE, (ids, workers, epochs))
        assert cur.rowcount == len(ids)

    def lease() -> None:
        answers = send(lease_conn, leases)
        assert all(status == "ok" for _, status in answers), answers[:3]

    def together() -> None:
        answers = service.heartbeat_leases(set_conn, leases)
        assert all(status == "ok" for _, status in answers), answers[:3]

    fns: dict[str, Callable[[], Any]] = {f"{label} raw": raw, f"{label} bare": bare, f"{label} lease": lease}
    if n > 1:
        for step, (_, statement) in enumerate(SET_LADDER):
            def set_climb(statement: str = statement) -> None:
                cur = bare_conn.execute(statement, (ids, workers, epochs))
                assert cur.rowcount == len(ids)

            fns[f"{label} setladder{step}"] = set_climb
    if send is not service.heartbeat_leases:
        fns[f"{label} heartbeat_leases"] = together
    if n == 1:
        def alone() -> None:
            assert service.heartbeat(one_conn, *leases[0]) == "ok"

        def in_sql() -> None:
            row = sql_conn.execute(HEARTBEAT, leases[0]).fetchone()
            assert row is not None and row[0] == "ok"

        unpinned = _unpinned_copy(raw_conn)

        def copy_in_sql() -> None:
            row = sql_conn.execute(unpinned, leases[0]).fetchone()
            assert row is not None and row[0] == "ok"

        fns[f"{label} heartbeat"] = alone
        fns[f"{label} heartbeat_sql"] = in_sql
        fns[f"{label} unpinned"] = copy_in_sql
        raw_conn.execute("CREATE SCHEMA IF NOT EXISTS bench_ladder")
        for step, (_, statement, create) in enumerate(LADDER):
            if create is not None:
                raw_conn.execute(create)

            def climb(statement: str = statement) -> None:
                row = sql_conn.execute(statement, leases[0]).fetchone()
                assert row is not None and row[0] in (True, False, "ok"), row

            fns[f"{label} ladder{step}"] = climb
    return fns


#: Statement texts as pg_stat_statements stores them (prefixes): server time per call.
SERVER = {
    "raw": "UPDATE outbound_call_runs SET last_heartbeat_at = now() WHERE id = $1",
    # (through WHERE: the piece-by-piece statements of SET_LADDER begin the same way)
    "bare": "UPDATE public.outbound_call_runs AS r SET last_heartbeat_at = now() FROM unnest($1::bigint[],"
            " $2::text[], $3::bigint[]) AS a(id, worker_id, lease_epoch) WHERE",
    "heartbeat_leases": "SELECT b.run_id, b.status FROM outbound_heartbeat.heartbeat_leases(",
    "heartbeat": "SELECT outbound_heartbeat.heartbeat(run_id => ",
}


def _server_times(conn: psycopg.Connection[Any]) -> dict[str, tuple[float, int]]:
    """Total execution ms and calls of each statement of SERVER in this database."""
    conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
    out = {}
    for key, prefix in SERVER.items():
        row = conn.execute(
            "SELECT coalesce(sum(s.total_exec_time), 0), coalesce(sum(s.calls), 0) FROM pg_stat_statements AS s"
            " WHERE s.dbid = (SELECT oid FROM pg_database WHERE datname = current_database())"
            " AND starts_with(s.query, %s)", (prefix,)).fetchone()
        assert row is not None
        out[key] = (float(row[0]), int(row[1]))
    return out


def _report_server(results: Results, label: str, n: int, before: dict[str, tuple[float, int]],
                   after: dict[str, tuple[float, int]], tagged: bool) -> None:
    """The same statements' time inside the server (pg_stat_statements), per call."""
    def per_call(key: str) -> float:
        calls = after[key][1] - before[key][1]
        return (after[key][0] - before[key][0]) / calls * 1000 if calls else float("nan")

    tag = f"{label}: " if tagged else ""
    raw, bare = per_call("raw") * n, per_call("bare")
    for key in (("heartbeat", "heartbeat_leases") if n == 1 else ("heartbeat_leases",)):
        beat = per_call(key)
        results.add("heartbeat cost", f"{tag}{n:,} leases, inside the server (pg_stat_statements, per call):"
                    f" {key}() {beat:.0f} us, bare {bare:.0f} us, {n:,} raw UPDATE(s) {raw:.0f} us",
                    f"x{beat / raw:.2f} raw, x{beat / bare:.2f} bare")


def _unpinned_copy(admin: psycopg.Connection[Any]) -> str:
    """A copy of the installed heartbeat() with no SET clause (search_path, TimeZone): the
    statement that calls it."""
    row = admin.execute("SELECT pg_get_functiondef('outbound_heartbeat.heartbeat(bigint, text, bigint)'"
                        "::regprocedure)").fetchone()
    assert row is not None
    name = "heartbeat_unpinned_copy"
    body = re.sub(r"(?<![_.\w])heartbeat\.(run_id|worker_id|lease_epoch)\b", rf"{name}.\1", row[0])
    admin.execute(body.replace("outbound_heartbeat.heartbeat(", f"outbound_heartbeat.{name}(", 1))
    admin.execute(f"ALTER FUNCTION outbound_heartbeat.{name}(bigint, text, bigint) RESET ALL")
    return f"SELECT outbound_heartbeat.{name}(%s, %s, %s)"


def _report(results: Results, label: str, send: Send, n: int, samples: dict[str, list[float]], tagged: bool) -> None:
    mine = {name.split(" ", 1)[1]: values for name, values in samples.items() if name.startswith(f"{label} ")}
    per = {name: statistics.median(values) / n * 1e6 for name, values in mine.items()}
    by_raw = {name: ratio(mine, name, "raw") for name in mine}
    by_bare = {name: ratio(mine, name, "bare") for name in mine}
    tag = f"{label}: " if tagged else ""
    what = "one raw single-row UPDATE round trip" if n == 1 else f"{n:,} raw single-row UPDATE round trips"
    results.add("heartbeat cost", f"{tag}{n:,} leases: {what}, per lease", f"{per['raw']:.1f} us = x1.00")
    results.add("heartbeat cost", f"{tag}{n:,} leases: bare fenced unnest UPDATE, per lease",
                f"{per['bare']:.1f} us = x{by_raw['bare']:.3f} raw")
    lease_goal = n == 1
    results.add("heartbeat cost", f"{tag}{n:,} leases: what a default Lease sends ({_name(send, n)}), per lease",
                f"{per['lease']:.1f} us = x{by_raw['lease']:.3f} raw, x{by_bare['lease']:.2f} bare",
                "<= 1.1x raw" if lease_goal else ("<= 1.5x bare" if n >= 100 else ""),
                by_raw["lease"] <= 1.1 if lease_goal else (by_bare["lease"] <= 1.5 if n >= 100 else None))
    if "heartbeat_leases" in mine:
        results.add("heartbeat cost", f"{tag}{n:,} leases: heartbeat_leases(), per lease",
                    f"{per['heartbeat_leases']:.1f} us = x{by_raw['heartbeat_leases']:.3f} raw,"
                    f" x{by_bare['heartbeat_leases']:.2f} bare",
                    "<= 1.5x bare" if n >= 100 else "", by_bare["heartbeat_leases"] <= 1.5 if n >= 100 else None)
    for step, (what, _) in enumerate(SET_LADDER):
        if f"setladder{step}" in mine:
            results.add("heartbeat cost", f"{tag}{n:,} leases, heartbeat_leases()' cost piece by piece, per lease:"
                        f" the bare statement {what}",
                        f"{per[f'setladder{step}']:.1f} us = x{by_bare[f'setladder{step}']:.2f} bare")
    for step, (what, _, _) in enumerate(LADDER):
        if f"ladder{step}" in mine:
            results.add("heartbeat cost", f"{tag}1 lease, heartbeat()'s cost piece by piece: {what}",
                        f"{per[f'ladder{step}']:.1f} us = x{by_raw[f'ladder{step}']:.3f} raw")
    if "heartbeat" in mine:
        results.add("heartbeat cost", f"{tag}1 lease: heartbeat() called alone in SQL (a DBA's or another"
                    " language's worker)", f"{per['heartbeat_sql']:.1f} us = x{by_raw['heartbeat_sql']:.3f} raw",
                    "<= 1.1x raw", by_raw["heartbeat_sql"] <= 1.1)
        results.add("heartbeat cost", f"{tag}1 lease: service.heartbeat() (the Python call)",
                    f"{per['heartbeat']:.1f} us = x{by_raw['heartbeat']:.3f} raw")
        results.add("heartbeat cost", f"{tag}1 lease: a copy of heartbeat() without its SET clauses (not"
                    " installed: what the pinned search_path costs)",
                    f"{per['unpinned']:.1f} us = x{by_raw['unpinned']:.3f} raw")


def _name(send: Any, n: int) -> str:
    if send is service.heartbeat_leases or n > 1:
        return "heartbeat_leases()"
    return "heartbeat()"


def side_by_side(fns: dict[str, Callable[[], Any]], rounds: int, calls: int) -> dict[str, list[float]]:
    """Seconds per call of each function, one sample per round, alternating order round by round
    (as common.alternate), so any two can be compared round by round."""
    for fn in fns.values():
        timed(fn, max(2, calls // 5))  # warm plans and caches
    samples: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            samples[name].append(timed(fns[name], calls))
    return samples


def ratio(samples: dict[str, list[float]], name: str, baseline: str) -> float:
    """Median of the per-round ratios of ``name`` to ``baseline``."""
    return statistics.median(v / b for v, b in zip(samples[name], samples[baseline], strict=True))


def sync_storm(dsn: str, n: int, hold: float) -> list[float]:
    """n default Leases, a thread each, leave at one instant; seconds until each is released."""
    with _connect(dsn) as conn:
        runs = [service.create_run(conn, 80_000 + i, [{}]).id for i in range(n)]
    entered = threading.Barrier(n + 1)
    go = threading.Event()
    released: list[float] = []
    start = [0.0]
    failures: list[BaseException] = []
    connecting = threading.Semaphore(16)

    def worker(run_id: int) -> None:
        lease = Lease(dsn, f"storm-{run_id}", run_id)
        try:
            with connecting:
                lease.__enter__()
        except BaseException as exc:  # a failed claim still reaches the barrier
            failures.append(exc)
            entered.wait()
            return
        entered.wait()
        while not go.wait(1.0):
            lease.touch()
        lease.__exit__(None, None, None)
        released.append(time.perf_counter() - start[0])

    threads = [threading.Thread(target=worker, args=(run_id,), daemon=True) for run_id in runs]
    for thread in threads:
        thread.start()
    entered.wait()
    time.sleep(hold)
    start[0] = time.perf_counter()
    go.set()
    for thread in threads:
        thread.join(60)
    if failures:
        raise failures[0]
    _check_completed(dsn, runs)
    return released


async def async_storm(dsn: str, n: int, hold: float) -> list[float]:
    """n default AsyncLeases, a task each, leave at one instant; seconds until each is released."""
    with _connect(dsn) as conn:
        runs = [service.create_run(conn, 90_000 + i, [{}]).id for i in range(n)]
    leases = [AsyncLease(dsn, f"astorm-{run_id}", run_id) for run_id in runs]
    connecting = asyncio.Semaphore(16)

    async def enter(lease: AsyncLease) -> None:
        async with connecting:
            await lease.__aenter__()

    await asyncio.gather(*(enter(lease) for lease in leases))
    deadline = time.monotonic() + hold
    while time.monotonic() < deadline:
        for lease in leases:
            lease.touch()
        await asyncio.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
    released: list[float] = []
    start = time.perf_counter()

    async def leave(lease: AsyncLease) -> None:
        await lease.__aexit__(None, None, None)
        released.append(time.perf_counter() - start)

    await asyncio.gather(*(leave(lease) for lease in leases))
    _check_completed(dsn, runs)
    return released


def _check_completed(dsn: str, runs: list[int]) -> None:
    with _connect(dsn) as conn:
        rows = conn.execute("SELECT status, count(*) FROM outbound_call_runs WHERE id = ANY(%s) GROUP BY 1",
                            (runs,)).fetchall()
    assert dict(rows) == {"completed": len(runs)}, rows


def storms(dsn: str, results: Results, n: int, hold: float, repeats: int, label: str = "",
           before: str | None = None) -> None:
    """``before``: a checkout whose library runs the storms instead (a child process of it)."""
    released: dict[str, list[list[float]]] = {"threads": [], "tasks": []}
    for _ in range(repeats):
        if before is None:
            released["threads"].append(sync_storm(dsn, n, hold))
            released["tasks"].append(asyncio.run(async_storm(dsn, n, hold)))
        else:
            out = json.loads(subprocess.run(
                [sys.executable, "-m", "benchmarks.heartbeat_cost", "storm-child", dsn, str(n), str(hold)],
                cwd=before, env={**os.environ, "PYTHONPATH": before}, check=True, capture_output=True,
                text=True).stdout)
            for kind in released:
                released[kind].append(out[kind])
    tag = f"{label}: " if label else ""
    for kind, goal in (("threads", 0.5), ("tasks", 0.3)):
        p50s = [percentile(r, 50) for r in released[kind]]
        p99s = [percentile(r, 99) for r in released[kind]]
        results.add("heartbeat cost", f"{tag}release storm: {n:,} default leases ({kind}) leave at one instant,"
                    f" time until each is released ({repeats} storms)",
                    f"p50 {' / '.join(f'{v * 1e3:.0f}' for v in p50s)} ms, p99 "
                    f"{' / '.join(f'{v * 1e3:.0f}' for v in p99s)} ms",
                    f"p99 <= {goal:g} s", statistics.median(p99s) <= goal)


def storm_child(argv: list[str]) -> int:
    dsn, n, hold = argv[0], int(argv[1]), float(argv[2])
    print(json.dumps({"threads": sync_storm(dsn, n, hold), "tasks": asyncio.run(async_storm(dsn, n, hold))}))
    return 0


def install_before(server: Server, checkout: str) -> str:
    """A database installed by another checkout's library (its sql/, its migrate())."""
    dsn = server.database("bench_heartbeat_before", library=False)
    subprocess.run([sys.executable, "-c", "import sys; from outbound_heartbeat import migrate; migrate(sys.argv[1])",
                    dsn], cwd=checkout, env={**os.environ, "PYTHONPATH": checkout}, check=True)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("UPDATE outbound_heartbeat.settings SET restart_grace = interval '0'")
    target = Path(checkout) / "benchmarks" / "heartbeat_cost.py"
    if target.parent.is_dir() and (not target.exists() or target.read_bytes() != Path(__file__).read_bytes()):
        shutil.copyfile(__file__, target)  # the storms' child process runs this file there
    return dsn


def durable(results: Results, scale: float) -> None:
    """A lone lease's beat on a server that flushes each commit to disk (fsync, synchronous_commit
    and full_page_writes on), as production servers do: the same rows, labelled 'durable'."""
    server = Server(max_connections=20, durable=True)
    try:
        cost([("durable", server.database("bench_heartbeat_durable"), lease_sender())], results, [1], scale,
             labelled=True)
    finally:
        server.close()


def run(server: Server, results: Results, *, sizes: list[int], storm: int, hold: float, repeats: int,
        scale: float = 1.0) -> None:
    print(f"heartbeat cost: N = {sizes}; storms of {storm:,} leases", flush=True)
    dsn = server.database("bench_heartbeat_cost")
    cost([("now", dsn, lease_sender())], results, sizes, scale)
    server.drop("bench_heartbeat_cost")
    dsn = server.database("bench_heartbeat_storm")
    storms(dsn, results, storm, hold, repeats)
    server.drop("bench_heartbeat_storm")


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "storm-child":
        return storm_child(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--full", action="store_true", help="more rounds, three storms of each kind")
    parser.add_argument("--only", choices=["cost", "storm"])
    parser.add_argument("--before", help="a checkout (e.g. `git archive main`) measured side by side as 'before'")
    parser.add_argument("--before-sends", choices=["service", "heartbeat_leases"], default="service",
                        help="what the before checkout's Lease sends: through the service, heartbeat() for one"
                             " lease and heartbeat_leases() for more (up to 5aefdd3), or heartbeat_leases()"
                             " always (before a82b46e)")
    parser.add_argument("--output", help="write the table (markdown) to this file too")
    args = parser.parse_args()
    results = Results()
    server = Server(max_connections=100)
    started = time.monotonic()
    try:
        dsn = server.database("bench_heartbeat_cost")
        before = install_before(server, args.before) if args.before else None
        installs: list[tuple[str, str, Send]] = [("now", dsn, lease_sender())]
        if before is not None:
            installs.insert(0, ("before", before, service_sender if args.before_sends == "service"
                                else service.heartbeat_leases))
        if args.only in (None, "cost"):
            cost(installs, results, [1, 10, 100, 1_000], 1.5 if args.full else 1.0)
            durable(results, 1.5 if args.full else 1.0)
        if args.only in (None, "storm"):
            repeats = 3 if args.full else 1
            if before is not None:
                storms(before, results, 1_000, 3.0, repeats, "before", args.before)
            storms(dsn, results, 1_000, 3.0, repeats, "now" if before is not None else "")
        version = server.version
    finally:
        server.close()
    table = results.table()
    print("\n" + table)
    print(f"\nPostgreSQL {version}, {time.monotonic() - started:.0f} s")
    if args.output:
        with open(args.output, "w", encoding="utf-8") as out:
            out.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
