"""A Flask-SQLAlchemy app with its own run and job models, and the outbound_heartbeat
endpoints on its own ``db.session``.

    python examples/flask_sqlalchemy_app.py --database-url postgresql+psycopg://postgres@127.0.0.1/app

The app keeps its models of the two tables and its own routes: starting a campaign (a run and
its jobs, written through its models), the telephony provider's status callback (finishing a
job), and a "stop campaign" route that force-cancels inside the app's own unit of work and
writes its own note on the cancelled jobs in the same transaction. The library's blueprint
(``GET /api/outbound_calls/jobs/active``, ``POST .../cancel``, ``POST .../force-cancel``)
runs on the same session through ``unit_of_work(db.session)``. Release hooks run only after
the session commits, never after a rollback.

The database must be migrated (``outbound-heartbeat migrate --dsn ...``) and the URL must name
the psycopg 3 driver (``postgresql+psycopg://``).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from flask import Flask, abort, jsonify, request
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import BigInteger, DateTime, ForeignKey, String, func
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from outbound_heartbeat import AccessDenied, NotFound
from outbound_heartbeat.contrib import sqlalchemy as oh
from outbound_heartbeat.contrib.flask import create_blueprint
from outbound_heartbeat.web import ReleaseHook, ReleaseHooks


class Base(DeclarativeBase):
    pass


db = SQLAlchemy(model_class=Base)


class OutboundCallRun(db.Model):  # type: ignore[name-defined,misc]
    """The app's run table. The lease columns change only through the library's API."""

    __tablename__ = "outbound_call_runs"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    business_id: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String, server_default="pending")
    locked_by_worker: Mapped[str | None] = mapped_column(String)
    lock_ts: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    lease_epoch: Mapped[int] = mapped_column(BigInteger, server_default="0")
    cancel_requested_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    ended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

    jobs: Mapped[list[OutboundCallJob]] = relationship(back_populates="run", order_by="OutboundCallJob.id")


class OutboundCallJob(db.Model):  # type: ignore[name-defined,misc]
    """The app's job table: one call to one phone number."""

    __tablename__ = "outbound_call_jobs"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    run_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("outbound_call_runs.id"))
    business_id: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String, server_default="queued")
    payload: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default="{}")
    error_message: Mapped[str | None] = mapped_column(String)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

    run: Mapped[OutboundCallRun] = relationship(back_populates="jobs")


def current_business() -> int | None:
    """The app's authentication decides; a header stands in for it here."""
    raw = request.headers.get("X-Business-Id", "")
    return int(raw) if raw.isascii() and raw.isdigit() else None


def release_call_slots(run_id: int, business_id: int) -> None:
    """A release hook: give back what the run held (a RedisSlots instance in production)."""
    logging.getLogger("app").info("run %s of business %s ended: slots released", run_id, business_id)


def create_app(database_url: str, hooks: Iterable[ReleaseHook] = (), locale: str = "he") -> Flask:
    app = Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = database_url
    db.init_app(app)
    release = ReleaseHooks([release_call_slots, *hooks])
    # The library's endpoints, each request one unit of work of the app's own session.
    app.register_blueprint(create_blueprint(oh.unit_of_work(db.session), current_business,
                                            locale=locale, hooks=release))

    @app.post("/campaigns")
    def start_campaign() -> Any:
        """The app's own route: a run and its jobs, written through its models."""
        business_id = current_business()
        if business_id is None:
            abort(401)
        phones = (request.get_json(silent=True) or {}).get("phones") or []
        if not isinstance(phones, list) or not all(isinstance(p, str) for p in phones):
            abort(400)
        run = OutboundCallRun(business_id=business_id, status="pending")
        run.jobs = [OutboundCallJob(business_id=business_id, status="queued", payload={"phone": p})
                    for p in phones]
        db.session.add(run)
        db.session.commit()
        return jsonify({"run_id": run.id, "jobs": len(phones)}), 201

    @app.post("/telephony/callback")
    def telephony_callback() -> Any:
        """The provider's status callback finishes a job the worker dialed (in_progress)."""
        data = request.get_json(silent=True) or {}
        status = data.get("status")
        if status not in ("completed", "failed") or not isinstance(data.get("job_id"), int):
            abort(400)
        job = db.session.get(OutboundCallJob, data["job_id"], with_for_update=True)
        if job is None:
            abort(404)
        if job.status != "in_progress":  # a late or repeated callback changes nothing
            db.session.rollback()
            return jsonify({"job_id": job.id, "status": job.status, "changed": False})
        job.status = status
        job.error_message = data.get("error")
        job.updated_at = func.now()
        db.session.commit()
        return jsonify({"job_id": job.id, "status": status, "changed": True})

    @app.post("/campaigns/<int:run_id>/stop")
    def stop_campaign(run_id: int) -> Any:
        """Force-cancel and the app's own note on the cancelled jobs, in ONE transaction: the
        release hooks run after its commit; a failure of the app's part rolls back both."""
        business_id = current_business()
        if business_id is None:
            abort(401)
        reason = str((request.get_json(silent=True) or {}).get("reason", ""))
        try:
            result = oh.force_cancel(db.session, run_id, business_id, on_commit=release.run)
        except AccessDenied:
            abort(403)
        except NotFound:
            abort(404)
        try:
            if not reason or len(reason) > 100:
                raise ValueError("reason must be 1 to 100 characters")  # the app's own rule
            for job in db.session.query(OutboundCallJob).filter_by(run_id=run_id, status="failed"):
                job.error_message = f"{job.error_message}; stopped by the operator: {reason}"
            db.session.commit()
        except ValueError as exc:
            db.session.rollback()  # the cancel is undone with the app's own work: no hooks
            return jsonify({"error": str(exc)}), 422
        return jsonify({"run_id": run_id, "jobs_cancelled": result.jobs_cancelled,
                        "previous_status": result.previous_status})

    return app


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="a Flask-SQLAlchemy app with outbound_heartbeat")
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--locale", choices=["he", "en"], default="he")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    create_app(args.database_url, locale=args.locale).run(host="127.0.0.1", port=5000)
