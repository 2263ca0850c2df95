"""Fixtures: one PostgreSQL server per test session (outbound_heartbeat.testing's chain), one
template database migrated once, and a fresh clone of it for every test.

The SQL-API and worker-lease suites run twice: straight to PostgreSQL, and through PgBouncer in
transaction pooling mode with psycopg's prepare_threshold=None (DESIGN.md, principle 9)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from outbound_heartbeat import migrate
from outbound_heartbeat.testing import PgBouncer, Server, start_pgbouncer, start_server

from .helpers import TEST_SETTINGS
from .workers import NO_PREPARE_ENV


@pytest.fixture(scope="session")
def pg_server() -> Iterator[Server]:
    # No skip: without a server this raises NoServerAvailable and every database test fails.
    server = start_server()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def template_name(pg_server: Server) -> str:
    dsn = pg_server.create_database()
    migrate(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        # A freshly started private server would otherwise hold every stale detection back for
        # its restart grace; tests of the grace itself set it explicitly.
        conn.execute(TEST_SETTINGS)
    name = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
    assert isinstance(name, str)
    return name


#: Test modules that also run through PgBouncer (transaction mode).
BOUNCED_MODULES = {"test_worker_api", "test_runs_api", "test_lease", "test_async", "test_bad_input"}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    module = metafunc.module.__name__.rsplit(".", 1)[-1]
    if "dsn" in metafunc.fixturenames and module in BOUNCED_MODULES:
        # direct_only: the test acts on one server backend by pid or application_name, which
        # a pooler shares between clients.
        direct_only = metafunc.definition.get_closest_marker("direct_only") is not None
        routes = ["direct"] if direct_only else ["direct", "pgbouncer"]
        metafunc.parametrize("route", routes, indirect=True)


@pytest.fixture(scope="session")
def pgbouncer(pg_server: Server) -> Iterator[PgBouncer]:
    # No skip: without pgbouncer installed the PgBouncer runs fail (.ci/run installs it).
    bouncer = start_pgbouncer(pg_server.dsn)
    try:
        yield bouncer
    finally:
        bouncer.stop()


@pytest.fixture
def route(request: pytest.FixtureRequest) -> str:
    return str(getattr(request, "param", "direct"))


def _without_prepared_statements(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every psycopg connection of this test gets prepare_threshold=None unless it says."""
    for cls in (psycopg.Connection, psycopg.AsyncConnection):
        original = cls.connect.__func__  # type: ignore[attr-defined]

        def connect(klass: Any, *args: Any, __original: Any = original, **kwargs: Any) -> Any:
            kwargs.setdefault("prepare_threshold", None)
            return __original(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "connect", classmethod(connect))
    monkeypatch.setattr(psycopg, "connect", psycopg.Connection.connect)
    monkeypatch.setenv(NO_PREPARE_ENV, "1")


@pytest.fixture
def dsn(
    pg_server: Server, template_name: str, route: str, request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[str]:
    dsn = pg_server.create_database(template=template_name)
    try:
        if route == "pgbouncer":
            bouncer: PgBouncer = request.getfixturevalue("pgbouncer")
            _without_prepared_statements(monkeypatch)
            yield bouncer.dsn_for(dsn)
        else:
            yield dsn
    finally:
        pg_server.drop_database(str(psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]))


@pytest.fixture
def direct_dsn(pg_server: Server, dsn: str) -> str:
    """The test's database, straight to PostgreSQL even when ``dsn`` goes through PgBouncer."""
    return pg_server.dsn_for(str(psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]))


@pytest.fixture
def empty_dsn(pg_server: Server) -> Iterator[str]:
    dsn = pg_server.create_database()
    try:
        yield dsn
    finally:
        pg_server.drop_database(str(psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]))


@pytest.fixture
def conn(dsn: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(dsn, autocommit=True) as c:
        yield c
