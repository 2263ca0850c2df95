"""Fixtures and rules for the whole suite (docs/testing.md).

The tests are laid out by level, and a level is the directory: tests/unit (no server at all),
tests/integration (one database: a clone of the session's template on the session's server,
or a private server of the test's own with special settings), tests/e2e (real processes,
browsers, restarts, failover, fresh virtualenvs, load). Every e2e test is marked ``slow``
(pytest_collection_modifyitems below); an integration test marks itself when it falls under
SLOW_CRITERION (pytest_configure). `-m "not slow"` is the quick run.

One PostgreSQL server per run (outbound_heartbeat.testing's chain), one template database
migrated once, and a fresh clone of it for every test (``dsn``, ``conn``), dropped without
waiting; under pytest-xdist (`-n`, on by default in pyproject.toml) the controller starts that
server and migrates the template, and its worker processes share them (pytest_configure_node),
each with its own PgBouncer on a free port. Helpers the tests share live in tests/helpers.py,
never in a test module.

The SQL-API and worker-lease suites run twice: straight to PostgreSQL, and through PgBouncer in
transaction pooling mode with psycopg's prepare_threshold=None: the library keeps no
session state."""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from outbound_heartbeat import migrate
from outbound_heartbeat.testing import DSN_ENV, Clones, Server, start_server

from . import services
from .helpers import TEST_SETTINGS
from .pgbouncer import PgBouncer, start_pgbouncer
from .workers import NO_PREPARE_ENV

TESTS = Path(__file__).resolve().parent


def _keep_bytecode() -> None:
    """Under PYTHONDONTWRITEBYTECODE (set on this machine) nothing was cached: every xdist
    worker rewrote the assertions of all ~80 test modules and compiled the package anew at
    every run, 7-9 s of CPU per worker (collecting took 9.4 s; 2.3 s with the cache). The
    bytecode goes under .pytest_cache/pycache instead, never next to the sources; the
    processes the tests start (workers, the CLI) inherit it. A PYTHONPYCACHEPREFIX of your own
    is left alone."""
    if not sys.dont_write_bytecode or sys.pycache_prefix:
        return
    prefix = str(TESTS.parent / ".pytest_cache" / "pycache")
    sys.pycache_prefix, sys.dont_write_bytecode = prefix, False
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    os.environ["PYTHONPYCACHEPREFIX"] = prefix


_keep_bytecode()


#: What the ``slow`` mark means; README.md's fast subset and docs/testing.md say the same.
SLOW_CRITERION = (
    "every test of tests/e2e, and each integration test that needs a real process (a worker,"
    " the demo), a server restart or crash recovery, a standby, load (hundreds of leases or"
    " threads at once) or real time it cannot shorten (a scheduler's minute, seconds of app"
    " work), or that takes more than about 5 s on its own on a quiet 2-core machine;"
    " `-m \"not slow\"` runs everything else"
)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "needs(name): the test needs an optional server of tests/services.py"
    )
    config.addinivalue_line("markers", f"slow: {SLOW_CRITERION}")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    # `-n auto`: two workers per core. Most tests wait rather than compute (leases beating on
    # their interval, stale thresholds passing, a server restarting), so one worker per core
    # leaves the cores idle; measured on 2 cores, the lease-mode suite ran in half the time
    # with 4 workers as with 2, and the busiest module no slower.
    return 2 * len(os.sched_getaffinity(0))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # The level is the directory: every e2e test is slow, so `-m "not slow"` is unit plus
    # integration minus the integration tests marked slow in their own modules.
    for item in items:
        if "e2e" in item.path.relative_to(TESTS).parts[:1]:
            item.add_marker(pytest.mark.slow)
    if getattr(config.option, "loadgroup", False):  # an xdist worker under --dist loadgroup
        _keep_xdist_groups(items)


