"""Embedding the outbound_heartbeat endpoints in an existing Flask app.

    python examples/flask_app.py --dsn postgresql://postgres@127.0.0.1/app             # psycopg pool
    python examples/flask_app.py --dsn postgresql://postgres@127.0.0.1/app --sqlalchemy

Then, as business 42 (this example's stand-in for your authentication):

    curl -H 'X-Business-Id: 42' http://127.0.0.1:5000/api/outbound_calls/jobs/active
    curl -X POST -H 'X-Business-Id: 42' http://127.0.0.1:5000/api/outbound_calls/jobs/17/force-cancel

The database must be migrated (`outbound-heartbeat migrate --dsn ...`).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
from flask import Flask, g, request
from psycopg_pool import ConnectionPool

from outbound_heartbeat.contrib.flask import create_blueprint


def current_business() -> int | None:
    """Your app's authentication decides; return the caller's business id, or None for 401.

    Here a header stands in for it. With Flask-Login it would be something like
    ``current_user.business_id if current_user.is_authenticated else None``.
    """
    raw = request.headers.get("X-Business-Id", "")
    return int(raw) if raw.isdigit() else None


def psycopg_pool(dsn: str) -> ConnectionPool:
    """An app without SQLAlchemy: hand the blueprint a psycopg pool (autocommit connections)."""
    return ConnectionPool(dsn, kwargs={"autocommit": True}, min_size=1, max_size=10, open=True)


def sqlalchemy_connections(url: str) -> Callable[[], contextlib.AbstractContextManager[psycopg.Connection[Any]]]:
    """An app on SQLAlchemy 2 with the psycopg 3 driver (``postgresql+psycopg://``): lend the
    blueprint the psycopg connection under one of the engine's pooled connections.

    The library's call runs in its own transaction, committed when the block ends; the release
    hooks run after that. To run the endpoints inside your own session's unit of work, see
    examples/flask_sqlalchemy_app.py (``contrib.sqlalchemy.unit_of_work``).
    """
    from sqlalchemy import create_engine

    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    engine = create_engine(url, pool_pre_ping=True)

    @contextlib.contextmanager
    def lend() -> Iterator[psycopg.Connection[Any]]:
        pooled = engine.raw_connection()  # back to SQLAlchemy's pool on close()
        try:
            driver = pooled.driver_connection
            assert isinstance(driver, psycopg.Connection)
            yield driver
            pooled.commit()
        except BaseException:
            pooled.rollback()
            raise
        finally:
            pooled.close()

    return lend


def release_call_slots(run_id: int, business_id: int) -> None:
    """A release hook: give back whatever the run held (here only logged; see RedisSlots)."""
    logging.getLogger("app").info("run %s of business %s ended: slots released", run_id, business_id)


def create_app(dsn: str, use_sqlalchemy: bool = False, locale: str = "he") -> Flask:
    app = Flask(__name__)
    connections = sqlalchemy_connections(dsn) if use_sqlalchemy else psycopg_pool(dsn)
    app.register_blueprint(
        create_blueprint(connections, current_business, locale=locale, hooks=[release_call_slots])
    )

    @app.get("/")
    def index() -> str:  # the rest of your app stays as it is
        g.setdefault("seen", True)
        return "your app"

    return app


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="outbound_heartbeat inside a Flask app")
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--sqlalchemy", action="store_true")
    parser.add_argument("--locale", choices=["he", "en"], default="he")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    create_app(args.dsn, args.sqlalchemy, args.locale).run(host="127.0.0.1", port=5000)
