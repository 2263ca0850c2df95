"""A Hypothesis state machine over the SQL API: three workers, a sweeper, a canceller, readers
and the clock (heartbeats backdated), with crashes (a worker forgets its lease). After every
step the lease's invariants are checked against the database itself."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)
from psycopg.rows import dict_row

from outbound_heartbeat import LeaseLost, service
from outbound_heartbeat.records import Claim

from ..helpers import audit_job_failures, backdate_heartbeat, jobs_failed_more_than_once

WORKERS = ("w1", "w2", "w3")
BUSINESSES = (1, 2)
TERMINAL = {"completed", "stopped", "cancelled", "failed"}


def make_machine(conn: psycopg.Connection[Any]) -> type[RuleBasedStateMachine]:
    class QueueMachine(RuleBasedStateMachine):
        @initialize()
        def reset(self) -> None:
            conn.execute("TRUNCATE outbound_call_jobs, outbound_call_runs, outbound_heartbeat.run_events")
            conn.execute("TRUNCATE test_job_failures")
            self.leases: dict[str, Claim | None] = {w: None for w in WORKERS}
            self.zombies: list[Claim] = []  # leases a worker held before losing or dropping them
            self.jobs: dict[str, list[int]] = {w: [] for w in WORKERS}  # in progress, per worker
            self.max_epoch: dict[int, int] = {}
            self.ended: dict[int, dict[str, Any]] = {}

        # -- helpers ---------------------------------------------------------------------------
        def runs(self) -> list[dict[str, Any]]:
            with conn.cursor(row_factory=dict_row) as cur:
                return cur.execute("SELECT * FROM outbound_call_runs ORDER BY id").fetchall()

        def in_progress(self) -> set[int]:
            return {r[0] for r in conn.execute(
                "SELECT id FROM outbound_call_jobs WHERE status = 'in_progress'").fetchall()}

        def reclaiming(self, action: Any) -> Any:
            """Runs a call that may end runs; in-progress jobs must come out untouched."""
            before = self.in_progress()
            result = action()
            assert before <= self.in_progress(), "a reclaim touched an in_progress job"
            return result

        def drop(self, worker: str) -> None:
            lease = self.leases[worker]
            if lease is not None:
                self.zombies.append(lease)
            self.leases[worker] = None
            self.jobs[worker] = []

        # -- rules -----------------------------------------------------------------------------
        @rule(business=st.sampled_from(BUSINESSES), jobs=st.integers(0, 4))
        def create_run(self, business: int, jobs: int) -> None:
            service.create_run(conn, business, [{"n": i} for i in range(jobs)])

        @rule(worker=st.sampled_from(WORKERS))
        def claim(self, worker: str) -> None:
            claim = service.claim_run(conn, worker)
            if claim is not None:
                if self.leases[worker] is not None and self.leases[worker] != claim:
                    self.zombies.append(self.leases[worker])  # type: ignore[arg-type]
                self.leases[worker] = claim

        @rule(worker=st.sampled_from(WORKERS))
        def heartbeat(self, worker: str) -> None:
            lease = self.leases[worker]
            if lease is None:
                return
            status = self.reclaiming(
                lambda: service.heartbeat(conn, lease.run_id, worker, lease.lease_epoch))
            if status == "lost":
                self.drop(worker)

        @rule(worker=st.sampled_from(WORKERS))
        def next_job(self, worker: str) -> None:
            lease = self.leases[worker]
            if lease is None:
                return
            try:
                job = service.next_job(conn, lease.run_id, worker, lease.lease_epoch)
            except LeaseLost:
                self.drop(worker)
                return
            if job is not None:
                self.jobs[worker].append(job.id)

        @rule(worker=st.sampled_from(WORKERS), status=st.sampled_from(["completed", "failed"]))
        def finish_job(self, worker: str, status: str) -> None:
            lease = self.leases[worker]
            if lease is None or not self.jobs[worker]:
                return
            job_id = self.jobs[worker].pop(0)
            outcome = service.finish_job(conn, job_id, worker, lease.lease_epoch, status)
            if outcome.outcome == "lease_lost":
                self.drop(worker)

        @rule(worker=st.sampled_from(WORKERS), status=st.sampled_from(["completed", "failed", "cancelled"]))
        def finish_run(self, worker: str, status: str) -> None:
            lease = self.leases[worker]
            if lease is None:
                return
            service.finish_run(conn, lease.run_id, worker, lease.lease_epoch, status)
            self.drop(worker)

        @rule(seconds=st.sampled_from([5, 29, 31, 400]), pick=st.integers(0, 50))
        def backdate(self, seconds: int, pick: int) -> None:
            running = [r["id"] for r in self.runs() if r["status"] == "running"]
            if running:
                backdate_heartbeat(conn, running[pick % len(running)], seconds)

        @rule(business=st.sampled_from(BUSINESSES))
        def read_active(self, business: int) -> None:
            run = self.reclaiming(lambda: service.get_active_run(conn, business))
            assert run is None or (run.business_id == business and not run.stale)

        @rule()
        def sweep(self) -> None:
            self.reclaiming(lambda: service.cleanup_stuck_runs(conn))

        @rule(pick=st.integers(0, 50))
        def force_cancel(self, pick: int) -> None:
            runs = self.runs()
            if runs:
                run = runs[pick % len(runs)]
                result = self.reclaiming(lambda: service.force_cancel(conn, run["id"]))
                assert result.jobs_cancelled == 0 or run["status"] in ("pending", "running")

        @rule(pick=st.integers(0, 50))
        def request_cancel(self, pick: int) -> None:
            runs = self.runs()
            if runs:
                self.reclaiming(lambda: service.request_cancel(conn, runs[pick % len(runs)]["id"]))

        @rule(worker=st.sampled_from(WORKERS))
        def crash(self, worker: str) -> None:
            self.drop(worker)  # the process dies; its next incarnation claims (and may resume)

        @rule(pick=st.integers(0, 50))
        def zombie_write(self, pick: int) -> None:
            """A lease the worker no longer holds: every write must be refused."""
            if not self.zombies:
                return
            old = self.zombies[pick % len(self.zombies)]
            current = {(c.run_id, c.lease_epoch) for c in self.leases.values() if c is not None}
            if (old.run_id, old.lease_epoch) in current:
                return  # resumed under the same epoch? never: claims bump it (checked below)
            with conn.cursor(row_factory=dict_row) as cur:
                before = cur.execute("SELECT * FROM outbound_call_runs WHERE id = %s", (old.run_id,)).fetchone()
            assert before is not None
            if (before["status"], before["locked_by_worker"], before["lease_epoch"]) == (
                    "running", old.worker_id, old.lease_epoch):
                return  # nobody has superseded this lease yet: it is not a zombie's
            # A zombie's call still acts as an observer: a run it finds stale is stopped, as
            # any reader would stop it. What it must never do is write as the lease holder.
            stale = before["id"] in {r.id for r in service.list_active_runs(conn) if r.stale}
            answer = service.heartbeat(conn, old.run_id, old.worker_id, old.lease_epoch)
            # 'completed': the run was completed under this very lease (empty-run rule or its
            # own finish_run): the worker is done, and next_job hands it nothing.
            assert answer == "lost" or (answer == "completed" and before["status"] == "completed")
            try:
                job = service.next_job(conn, old.run_id, old.worker_id, old.lease_epoch)
                assert answer == "completed" and job is None, "a zombie got a job"
            except LeaseLost:
                assert answer == "lost"
            outcome = service.finish_run(conn, old.run_id, old.worker_id, old.lease_epoch, "completed")
            # 'already_finished': the run ended 'completed' already (nothing written either).
            assert outcome.outcome in ("lease_lost", "already_finished"), outcome
            with conn.cursor(row_factory=dict_row) as cur:
                after = cur.execute("SELECT * FROM outbound_call_runs WHERE id = %s", (old.run_id,)).fetchone()
            assert after is not None
            if stale and after["status"] == "stopped":
                assert after["last_heartbeat_at"] == before["last_heartbeat_at"], "zombie refreshed"
                assert after["lease_epoch"] == before["lease_epoch"] + 1
            else:
                assert after == before, "a zombie write changed the run"

        # -- invariants ------------------------------------------------------------------------
        @invariant()
        def single_holder_and_epochs(self) -> None:
            for run in self.runs():
                holders = [w for w, c in self.leases.items()
                           if c is not None and c.run_id == run["id"] and c.lease_epoch == run["lease_epoch"]
                           and run["status"] == "running" and run["locked_by_worker"] == w]
                assert len(holders) <= 1, (run, holders)
                assert run["lease_epoch"] >= self.max_epoch.get(run["id"], 0), "epoch went down"
                self.max_epoch[run["id"]] = run["lease_epoch"]
                if run["status"] in TERMINAL:
                    assert run["locked_by_worker"] is None and run["ended_at"] is not None
                elif run["status"] == "running":
                    assert run["locked_by_worker"] is not None

        @invariant()
        def terminal_runs_never_change(self) -> None:
            for run in self.runs():
                if run["id"] in self.ended:
                    assert run == self.ended[run["id"]], "a terminal run changed"
                elif run["status"] in TERMINAL:
                    self.ended[run["id"]] = run

        @invariant()
        def no_job_failed_twice(self) -> None:
            assert jobs_failed_more_than_once(conn) == []

    return QueueMachine


# slow: 40 examples of 40 steps take about 7.5 s on their own on a quiet 2-core machine
@pytest.mark.slow
def test_state_machine(conn: psycopg.Connection[Any]) -> None:
    audit_job_failures(conn)
    conn.execute("UPDATE outbound_heartbeat.settings SET lock_timeout = interval '1 second'")
    run_state_machine_as_test(
        make_machine(conn),
        settings=settings(max_examples=40, stateful_step_count=40, deadline=None,
                          suppress_health_check=list(HealthCheck)),
    )