def _keep_xdist_groups(items: list[pytest.Item]) -> None:
    """pytest-xdist sends the tests of one ``xdist_group`` to one worker by appending
    ``@group`` to their node ids in the worker, through the node's ``_nodeid`` attribute. Since
    pytest 9.2 a node id is a structured ``_id`` and that assignment changes nothing: the
    tests were spread over every worker, and each worker built the module fixture again (the
    two-phase module's private server, the e2e wheel). This appends the suffix where xdist's
    own did not take, and refuses to run when even this did not (a silent slowdown otherwise)."""
    for item in items:
        names = {
            str(mark.args[0] if mark.args else mark.kwargs.get("name", "default"))
            for mark in item.iter_markers("xdist_group")
        }
        if not names:
            continue
        suffix = "@" + "_".join(sorted(names))
        if not item.nodeid.endswith(suffix):
            node_id = getattr(item, "_id", None)
            if node_id is not None and hasattr(type(node_id), "parse"):
                item._id = type(node_id).parse(item.nodeid + suffix)  # type: ignore[attr-defined]
        if not item.nodeid.endswith(suffix):
            raise pytest.UsageError(
                f"--dist loadgroup: {item.nodeid} did not get its group suffix {suffix!r}; this"
                " pytest and pytest-xdist no longer agree on node ids (tests/conftest.py)"
            )


def _needed(item: pytest.Item) -> list[str]:
    names = [name for mark in item.iter_markers("needs") for name in mark.args]
    callspec = getattr(item, "callspec", None)
    if callspec is not None and callspec.params.get("route") == "pgbouncer":
        names.append("pgbouncer")
    if "pgbouncer" in getattr(item, "fixturenames", ()):
        names.append("pgbouncer")
    return sorted(set(names))


def pytest_report_header(config: pytest.Config) -> list[str]:
    missing = [name for name in services.SERVICES if not services.available(name)]
    if not missing:
        return ["optional servers: all present (pgbouncer, redis, chromium, pg_cron)"]
    then = "their tests FAIL (CI=true)" if services.in_ci() else "their tests are skipped"
    return [f"MISSING {services.missing_message(name)}; {then}" for name in missing]


_SKIPPED_FOR: dict[str, int] = {}


@pytest.fixture(autouse=True)
def _optional_servers(request: pytest.FixtureRequest) -> None:
    """Skips (or under CI=true fails) a test whose optional server is missing."""
    for name in _needed(request.node):
        if not services.available(name):
            if services.in_ci():
                pytest.fail(f"CI=true and {services.missing_message(name)}", pytrace=False)
            pytest.skip(f"{_NEEDS}{name}")


_NEEDS = "needs "


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    # Counted from the reports, not in the fixture: under pytest-xdist the skips happen in the
    # workers and only their reports reach the process that prints the summary.
    if report.skipped and isinstance(report.longrepr, tuple):
        reason = str(report.longrepr[2]).removeprefix("Skipped: ")
        if reason.startswith(_NEEDS):
            name = reason.removeprefix(_NEEDS)
            _SKIPPED_FOR[name] = _SKIPPED_FOR.get(name, 0) + 1


def pytest_terminal_summary(terminalreporter: Any) -> None:
    # One line per missing server, however many of its tests were skipped.
    for name, count in sorted(_SKIPPED_FOR.items()):
        terminalreporter.write_line(
            f"SKIPPED {count} tests: {services.missing_message(name)}", yellow=True
        )


#: The server and template the pytest-xdist controller made for all its workers, if any.
_SHARED: dict[str, Any] = {}
#: Where a worker finds them (``node.workerinput``).
SHARED_INPUT = "outbound_heartbeat_server"


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """In the xdist controller, once per worker: the workers of a run share ONE server and
    ONE migrated template, made here before the first worker starts (initdb, start and the
    migration four times over took 5-13 s of every worker's first test on 2 cores). A server
    of OUTBOUND_HEARTBEAT_TEST_DSN is shared as it was: each worker migrates its own template.
    Tests that restart or crash a server, or need special settings, start private ones."""
    if os.environ.get(DSN_ENV):
        return
    if "tried" not in _SHARED:
        _SHARED["tried"] = True
        workers = len(getattr(node.config.option, "tx", None) or ()) or 1
        try:
            # A private server gave each worker 400 connections; a shared one keeps that each.
            server = start_server({"max_connections": str(400 * workers)})
        except Exception:
            return  # each worker tries on its own, and its database tests fail saying why
        _SHARED["server"] = server
        try:
            _SHARED["template"] = _migrated_template(server)
        except BaseException:
            server.close()
            del _SHARED["server"]
            raise
    if "server" not in _SHARED:
        return
    server = _SHARED["server"]
    node.workerinput[SHARED_INPUT] = {
        "dsn": server.dsn, "kind": server.kind, "template": _SHARED["template"],
        "in_memory": "1" if server.in_memory else "",
    }


def pytest_unconfigure(config: pytest.Config) -> None:
    # The controller stops the shared server after every worker has ended.
    if (server := _SHARED.pop("server", None)) is not None:
        server.close()
    _SHARED.clear()


