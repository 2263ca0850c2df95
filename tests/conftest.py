"""Fixtures: one PostgreSQL server per test session (outbound_heartbeat.testing's chain), one
template database migrated once, and a fresh clone of it for every test."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from outbound_heartbeat import migrate
from outbound_heartbeat.testing import Server, start_server

from .helpers import TEST_SETTINGS


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


@pytest.fixture
def dsn(pg_server: Server, template_name: str) -> Iterator[str]:
    dsn = pg_server.create_database(template=template_name)
    try:
        yield dsn
    finally:
        pg_server.drop_database(str(psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]))


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