def _shared(config: pytest.Config) -> dict[str, str] | None:
    workerinput = getattr(config, "workerinput", None)
    return None if workerinput is None else workerinput.get(SHARED_INPUT)


@pytest.fixture(scope="session")
def pg_server(pytestconfig: pytest.Config) -> Iterator[Server]:
    # No skip: without a server this raises NoServerAvailable and every database test fails.
    shared = _shared(pytestconfig)
    # A worker's Server on the controller's server: close() drops the databases it made.
    server = (Server(shared["dsn"], f"{shared['kind']}, shared by the xdist workers",
                     in_memory=bool(shared["in_memory"]))
              if shared else start_server())
    try:
        yield server
    finally:
        server.close()


#: The advisory lock (on the server's maintenance database) a session's template migrates under.
TEMPLATE_LOCK = 0x6F68_7465_6D70


@pytest.fixture(scope="session")
def template_name(pg_server: Server, pytestconfig: pytest.Config) -> str:
    shared = _shared(pytestconfig)
    return shared["template"] if shared else _migrated_template(pg_server)


def _migrated_template(pg_server: Server) -> str:
    dsn = pg_server.create_database()
    # One migration at a time per server: xdist workers sharing OUTBOUND_HEARTBEAT_TEST_DSN's
    # server would otherwise race to create the cluster-wide owner role.
    with psycopg.connect(pg_server.dsn, autocommit=True) as lock:
        lock.execute("SELECT pg_catalog.pg_advisory_lock(%s)", (TEMPLATE_LOCK,))
        migrate(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        # A freshly started private server would otherwise hold every stale detection back for
        # its restart grace; tests of the grace itself set it explicitly.
        conn.execute(TEST_SETTINGS)
    name = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
    assert isinstance(name, str)
    return name


@pytest.fixture(scope="session")
def clones(pg_server: Server, template_name: str) -> Iterator[Clones]:
    # The next test's clone is copied while this test runs: a CREATE DATABASE took 0.3-0.9 s of
    # every test's setup when four workers cloned on two cores.
    made = Clones(pg_server, template_name)
    try:
        yield made
    finally:
        made.close()


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
    pg_server: Server, clones: Clones, route: str, request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[str]:
    dsn = clones.take()
    try:
        if route == "pgbouncer":
            bouncer: PgBouncer = request.getfixturevalue("pgbouncer")
            _without_prepared_statements(monkeypatch)
            yield bouncer.dsn_for(dsn)
        else:
            yield dsn
    finally:
        # Not waited for: the drop (a checkpoint on PostgreSQL 15) runs while the next test does.
        pg_server.drop_database(str(psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]), wait=False)


@pytest.fixture
def direct_dsn(pg_server: Server, dsn: str) -> str:
    """The test's database, straight to PostgreSQL even when ``dsn`` goes through PgBouncer."""
    return pg_server.dsn_for(str(psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]))


@pytest.fixture
def make_db(pg_server: Server) -> Iterator[Callable[[], str]]:
    """Makes empty databases (no schema: to migrate, to build from sql/, to seed the app's
    legacy tables), each dropped after the test; returns its DSN."""
    made: list[str] = []

    def make() -> str:
        made.append(pg_server.create_database())
        return made[-1]

    yield make
    for dsn in made:
        pg_server.drop_database(str(psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]), wait=False)


@pytest.fixture
def empty_dsn(make_db: Callable[[], str]) -> str:
    return make_db()


@pytest.fixture
def conn(dsn: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(dsn, autocommit=True) as c:
        yield c


@pytest.fixture
def roles(conn: psycopg.Connection[Any]) -> Iterator[dict[str, str]]:
    """Login roles made for this test: ``app`` by grant_app_role(), ``dba`` by grant_dba_role(),
    ``nobody`` with no grant; dropped after, with whatever they own."""
    suffix = uuid.uuid4().hex[:8]
    names = {kind: f"oh_{kind}_{suffix}" for kind in ("app", "dba", "nobody")}
    for name in names.values():
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(name)))
    conn.execute("SELECT outbound_heartbeat.grant_app_role(%s)", (names["app"],))
    conn.execute("SELECT outbound_heartbeat.grant_dba_role(%s)", (names["dba"],))
    try:
        yield names
    finally:
        conn.execute("RESET ROLE")
        for name in names.values():
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(name)))
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))
